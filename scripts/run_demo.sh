#!/usr/bin/env bash
# README command 1: install kvstore into .venv, start a private daemon, run the demo
# put/get round against it (scripts/demo.py), stop the daemon and remove what it made.
#
# The daemon gets a socket and a data dir of its own for this run (a fresh directory
# under $TMPDIR or /tmp, and one under /dev/shm, both 0700 and removed at the end), so
# the demo never meets another user's files or a daemon already serving the defaults.
# Extra args go to kvstore-daemon; --socket and --data-dir choose the two paths instead
# (the demo then connects to that socket; a data dir given is kept, its store discarded):
#   ./scripts/run_demo.sh --size 256MiB --hugepages off
#   ./scripts/run_demo.sh --socket /tmp/my.sock --data-dir /dev/shm/my-data
set -euo pipefail
HERE=$PWD
cd "$(dirname "$0")/.."
PROG=run_demo.sh
. scripts/venv.sh

SOCK="" DATA="" ARGS=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --socket|--data-dir)
            [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a path"
            if [ "$1" = --socket ]; then SOCK=$2; else DATA=$2; fi
            shift 2 ;;
        --socket=*) SOCK=${1#*=}; [ -n "$SOCK" ] || die "--socket needs a path"; shift ;;
        --data-dir=*) DATA=${1#*=}; [ -n "$DATA" ] || die "--data-dir needs a path"; shift ;;
        --destroy) die "--destroy is not for the demo; run: .venv/bin/kvstore-daemon --data-dir DIR --destroy" ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

abs() { case "$1" in /*) echo "$1" ;; *) echo "$HERE/$1" ;; esac; }   # paths as the caller meant them
[ -z "$SOCK" ] || SOCK=$(abs "$SOCK")
[ -z "$DATA" ] || DATA=$(abs "$DATA")

# KVSTORE_DEMO_PYTHON: a python that already has kvstore (the tests use their own); else .venv
PY=${KVSTORE_DEMO_PYTHON:-}
if [ -z "$PY" ]; then
    make_venv .venv
    if [ ! -f .venv/.kvstore-installed ] || [ setup.py -nt .venv/.kvstore-installed ]; then
        .venv/bin/python -m pip install -q -e . >.venv/pip.log 2>&1 \
            || die "pip install -e . failed (last line: $(tail -n 1 .venv/pip.log)); see .venv/pip.log"
        touch .venv/.kvstore-installed
    fi
    PY=.venv/bin/python
fi

RUN=$(mktemp -d "${TMPDIR:-/tmp}/kvstore-demo.XXXXXX") || die "cannot create a directory in ${TMPDIR:-/tmp}"
OWN_DATA=""
if [ -z "$DATA" ]; then
    DATA=$(mktemp -d /dev/shm/kvstore-demo.XXXXXX 2>/dev/null || mktemp -d "$RUN/data.XXXXXX")
    OWN_DATA=$DATA
elif [ ! -e "$DATA" ]; then
    OWN_DATA=$DATA          # the daemon creates it; removed again at the end
fi
[ -n "$SOCK" ] || SOCK=$RUN/kvstore.sock
LOG=$RUN/daemon.log
DAEMON="" SERVED=""

cleanup() {
    local rc=$? drc=0
    if [ -n "$DAEMON" ]; then
        if kill -0 "$DAEMON" 2>/dev/null; then
            kill -TERM "$DAEMON" 2>/dev/null || true
            for _ in $(seq 1 100); do kill -0 "$DAEMON" 2>/dev/null || break; sleep 0.1; done
            if kill -KILL "$DAEMON" 2>/dev/null; then
                echo "$PROG: the daemon did not stop within 10 s of SIGTERM; killed it" \
                     "(last log line: $(tail -n 1 "$LOG" 2>/dev/null))" >&2
            fi
        fi
        wait "$DAEMON" 2>/dev/null || drc=$?
        # it served, so a socket file left at its path is its own, dead now: remove it
        [ -z "$SERVED" ] || [ ! -S "$SOCK" ] || rm -f "$SOCK"
        # a daemon that did not stop cleanly leaves its segment and index: remove them
        if [ "$drc" != 0 ] || [ -n "$(ls -A "$DATA" 2>/dev/null)" ]; then
            "$PY" -m kvstore.daemon --data-dir "$DATA" --destroy >/dev/null 2>&1 || true
        fi
    fi
    [ -z "$OWN_DATA" ] || rm -rf "$OWN_DATA"
    rm -rf "$RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$PY" -m kvstore.daemon --socket "$SOCK" --data-dir "$DATA" --discard-on-exit ${ARGS[@]+"${ARGS[@]}"} >"$LOG" 2>&1 &
DAEMON=$!
# ready: its log says so (or, when a --log-level above INFO hides that line, its socket is there)
ready() { grep -q "ready: serving" "$LOG" 2>/dev/null || { [ -n "$QUIET" ] && [ -S "$SOCK" ]; }; }
QUIET=$(printf '%s\n' "${ARGS[@]+"${ARGS[@]}"}" | grep -ixE -- '(--log-level=)?(warning|error)' || true)
for _ in $(seq 1 600); do
    ready && break
    if ! kill -0 "$DAEMON" 2>/dev/null; then
        wait "$DAEMON" && rc=0 || rc=$?
        DAEMON=""
        die "the daemon did not start (exit $rc): $(grep -v '^\s*$' "$LOG" | tail -n 1)"
    fi
    sleep 0.1
done
ready || die "the daemon did not get ready within 60 s: $(tail -n 1 "$LOG")"
SERVED=1
grep -m1 'segment:' "$LOG" | sed 's/^.*segment: /daemon: segment: /' || true
echo "daemon: socket $SOCK, data dir $DATA (pid $DAEMON; removed when the demo ends)"
"$PY" scripts/demo.py "$SOCK"
