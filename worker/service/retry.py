"""Retry delays for transient failures: exponential, capped, with bounded jitter."""

from __future__ import annotations

import random


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt + 1` (attempt counts from 0).

    "Equal jitter": the delay lies in [d/2, d] for d = min(cap, base * 2**attempt). Celery's own
    `retry_jitter` draws from [0, d], so a first retry can come at once, while the disk is still full; half
    the delay is kept so retries spread out without ever being immediate.
    """
    ceiling = min(cap, base * (2.0 ** min(attempt, 62)))
    r = (rng or random).random()
    return ceiling / 2 + r * ceiling / 2
