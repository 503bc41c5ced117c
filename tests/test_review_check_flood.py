"""Review: CHECK (Client.verify) is answered inside the daemon's loop and costs a full
scan of the index and the table (~9 ms with 2,000 objects here); nothing bounds how
many one client sends per turn (RECV_BYTES bounds bytes: a CHECK frame is 7 bytes, so
256 KiB is ~37,000 checks). A few hundred frames hold the daemon for seconds (claim 1):
no grant, delete, connect or publication of new puts meanwhile.
"""

import threading
import time

from kvstore import protocol
from kvstore.errors import StoreUnavailable
from conftest import raw_hello



def test_a_flood_of_checks_does_not_stall_the_daemon(daemon):
    with daemon.client() as p:
        for i in range(2000):
            p.put(f"k{i}", b"v" * 1000)
    c = daemon.client()
    s, _ = raw_hello(daemon.socket)
    try:
        frames = protocol.encode(protocol.CHECK, {}) * 400
        threading.Thread(target=lambda: s.sendall(frames), daemon=True).start()
        time.sleep(0.05)
        worst, end = 0.0, time.monotonic() + 2.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                c.stats()
            except StoreUnavailable as e:
                raise AssertionError(f"another client's request failed after "
                                     f"{time.monotonic() - t0:.1f} s: {e}") from None
            worst = max(worst, time.monotonic() - t0)
        assert worst < 0.5, f"another client's request waited {worst:.2f} s"
    finally:
        s.close()
        c.close()
