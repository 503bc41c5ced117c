"""kvstore: a shared-memory KV-cache store for LLM inference.

Layout: ``kvstore`` holds what the daemon and the clients share (record, table, slots,
protocol, checksum, config, errors, keys, segment, sizes, defaults, host, retry);
``kvstore.store`` is the daemon's LMDB index (schema, allocator, eviction policy, object
operations, maintenance); ``kvstore.daemon`` is the per-host daemon and
``kvstore.client`` the client handle. docs/design.md explains how they fit.
"""

import os as _os

__version__ = "0.1.0"

# In a source checkout daemon/ and client/ sit beside kvstore/ (the card's layout) and
# setup.py installs them as kvstore.daemon and kvstore.client. Running from the tree
# (tests, scripts, python -m kvstore.daemon in the checkout) resolves them the same way.
_here = _os.path.dirname(_os.path.abspath(__file__))
_tree = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "daemon")) and \
        _os.path.isfile(_os.path.join(_tree, "setup.py")) and \
        _os.path.isdir(_os.path.join(_tree, "daemon")):
    __path__.append(_tree)

from .errors import *  # noqa: F401,F403  (the error vocabulary is part of the API)
