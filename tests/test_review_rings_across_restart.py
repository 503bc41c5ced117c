"""Review: seals waiting in a client's ring when the daemon dies.

1. The client dies too before the next daemon starts: recovery (startup._adopt) drops
   the dead client (maintenance.drop_client frees [frontier, end) of its arenas)
   without draining its ring, so a put that returned True is gone, and its bytes'
   space is handed out again.
2. The client is alive but frozen (SIGSTOP) across the restart: the new daemon drains
   rings only of connected clients (Daemon._with_rings iterates self.conns) and
   settles counters only of connected ones (_settle_counters(by_cid)), so sent > applied
   stays forever: every other client's miss waits SETTLE_WAIT (1 s), the daemon never
   sleeps (_rings_waiting() -> select timeout 0), and the returned put is invisible.
"""

import os
import signal
import time

from conftest import run_py, wait_line

CHILD = """
    import os, sys, time
    from kvstore.client import Client
    c = Client(sys.argv[1], reconnect_timeout=60)
    assert c.put("k1", b"1" * 1000)            # takes an arena while the daemon runs
    print("armed", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.01)
    assert c.put("k2", b"2" * 1000)            # daemon stopped: the seal waits in the ring
    print("put2 returned", flush=True)
    time.sleep(600)
"""


def _setup(d, tmp_path):
    go = str(tmp_path / "go")
    child = run_py(CHILD, d.socket, go, background=True)
    wait_line(child, "armed")
    d.proc.send_signal(signal.SIGSTOP)
    open(go, "w").close()
    wait_line(child, "put2 returned")
    return child


def test_seals_of_a_client_that_died_with_the_daemon_survive(make_daemon, tmp_path):
    d = make_daemon()
    child = _setup(d, tmp_path)
    child.kill()
    child.wait()
    d.stop(signal.SIGKILL)
    d.start()
    c = d.client()
    try:
        assert c.get("k1") is not None
        assert c.get("k2") is not None, "a put that returned True was lost in recovery"
    finally:
        c.close()


def test_a_client_frozen_across_a_restart_stalls_nobody(make_daemon, tmp_path):
    d = make_daemon()
    child = _setup(d, tmp_path)
    try:
        child.send_signal(signal.SIGSTOP)
        d.stop(signal.SIGKILL)
        d.start()
        c = d.client()
        try:
            worst = 0.0
            for i in range(3):
                t0 = time.monotonic()
                assert c.get(f"missing{i}") is None
                worst = max(worst, time.monotonic() - t0)
            pid = d.proc.pid
            def cpu():
                with open(f"/proc/{pid}/stat") as f:
                    p = f.read().rsplit(")", 1)[1].split()
                return (int(p[11]) + int(p[12])) / os.sysconf("SC_CLK_TCK")
            c0 = cpu(); time.sleep(1.0); busy = cpu() - c0
            assert worst < 0.2, f"a miss of another client waited {worst:.2f} s"
            assert busy < 0.5, f"an idle daemon used {busy:.2f} s of CPU in 1 s"
            assert c.get("k2") is not None, "a put that returned True is invisible"
        finally:
            c.close()
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait()
