"""Review of issue 10: the peer control port, fuzzed over a real socket from another
host, before and after authentication. The daemon must survive everything, log no
traceback, answer each bad frame at most with an ERROR and a closed link, and keep
serving its peers and clients."""

import random
import socket
import struct
import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import PEER_PORT, make_kv, kv  # noqa: F401

FUZZ = r"""
import random, socket, struct, sys, time
from kvstore.cluster import peerwire as pw
from kvstore.cluster.auth import dial_handshake
host, port, secret_file, seed = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
secret = open(secret_file, "rb").read().rstrip(b"\r\n")
rnd = random.Random(seed)

def link(auth=True):
    s = socket.create_connection((host, port), timeout=3)
    if auth:
        dial_handshake(s, secret, 2.0, host)
    s.settimeout(0.3)
    return s

def frames():
    keys = [rnd.randbytes(rnd.randint(1, 300)) for _ in range(rnd.randint(0, 5))]
    yield pw.HEADER.pack(rnd.randint(0, 1 << 32 - 1), rnd.randint(0, 255)) + rnd.randbytes(rnd.randint(0, 64))
    yield pw.HEADER.pack(pw.MAX_PAYLOAD + 1, pw.LOOKUP)
    t = rnd.choice(list(pw.NAMES))
    yield pw.HEADER.pack(rnd.randint(0, 200), t) + rnd.randbytes(rnd.randint(0, 200))
    yield pw.HEADER.pack(8, pw.LOOKUP) + struct.pack("<I", 65535) + b"\x05\x00ab"
    yield pw.HEADER.pack(6, pw.ANNOUNCE) + b"\xff\xff" + b"\x00" * 4
    yield pw.frame(pw.ANNOUNCE, pw.announce("x" * 200, 2**64 - 1, [(k, 2**64 - 1, 2**64 - 1, 0) for k in keys])[5:])
    yield pw.frame(pw.WITHDRAW, pw.withdraw("nobody:1", 0, keys)[5:])
    yield pw.frame(pw.REPLICATE, pw.replicate("nobody:1", 1, [(k, 0, 10, 0) for k in keys])[5:])
    yield pw.frame(pw.DELETE, pw.delete([b"\x00" + k for k in keys])[5:])
    yield pw.frame(pw.OK, b"\x00" * 8)
    yield pw.frame(pw.ERROR, b"\x00\x00hello")
    yield pw.frame(pw.INFO, b"junk")
    yield pw.frame(pw.LOCATIONS, b"")

bad = 0
for i in range(6):
    for f in frames():
        try:
            s = link(auth=rnd.random() < 0.9)
            cut = rnd.randint(1, len(f)) if rnd.random() < 0.2 else len(f)
            s.sendall(f[:cut])
            if cut < len(f):
                s.shutdown(socket.SHUT_WR)
            try:
                s.recv(1 << 16)
            except OSError:
                pass
            s.close()
        except Exception as e:
            bad += 1
s = link()
s.sendall(pw.info())
n, t = pw.read_header(s.recv(5, socket.MSG_WAITALL))
print("INFO" if t == pw.INFO_REPLY else f"type {t}", bad, flush=True)
"""


def test_fuzzed_control_frames_leave_the_daemon_serving(kv):
    a, b = kv["a"], kv["b"]
    with a.client() as ca:
        assert ca.put(b"before", b"x" * 1000)
    p = kv.cl.py("b", FUZZ, a.addr, str(PEER_PORT), kv.secret, "10")
    out, err = p.communicate(timeout=60)
    assert out.startswith("INFO"), (out, err[-3000:])
    assert a.proc.poll() is None
    log = a.read_log()
    assert "Traceback" not in log and "Exception in thread" not in log, log[-4000:]
    deadline = time.monotonic() + 10
    with b.client() as cb:                              # peers still find and pull from a
        while True:
            try:
                v = cb.get(b"before")
            except Exception:                           # noqa: BLE001
                v = None
            if v is not None:
                break
            assert time.monotonic() < deadline, "b cannot get from a after the fuzzing"
            time.sleep(0.1)
        assert bytes(v) == b"x" * 1000
        cb.release(b"before")
