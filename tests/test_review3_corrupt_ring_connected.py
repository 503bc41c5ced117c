"""Review (issue 9): a CONNECTED client whose seal ring's tail is corrupt (behind its
head, or more than the ring ahead) made the daemon close it from inside its walk over
``slot_of``; dropping the client removed its entry mid-walk, and the daemon died with
"RuntimeError: dictionary changed size during iteration". The daemon must drop that
client only, and keep serving everyone else."""

import struct

from conftest import run_py, wait_for, wait_line

CHILD = """
    import struct, sys, time
    from kvstore.client import Client
    from kvstore import slots as slots_mod
    c = Client(sys.argv[1], reconnect_timeout=0.5)
    assert c.put("mine", b"m" * 100)
    slot = c._conn.att.slot
    head = struct.unpack_from("<Q", slot._region, slots_mod._HEAD_AT)[0]
    struct.pack_into("<Q", slot._region, slots_mod._TAIL_AT, head + slots_mod.RING_BYTES + 64)
    slot.note_sent(c._writer.seq + 1)
    print("corrupted", flush=True)
    time.sleep(60)
"""


def test_a_connected_clients_corrupt_ring_costs_only_that_client(make_daemon):
    d = make_daemon()
    with d.client() as other:
        assert other.put("k", b"v" * 1000)
        child = run_py(CHILD, d.socket, background=True)
        try:
            wait_line(child, "corrupted")
            for i in range(50):                    # several loop turns of the daemon
                assert other.put(f"after{i}", b"a" * 100)
            assert bytes(other.get("k")) == b"v" * 1000
            other.release("k")
            assert d.proc.poll() is None, d.read_log()[-3000:]
            # puts return before the daemon applies them: wait for its turn to see the ring
            wait_for(lambda: "corrupt seal ring" in d.read_log(), what="the corrupt ring noticed")
            assert d.proc.poll() is None, d.read_log()[-3000:]
        finally:
            child.kill()
            child.wait()
