"""Review (after 9910b04): startup._adopt now drains the ring of every client that died
while the daemon was down and parses it with protocol.read_seal, outside any handler:
a ring with a malformed item (a buggy or hostile client: tail and head are sane, the
bytes are not) raises ProtocolError out of open_store, and the daemon cannot start at
all until someone deletes the slots file (claims 4 and 5). At run time the same ring
only costs its client its connection.
"""

import signal

from conftest import run_py, wait_line

CHILD = """
    import os, sys, time
    from kvstore.client import Client
    c = Client(sys.argv[1], reconnect_timeout=60)
    assert c.put("k0", b"0" * 1000)                # takes an arena: k1 needs no round trip
    c._writer.wait_applied(c._writer.seq)
    print("armed", flush=True)
    while not os.path.exists(sys.argv[2]):         # the daemon is stopped now
        time.sleep(0.01)
    assert c.put("k1", b"1" * 1000)                # queued in the ring, before the garbage
    slot = c._conn.att.slot
    slot.ring_write(b"\\xff" * 100)                # not a seal item
    slot.note_sent(c._writer.seq + 1)
    print("written", flush=True)
    time.sleep(600)
"""


def test_a_dead_clients_garbage_ring_does_not_stop_the_next_daemon(make_daemon, tmp_path):
    d = make_daemon()
    go = str(tmp_path / "go")
    child = run_py(CHILD, d.socket, go, background=True)
    try:
        wait_line(child, "armed")
        d.proc.send_signal(signal.SIGSTOP)
        open(go, "w").close()
        wait_line(child, "written")
    finally:
        child.kill()
        child.wait()
    d.stop(signal.SIGKILL)
    d.start()                                      # RuntimeError("daemon exited 1 ...") today
    with d.client() as c:
        # issue 9 review: the seals queued before the damage are applied, not lost with it
        for k, v in (("k0", b"0"), ("k1", b"1")):
            assert bytes(c.get(k)) == v * 1000, k
            c.release(k)
    assert "1 puts queued before the damage are applied" in d.read_log()
