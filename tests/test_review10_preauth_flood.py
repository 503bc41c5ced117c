"""Review of issue 10: connections that never authenticate must not lock real peers out
of the control port. Every accepted connection took one of the 256 control-link slots
for its 2 s handshake, so one host without the secret holding 256 silent connections
(re-opened as they time out) made the daemon refuse every other peer: lookups,
announcements and INFO polls to it all failed."""

import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import PEER_PORT, make_kv, kv  # noqa: F401

FLOOD = r"""
import resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
end = time.monotonic() + 12
first = True
while time.monotonic() < end:          # n fresh silent connections every half second
    for _ in range(n):
        try:
            socks.append(socket.create_connection((host, port), timeout=0.5))
        except OSError:
            pass
    if first:
        print("open", len(socks), flush=True)
        first = False
    time.sleep(0.5)
    if len(socks) > 6000:
        for s in socks[:3000]:
            s.close()
        del socks[:3000]
"""

READ = r"""
import sys, time
from kvstore.transport.base import PeerAddr, ReadOp
from kvstore.transport.tcp import TcpTransport
host, port, secret_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
secret = open(secret_file, "rb").read().rstrip(b"\r\n")
ok = 0
for _ in range(3):
    t = TcpTransport(secret, streams=1)
    r = t.read(PeerAddr(host, port), [ReadOp(b"nothing-here", 0, 1, 1)], [bytearray(1)], 3.0)
    print(type(r[0]).__name__, r[0], flush=True)
    ok += type(r[0]).__name__ == "ObjectGoneOnPeer"    # authenticated and answered
    t.close()
print("ok", ok, flush=True)
"""

DIAL = r"""
import socket, sys, time
from kvstore.cluster.auth import dial_handshake
host, port, secret_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
secret = open(secret_file, "rb").read().rstrip(b"\r\n")
ok = 0
for _ in range(3):
    s = socket.create_connection((host, port), timeout=2)
    try:
        dial_handshake(s, secret, 2.0, host)
        ok += 1
    except Exception as e:
        print("failed", type(e).__name__, e, flush=True)
    s.close()
print("ok", ok, flush=True)
"""


def _under_flood(kv, port, script, timeout):
    """Host c holds 300 silent connections to a's port; then host b runs script against
    that port (with the secret). Returns b's (stdout, stderr)."""
    a = kv["a"]
    flood = kv.cl.py("c", FLOOD, a.addr, str(port), "300")
    try:
        line = flood.stdout.readline()
        assert line.startswith("open"), (line, flood.stderr.read() if flood.poll() is not None else "")
        time.sleep(2.5)                             # the flood is steady
        return kv.cl.py("b", script, a.addr, str(port), kv.secret).communicate(timeout=timeout)
    finally:
        flood.kill()
        flood.wait()


def test_silent_connections_from_one_host_do_not_lock_out_peers(kv):
    out, err = _under_flood(kv, PEER_PORT, DIAL, 20)
    assert out.strip().endswith("ok 3"), (out, err[-2000:])


def test_silent_connections_from_one_host_do_not_lock_out_transfers(kv):
    out, err = _under_flood(kv, kv["a"].tcp_port(), READ, 30)
    assert out.strip().endswith("ok 3"), (out, err[-2000:])
