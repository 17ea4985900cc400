#!/usr/bin/env bash
# `make test-arm64`: install what the emulated arm64 run needs (as root, when missing), then run it
# (tools/arm64/run.py: it says `skipped: ...` on one line where this machine cannot).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
if [ "$(id -u)" = 0 ] && ! { command -v debootstrap && command -v qemu-aarch64-static; } >/dev/null; then
    apt-get update -qq && apt-get install -y -qq debootstrap qemu-user-static binfmt-support >/dev/null
fi
exec "$PY" tools/arm64/run.py "$@"
