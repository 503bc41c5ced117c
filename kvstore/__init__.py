"""kvstore: a shared-memory KV-cache store for LLM inference.

Layout: ``kvstore`` holds what the daemon and the clients share (config, errors, keys,
segment, allocator, eviction, index, protocol); ``kvstore.daemon`` is the per-host
daemon and ``kvstore.client`` the client handle.
"""

__version__ = "0.1.0"

from .errors import *  # noqa: F401,F403  (the error vocabulary is part of the API)
