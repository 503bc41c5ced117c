#!/usr/bin/env bash
# README command 1: install kvstore into .venv, start a daemon on the embedded defaults
# (socket /tmp/kvstore.sock, 1 GiB segment, data dir /dev/shm/kvstore-data), run the demo
# put/get round against it, and stop the daemon. Extra args go to kvstore-daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q -e .
SOCK=/tmp/kvstore.sock
.venv/bin/kvstore-daemon --socket "$SOCK" --discard-on-exit "$@" &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null; wait $DAEMON' EXIT
for _ in $(seq 1 300); do
  [ -S "$SOCK" ] && break
  kill -0 $DAEMON 2>/dev/null || { echo "run_demo: the daemon did not start" >&2; exit 1; }
  sleep 0.1
done
.venv/bin/python scripts/demo.py "$SOCK"
