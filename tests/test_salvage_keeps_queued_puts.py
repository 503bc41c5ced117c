"""A rebuilt index keeps the puts that were still queued in the clients' seal rings when
the daemon died (a soak lost returned puts this way): real daemon, real client process,
real SIGSTOP/SIGKILL, a real LMDB index whose counter is then made wrong so the next
start must rebuild it (daemon/salvage.py)."""

import signal
import subprocess
import sys
import textwrap

from conftest import ROOT, run_py

N = 40
WRITER = textwrap.dedent("""
    import sys
    from kvstore.client import Client
    c = Client(sys.argv[1], reconnect_timeout=0.5)
    assert c.put("warm", b"w" * 100)          # its arena is granted now, with room to spare
    other = Client(sys.argv[1])                # ...and applied: another client sees it
    while not other.contains("warm"):          # (the writer itself reads its own puts at once)
        pass
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(%d):
        assert c.put(f"queued-{i}", bytes([i]) * (100 + i))
    print("queued", flush=True)
    sys.stdin.readline()
""" % N)


def test_puts_queued_in_a_ring_survive_an_index_rebuild(make_daemon):
    d = make_daemon(size="16MiB", extra=("--hugepages", "off"))
    w = subprocess.Popen([sys.executable, "-c", WRITER, d.socket], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert w.stdout.readline().strip() == "ready", w.stderr.read()
        d.proc.send_signal(signal.SIGSTOP)   # seals now wait in the writer's ring
        w.stdin.write("go\n")
        w.stdin.flush()
        assert w.stdout.readline().strip() == "queued", w.stderr.read()   # every put returned
        d.stop(signal.SIGKILL)               # dies with the seals still queued
    finally:
        w.kill()
        w.wait()
    run_py("""
        import struct, sys, lmdb
        env = lmdb.open(sys.argv[1], max_dbs=16)
        with env.begin(write=True) as txn:
            txn.put(b"used", struct.pack("<Q", 1), db=env.open_db(b"meta", txn=txn))
    """, d.data_dir + "/index")
    d.start()
    log = d.read_log()
    assert "the used counter says 1 bytes" in log, log          # the index was rebuilt
    assert f"{N} puts still queued in the clients' seal rings were verified and kept" in log, log
    with d.client() as c:
        assert bytes(c.read("warm")) == b"w" * 100
        for i in range(N):
            assert bytes(c.read(f"queued-{i}")) == bytes([i]) * (100 + i), i
        st = c.stats()
        assert st["objects"] == N + 1
    with d.client() as c:                      # and the rebuilt store takes new puts
        assert c.put("after", b"a" * 5000) and bytes(c.read("after")) == b"a" * 5000
