#!/usr/bin/env bash
# README command 2: install tox into a virtual environment of its own (.venv-tox; never
# into the system's python3, which Debian forbids: PEP 668), then run every suite with
# it: the core (py: real daemons, shared memory, LMDB, the Mooncake facade) and each
# engine's adapter in its own environment (vllm, sglang, lmcache; their pins conflict).
# With arguments, only the core suite runs, with them added to its pytest command line:
#   ./scripts/test.sh -k name        ./scripts/test.sh tests/test_semantics.py -x
# Where pip has no index configured (plain PyPI), PyTorch's CPU index is added, so the
# pinned torch is the ~200 MB CPU build, not the multi-GB CUDA one; set
# PIP_EXTRA_INDEX_URL (or PIP_INDEX_URL) yourself to choose otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PROG=test.sh
. scripts/venv.sh
make_venv .venv-tox
# the cluster tests run a real etcd between network namespaces: Debian's etcd-server and
# iproute2 (as root; as a plain user those tests skip, naming this command)
if [ "$(id -u)" = 0 ] && { ! command -v etcd >/dev/null || ! command -v ip >/dev/null; }; then
    (apt-get install -y -q etcd-server etcd-client iproute2 >/tmp/kvstore-apt.log 2>&1 \
        || { apt-get update -q >>/tmp/kvstore-apt.log 2>&1 \
             && apt-get install -y -q etcd-server etcd-client iproute2 >>/tmp/kvstore-apt.log 2>&1; }) \
        || echo "$PROG: could not install etcd-server (see /tmp/kvstore-apt.log); the cluster tests will skip" >&2
fi
.venv-tox/bin/python -c 'import tox' >/dev/null 2>&1 || .venv-tox/bin/python -m pip install -q "tox>=4,<5" \
    || die "cannot install tox into .venv-tox (no network, or no package index?)"
if [ -z "${PIP_INDEX_URL-}${PIP_EXTRA_INDEX_URL-}" ] \
        && ! .venv-tox/bin/python -m pip config list 2>/dev/null | grep -qE '\.(index-url|extra-index-url)='; then
    export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
fi
if [ "$#" -gt 0 ]; then
    exec .venv-tox/bin/python -m tox -e py -- "$@"
fi
exec .venv-tox/bin/python -m tox -e py,vllm,sglang,lmcache
