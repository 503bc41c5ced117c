"""Review: a CREATE (or GRANT) frame with a size near 2**64 kills the daemon.

extent_size(2**64 - 1) == 2**64, and allocator.alloc packs it with struct '>QQ':
struct.error is not a KVStoreError, so it escapes Daemon._apply_together / _apply /
serve and the daemon stops (claim 5: bad input gets a typed error, never a crash).
"""

import socket
import time

import pytest

from kvstore import protocol


def _hello(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    s.sendall(protocol.hello(__import__("os").getpid(), "", None))
    mtype, body, fds = protocol.recv_message(s, with_fds=3)
    for fd in fds:
        __import__("os").close(fd)
    assert mtype == protocol.WELCOME
    return s


@pytest.mark.parametrize("frame", [
    protocol.create(b"k", (1 << 64) - 1, False),
    protocol.grant((1 << 64) - 1, (1 << 64) - 1),
], ids=["create", "grant"])
def test_huge_sizes_get_a_typed_error_and_the_daemon_lives(daemon, frame):
    c = daemon.client()
    try:
        c.put("x", b"y" * 100)            # some space in use: a full-segment grant cannot fit
        s = _hello(daemon.socket)
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
