"""Where a kvstore is found when nobody says: the default names, in one place.

Owns: the default socket path, the environment variable that overrides it
(KVSTORE_SOCKET), ``socket_path()`` (the one rule every client, adapter, script and
the Mooncake facade uses to pick a socket), the default data dir and hugetlbfs mount,
and the prefix of the daemon's environment variables (KVSTORE_<FIELD>).
Must never: import anything of kvstore's (every module may import this one), or read
the environment at import time (tests and callers change it at run time).
"""

import os

#: The daemon's unix socket when neither a flag, a setting nor the environment names one.
DEFAULT_SOCKET = "/tmp/kvstore.sock"

#: The environment variable naming the socket, for the daemon and every client.
SOCKET_ENV = "KVSTORE_SOCKET"

#: Prefix of the daemon's environment variables: KVSTORE_SIZE, KVSTORE_DATA_DIR, ...
ENV_PREFIX = "KVSTORE_"

#: The daemon's LMDB index and lock; tmpfs, because the index only has to outlive
#: processes (as the segment does) and disk writeback would stall it.
DEFAULT_DATA_DIR = "/dev/shm/kvstore-data"

#: Where the daemon looks for (or, as root, mounts) hugetlbfs for its segment.
DEFAULT_HUGETLBFS_DIR = "/dev/hugepages"


def socket_path(explicit=None):
    """The socket to use: ``explicit`` if given, else $KVSTORE_SOCKET, else DEFAULT_SOCKET.

    An empty string counts as not given (an unset setting often arrives as "")."""
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
