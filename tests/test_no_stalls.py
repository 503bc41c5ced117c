"""No client can stall another or the daemon: a client process SIGSTOPped at random moments
inside every operation (a debugger, a cgroup freeze, a container pause) costs the other
clients nothing. Clients never take a lock another process waits on: the daemon is the
only writer of the index, readers use the lock-free published table, holds live in each
client's own slot.

The frozen client here runs every operation in a tight loop (put, put_many, get,
get_many, release, read, read_many, contains, size_of, create/seal, delete); the test
stops it at random moments and meanwhile times the other client's put, get, release,
contains and a brand-new client's connect. With the old design (clients writing LMDB
under its cross-process lock) a stop of 0.3 s held the others for up to 0.3 s.
"""

import os
import random
import signal
import time

from conftest import run_py, wait_line

VICTIM = """
    import os, sys, random
    import numpy as np
    from kvstore.client import Client
    c = Client(sys.argv[1])
    rng = random.Random(os.getpid())
    big = np.ones(1 << 20, dtype=np.uint8)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        k = f"v{i}"
        op = i % 8
        if op == 0:
            c.put(k, b"x" * rng.randrange(1, 65536))
        elif op == 1:
            c.put_many([f"{k}a", f"{k}b", f"{k}c"], [b"1" * 4096, b"2" * 100, big])
        elif op == 2:
            c.put(k, b"y" * 4096); v = c.get(k); c.release(k)
        elif op == 3:
            ks = [f"v{j}" for j in range(max(1, i - 20), i)]
            vs = c.get_many(ks); c.release_many([x for x, v in zip(ks, vs) if v is not None])
        elif op == 4:
            c.read(f"v{i - 2}"); c.read_many([f"v{i - 3}", f"v{i - 4}"])
        elif op == 5:
            c.contains(f"v{i - 5}"); c.size_of(f"v{i - 6}")
        elif op == 6:
            b = c.create(k, 4096); b[:4] = b"abcd"; c.seal(k)
        else:
            c.delete(f"v{i - 7}")
"""


def _probe_round(c, sock, seconds, n):
    """Time the other client's operations for ``seconds``; returns the longest, by name."""
    from kvstore.client import Client
    longest = {}
    end = time.monotonic() + seconds
    j = 0
    while time.monotonic() < end:
        j += 1
        k = f"p{n}-{j}"
        got = []
        for name, fn in (("put", lambda: c.put(k, b"p" * 4096)),
                         ("get", lambda: got.append(c.get(k))),
                         ("release", lambda: got[0] is not None and c.release(k)),
                         ("contains", lambda: c.contains(k)),
                         ("delete", lambda: c.delete(k))):
            t0 = time.perf_counter()
            fn()
            longest[name] = max(longest.get(name, 0.0), time.perf_counter() - t0)
        if j % 50 == 0:
            t0 = time.perf_counter()
            Client(sock).close()
            longest["connect"] = max(longest.get("connect", 0.0), time.perf_counter() - t0)
    return longest


def test_a_frozen_client_stalls_nobody(make_daemon):
    daemon = make_daemon(size="256MiB")          # room enough that eviction is rare
    victim = run_py(VICTIM, daemon.socket, background=True)
    rng = random.Random(8)
    worst = {}
    try:
        wait_line(victim, "ready")
        with daemon.client() as c:
            for n in range(30):
                time.sleep(rng.uniform(0.0, 0.03))         # a random moment of its loop
                os.kill(victim.pid, signal.SIGSTOP)
                try:
                    got = _probe_round(c, daemon.socket, 0.3, n)
                finally:
                    os.kill(victim.pid, signal.SIGCONT)
                for name, t in got.items():
                    worst[name] = max(worst.get(name, 0.0), t)
            assert victim.poll() is None, victim.stderr.read()   # it survived every stop
            print("longest waits while the other client was stopped:",
                  {k: f"{v * 1e3:.1f} ms" for k, v in worst.items()})
            # each stop lasts 0.3 s: waiting on the stopped client would take at least
            # that; the bound leaves room for a loaded 2-core machine (quiet: under 25 ms)
            assert max(worst.values()) < 0.25, worst
            assert c.verify() == []
    finally:
        victim.kill()
        victim.wait()


def test_a_frozen_reader_never_fills_the_index(make_daemon):
    """A client stopped in the middle of lookups pins nothing: others go on putting and
    deleting far past what the old design allowed (IndexFull after ~1,400 rounds with a
    1 MiB index) and the index never fills."""
    d = make_daemon(size="64MiB", extra=("--index-map-size", "2MiB"))
    reader = run_py("""
        import sys
        from kvstore.client import Client
        c = Client(sys.argv[1]); c.put("r", b"1")
        print("ready", flush=True)
        while True:
            c.contains("r"); c.get("r"); c.release("r"); c.read("r")
    """, d.socket, background=True)
    try:
        wait_line(reader, "ready")
        time.sleep(0.05)
        os.kill(reader.pid, signal.SIGSTOP)
        with d.client() as c:
            for i in range(20000):
                c.put(f"k{i}", b"x" * 256)
                c.delete(f"k{i}")
            assert c.contains("r") and c.verify() == []
        os.kill(reader.pid, signal.SIGCONT)
        time.sleep(0.1)
        assert reader.poll() is None, reader.stderr.read()
    finally:
        reader.kill()
        reader.wait()
