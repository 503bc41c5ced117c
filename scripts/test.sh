#!/usr/bin/env bash
# README command 2: install what the tests need (tox, which builds its own virtualenv
# with the test, torch and arrow extras) and run the whole suite. Args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "tox>=4"
exec python3 -m tox -e py -- "$@"
