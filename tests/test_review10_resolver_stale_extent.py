"""Review of issue 10: the holder serves an extent only if the hold it took for THIS
request is on that extent. The Resolver checked whether ANY hold of the daemon's own
client on the key sat at the asked offset: while one peer's read of the old version of a
key was still being sent (holding the old extent), a second read naming the old extent
(a stale location record after a delete and re-put) passed the check on the first
read's hold and was served the old bytes as the key; the hold it had taken itself (on
the new version) was what it released."""

import subprocess
import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401

SIZE = 16 << 20
STALL_AND_READ = r"""
import socket, sys
from kvstore.cluster.auth import dial_handshake
from kvstore.transport import wire
from kvstore.transport.base import PeerAddr, ReadOp
from kvstore.transport.tcp import TcpTransport
host, port, secret_file, key, off, size, inc = sys.argv[1:]
port, key, off, size, inc = int(port), bytes.fromhex(key), int(off), int(size), int(inc)
secret = open(secret_file, "rb").read().rstrip(b"\r\n")
stall = socket.socket()
stall.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
stall.connect((host, port))
dial_handshake(stall, secret, 2.0, "a")
stall.sendall(wire.read_request([wire.Part(ReadOp(key, off, size, inc))]))
print("stalled", flush=True)
sys.stdin.readline()
t = TcpTransport(secret, streams=1)
buf = bytearray(size)
res = t.read(PeerAddr(host, port), [ReadOp(key, off, size, inc)], [buf], 5.0)
print(type(res[0]).__name__ if res[0] is not None else f"served first byte {buf[0]}", flush=True)
t.close()
stall.close()
"""


def test_a_read_naming_an_old_extent_is_gone_while_another_read_holds_it(make_kv):
    kv = make_kv(2, size="96MiB")
    a = kv["a"]
    key = b"replaced"
    with a.client() as ca:
        assert ca.put(key, b"\x01" * SIZE)
        ks = ca._key(key)
        old = ca._reader.lookup(ks).offset
    inc = a.cluster_stats()["incarnation"]
    port = a.tcp_port()
    # On host b (reads from the root namespace stall on large answers; see the report):
    # a peer reads the old version and stops reading, so the holder keeps its hold on the
    # old extent while it waits to send (up to its send timeout); meanwhile the test
    # replaces the key, then a second read names the old extent.
    proc = kv.cl.py("b", STALL_AND_READ, a.addr, str(port), kv.secret, ks.hex(), str(old), str(SIZE), str(inc),
                    stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "stalled", proc.stderr.read()
        deadline = time.monotonic() + 5
        while a.cluster_stats()["peer_server"]["leased"] < 1:     # held, being sent
            assert time.monotonic() < deadline, "the stalled read was not served"
            time.sleep(0.02)
        with a.client() as ca:                        # the key is replaced (same size)
            assert ca.delete(key)
            assert ca.put(key, b"\x02" * SIZE)
            assert ca._reader.lookup(ks).offset != old
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.strip().startswith("ObjectGoneOnPeer"), (out, err[-2000:])
    with a.client() as ca:                            # and the new version is intact
        v = ca.get(key)
        assert v is not None and bytes(v[:4]) == b"\x02" * 4
        ca.release(key)
