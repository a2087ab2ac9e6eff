#!/usr/bin/env bash
# Builds the original Rust seed (seed_harness/src/rootfs.rs) into a small CLI, offline, from Debian's
# packaged crate sources, and prints the binary's path on stdout (everything else goes to stderr).
#
# Idempotent: Debian packages are installed only when missing (apt-get update + install, non-interactive),
# and cargo rebuilds only what changed, so a second run takes a fraction of a second.
# Exit status 3 means no cargo was found: callers may skip rather than fail.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
harness="$here/seed_harness"
target="$harness/target"
binary="$target/release/seed-harness"

# The crates the harness needs (their dependencies come with them). tempfile is only a dev-dependency,
# for the seed's own unit tests, but cargo resolves dev-dependencies for every build, so it must be there.
debian_crates=(librust-sha2-dev librust-serde-json-dev librust-tempfile-dev)

if ! command -v cargo >/dev/null 2>&1; then
  cargo_home="${CARGO_HOME:-${HOME:-/root}/.cargo}"
  if [ -x "$cargo_home/bin/cargo" ]; then
    PATH="$cargo_home/bin:$PATH"
  else
    echo "build_seed: cargo not found (looked on PATH and in $cargo_home/bin)" >&2
    exit 3
  fi
fi

missing=()
for pkg in "${debian_crates[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == ii* ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
  echo "build_seed: installing ${missing[*]} from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq >&2
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# Run from the harness directory: cargo finds .cargo/config.toml (source replacement to
# /usr/share/cargo/registry, offline) from the working directory, not from --manifest-path.
# A CARGO_HOME of its own (under target/) keeps cargo's caches and locks off the machine's ~/.cargo;
# the toolchain is still the one rustup (RUSTUP_HOME) or the system provides.
cd "$harness"
export CARGO_HOME="$target/cargo-home"
cargo build --release --offline --quiet --target-dir "$target" >&2
[ -x "$binary" ] || { echo "build_seed: cargo succeeded but $binary is missing" >&2; exit 1; }
echo "$binary"
