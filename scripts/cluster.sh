#!/usr/bin/env bash
# Test hosts on this machine: network namespaces joined by a bridge, and a real etcd
# (the same code as the pytest fixture `cluster`, tests/clusterlib.py). Needs root.
#   scripts/cluster.sh up [-n 3]     create one and leave it running; prints its id,
#                                    hosts, addresses and etcd endpoint
#   scripts/cluster.sh status        list clusters (also those of running tests)
#   scripts/cluster.sh down [ID]     remove ID, or every cluster made by `up` and every
#                                    one left by a killed test run (--all: also those
#                                    of tests still running; --stale: only those
#                                    left by killed runs)
# etcd comes from Debian: apt-get install -y etcd-server etcd-client
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 tests/clusterlib.py "$@"
