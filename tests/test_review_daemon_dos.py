"""Review: one client can stall the daemon (and so every other client's puts, deletes,
grants, connects and the visibility of new puts) with cheap, well-formed requests.

1. Failing requests: Daemon._apply_together abandons the whole turn's transaction and
   re-applies the turn from the start for EVERY request that fails (raise _Retry), so
   n failing requests in one turn (ABORT of a key that does not exist: ObjectNotFound)
   cost O(n^2) plus n LMDB write transactions. 256 KiB per turn is ~16k such frames.
2. TABLE: Daemon._after() answers with a BLOCKING send_fds with a 1 s timeout; a client
   that stops reading (its socket buffer full of earlier replies) holds the daemon for
   1 s per TABLE frame / connection.
"""

import threading
import time

from kvstore import protocol
from conftest import raw_hello



def _worst_latency(c, seconds):
    worst, end = 0.0, time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t0 = time.monotonic()
        c.stats()
        worst = max(worst, time.monotonic() - t0)
        i += 1
    return worst


def test_a_flood_of_failing_requests_does_not_stall_the_daemon(daemon):
    c = daemon.client()
    s, _ = raw_hello(daemon.socket)
    try:
        frames = b"".join(protocol.keyed(protocol.ABORT, b"nope%06d" % i) for i in range(12000))
        t = threading.Thread(target=lambda: s.sendall(frames), daemon=True)
        t.start()
        time.sleep(0.05)
        worst = _worst_latency(c, 3.0)
        assert worst < 0.5, f"another client's request waited {worst:.2f} s"
    finally:
        s.close()
        c.close()


def test_a_client_that_does_not_read_cannot_block_the_daemon_with_table_requests(daemon):
    c = daemon.client()
    socks = [raw_hello(daemon.socket)[0] for _ in range(3)]
    try:
        stats = protocol.encode(protocol.STATS, {})
        table = protocol.encode(protocol.TABLE, {})
        for s in socks:           # replies fill the socket buffers, then a TABLE
            s.setblocking(False)
            try:
                s.send(stats * 1000 + table)
            except BlockingIOError:
                pass
        time.sleep(0.05)
        worst = _worst_latency(c, 3.0)
        assert worst < 0.5, f"another client's request waited {worst:.2f} s"
    finally:
        for s in socks:
            s.close()
        c.close()
