#!/usr/bin/env bash
# README command 2: install what the tests need (tox, which builds one virtualenv per
# tox environment) and run every suite: the core (py: real daemons, shared memory,
# LMDB, the Mooncake facade) and each engine's adapter in its own environment (vllm,
# sglang, lmcache; their pins conflict). Args go to pytest in the core environment only.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "tox>=4"
if [ "$#" -gt 0 ]; then
    exec python3 -m tox -e py -- "$@"
fi
exec python3 -m tox -e py,vllm,sglang,lmcache
