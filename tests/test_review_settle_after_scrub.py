"""Review: a reader that settles a miss snapshots {slot: sent} and waits for
applied[slot] >= sent (ClientSlot.caught_up). When the writer of that slot goes away,
the daemon applies its ring (applied = n) and then, in the same turn, scrubs the slot
(SlotsFile.scrub: sent = applied = 0), so the reader almost never sees applied >= n and
waits the whole SETTLE_WAIT (1 s) for a client that is already gone: one client's exit
stalls another client's miss (claim 1).
"""

import signal
import time

from conftest import run_py

WRITER = """
    import sys
    from kvstore.client import Client
    c = Client(sys.argv[1])
    c.put("a" + sys.argv[3], b"1" * 100)   # an arena, while the daemon runs
    import os, signal
    os.kill(int(sys.argv[2]), signal.SIGSTOP)
    c.put("b" + sys.argv[3], b"2" * 100)   # in the ring; the daemon is stopped
    os._exit(0)                         # gone before the daemon sees the seal
"""


def test_a_writer_that_exits_does_not_stall_another_clients_miss(daemon):
    c = daemon.client()
    try:
        worst = 0.0
        for i in range(3):
            run_py(WRITER, daemon.socket, daemon.proc.pid, i)   # returns once it has exited
            t = __import__("threading").Timer(0.1, lambda: daemon.proc.send_signal(signal.SIGCONT))
            t.start()
            t0 = time.monotonic()
            assert c.get(f"missing{i}") is None              # settles on the writer's seal
            worst = max(worst, time.monotonic() - t0)
            t.join()
            time.sleep(0.1)
        assert worst < 0.5, f"a miss waited {worst:.2f} s for a writer that had exited"
    finally:
        c.close()
