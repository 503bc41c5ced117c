"""Review of issue 10: a daemon stopped (SIGTERM) while one of its cluster threads is
pulling a block must exit promptly. ClusterNode.close() ran on the server loop's thread
and closed the daemon's own Client there, which sends ABORT for the half-filled block
and waits for the reply of ... the server loop that is busy closing: the stop hung for
the client's whole timeout (10 s)."""

import signal
import threading
import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401


def test_sigterm_while_a_fetch_waits_on_a_frozen_holder_exits_fast(make_kv):
    kv = make_kv(2, extra=["--transfer-timeout", "8"])
    a, b = kv["a"], kv["b"]
    with a.client() as ca:
        assert ca.put(b"warm", b"w" * 1000)
        assert ca.put(b"big", b"b" * 4_000_000)
    deadline = time.monotonic() + 10
    with b.client() as cb:
        while not all(cb.contains_anywhere([b"warm", b"big"])):
            assert time.monotonic() < deadline, "location records did not arrive"
            time.sleep(0.05)
        assert bytes(cb.get(b"warm")) == b"w" * 1000      # b now has a pooled link to a
        cb.release(b"warm")
    a.proc.send_signal(signal.SIGSTOP)                     # a holder that stops answering
    try:
        cb = b.client(timeout=10.0, reconnect_timeout=0.5)
        done = threading.Event()

        def get():
            try:
                cb.get(b"big")
            except Exception:                               # noqa: BLE001 (the daemon goes away)
                pass
            done.set()
        threading.Thread(target=get, daemon=True).start()
        deadline = time.monotonic() + 5
        while b.cluster_stats().get("fetch_requests", 0) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)                                     # the block is created, the read waits
        t0 = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        b.proc.wait(30)
        took = time.monotonic() - t0
        done.wait(15)
        try:
            cb.close()
        except Exception:                                   # noqa: BLE001
            pass
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert b.proc.returncode == 0, b.read_log()[-2000:]
    assert took < 4.0, f"SIGTERM with a fetch in flight took {took:.1f} s to stop"
    tail = b.read_log().split("received SIGTERM")[-1]
    assert "went away" not in tail and " WARNING " not in tail, tail[-2000:]
