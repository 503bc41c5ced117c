"""Review: a CREATE (or GRANT) frame with a size near 2**64 kills the daemon.

extent_size(2**64 - 1) == 2**64, and allocator.alloc packs it with struct '>QQ':
struct.error is not a KVStoreError, so it escapes Daemon._apply_together / _apply /
serve and the daemon stops (claim 5: bad input gets a typed error, never a crash).
"""

import time

import pytest

from kvstore import protocol
from conftest import raw_hello



@pytest.mark.parametrize("frame", [
    protocol.create(b"k", (1 << 64) - 1, False),
    protocol.grant((1 << 64) - 1, (1 << 64) - 1),
], ids=["create", "grant"])
def test_huge_sizes_get_a_typed_error_and_the_daemon_lives(daemon, frame):
    c = daemon.client()
    try:
        c.put("x", b"y" * 100)            # some space in use: a full-segment grant cannot fit
        s, _ = raw_hello(daemon.socket)
        s.sendall(frame)
        try:
            protocol.recv_message(s)
        except Exception:
            pass                          # a typed error is fine
        s.close()
        time.sleep(0.3)
        assert daemon.proc.poll() is None, "daemon died:\n" + daemon.read_log()[-2000:]
        c2 = daemon.client()
        assert bytes(c2.get("x")) == b"y" * 100
        c2.close()
    finally:
        c.close()
