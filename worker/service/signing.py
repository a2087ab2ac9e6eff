"""Message signing (optional): a worker runs only jobs signed by a key it trusts.

Without it, anyone who can write to Redis can make a host clone or release any VM's disk. With it, every job
(and every result) is serialised by Celery's `auth` serializer: JSON signed with this process's private key,
carrying its certificate; a receiver accepts only content of type `auth` whose certificate is in its trusted
store and whose signature verifies. An unsigned job (plain JSON) is refused as disallowed content, one signed by
an untrusted key fails verification: either way Celery logs it and drops it, and nothing runs.

Needs the `cryptography` package (`pip install rootfs-worker[signing]`); only imported when signing is on.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.service.settings import Settings

#: Serializers left enabled besides `auth` (which setup_security registers after disabling the others): JSON,
#: which the signed envelope wraps and task events use. Naming `auth` here fails: it is not registered yet.
ALLOWED_SERIALIZERS = ["json"]


#: The content type of Celery's `auth` serializer (celery/security/serialization.py: register_auth).
SIGNED_CONTENT_TYPE = "application/data"


def content_type(settings: Settings) -> str:
    """What a task message must be labelled on this worker's queues: signed with signing on, JSON otherwise. The
    transport's envelope check refuses anything else before Celery sees it (an unsigned job among them)."""
    return SIGNED_CONTENT_TYPE if settings.signing else "application/json"


def celery_options(settings: Settings) -> dict[str, Any]:
    """The Celery settings that turn signing on (nothing when ROOTFS_SIGNING_KEY is unset)."""
    if not settings.signing:
        return {}
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "result_serializer": "auth",
        "result_accept_content": ["auth"],
        "security_key": str(settings.signing_key),
        "security_certificate": str(settings.signing_cert),
        "security_cert_store": settings.signing_trusted,
        "security_digest": "sha256",
    }


def install(app: Celery) -> None:
    """Register the signing serializer once the app's configuration is known (it may be read lazily)."""

    def setup(sender: Celery, **_: Any) -> None:
        if sender.conf.task_serializer == "auth":
            sender.setup_security(allowed_serializers=ALLOWED_SERIALIZERS, serializer="json")

    if app.configured:  # conf.update on a new app may already have loaded it
        setup(app)
    else:
        app.on_after_configure.connect(setup, weak=False)
