"""Peer-transport microbenchmark over loopback TCP, everything in one run so the figures
compare: a raw single-stream socket (sendall / recv_into), os.sendfile from a /dev/shm
file with N streams, and TcpTransport against a TcpServer in another process (4 KiB
latency, 1 MiB and 16 MiB throughput, 64 x 1 MiB and 64 x 4 KiB batches).

    python scripts/bench_transport.py [--streams N] [--seconds 3]

Owns: nothing the store uses; it only measures. Must never: leave its /dev/shm file or
its server process behind (both go in ``finally``).
"""

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvstore.errors import ObjectGoneOnPeer  # noqa: E402
from kvstore.transport.base import ReadOp, Resolver, Served  # noqa: E402
from kvstore.transport.tcp import TcpServer, TcpTransport  # noqa: E402

MiB = 1 << 20
SECRET = b"bench-transport-secret-0123456789"
BLOCK = 16 * MiB


def _layout():
    objs, at = {}, 0
    for key, size in ([(b"page/%d" % i, 4096) for i in range(64)] + [(b"mb/%d" % i, MiB) for i in range(64)]
                      + [(b"big", 16 * MiB)]):
        objs[key] = (at, size, 1)
        at += -(-size // 4096) * 4096
    return objs, at


class _Resolver(Resolver):
    def __init__(self, path, objects):
        self.fd = os.open(path, os.O_RDONLY)
        self.objects = objects

    def resolve(self, op):
        if self.objects.get(op.key) != (op.offset, op.size, op.incarnation):
            raise ObjectGoneOnPeer("not here")
        return Served(self.fd, op.offset, op.size, lambda: None)


# ---- peers in a child process --------------------------------------------------------------------
def _raw_sender(port_q, total):
    ls = socket.create_server(("127.0.0.1", 0))
    port_q.put(ls.getsockname()[1])
    s, _ = ls.accept()
    data = memoryview(bytearray(os.urandom(1024)) * (BLOCK // 1024))
    sent = 0
    while sent < total:
        s.sendall(data)
        sent += BLOCK
    s.close()


def _sendfile_sender(port_q, path, streams, per_stream):
    ls = socket.create_server(("127.0.0.1", 0))
    port_q.put(ls.getsockname()[1])
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size

    def one(s):
        left = per_stream
        while left:
            n = min(left, size)
            off = 0
            while off < n:
                off += os.sendfile(s.fileno(), fd, off, n - off)
            left -= n
        s.close()
    threads = []
    for _ in range(streams):
        s, _ = ls.accept()
        threads.append(threading.Thread(target=one, args=(s,)))
        threads[-1].start()
    for t in threads:
        t.join()


def _server(port_q, path, objects, stop):
    server = TcpServer(_Resolver(path, objects), "127.0.0.1", 0, SECRET)
    port_q.put(server.address.port)
    stop.wait()
    server.close()


def _recv_all(s, view, total):
    """Receive total bytes filling view from start to end, again and again, as a real
    transfer of view-sized blocks does (receiving each chunk at the start of the buffer
    would keep the destination in cache and flatter the baseline)."""
    got = 0
    n = view.nbytes
    while got < total:
        at = got % n
        k = s.recv_into(view[at:min(n, at + total - got)])
        if not k:
            break
        got += k
    return got


def bench_raw(ctx, seconds_bytes):
    q = ctx.Queue()
    p = ctx.Process(target=_raw_sender, args=(q, seconds_bytes))
    p.start()
    s = socket.create_connection(("127.0.0.1", q.get()))
    buf = memoryview(bytearray(BLOCK))
    t0 = time.perf_counter()
    got = _recv_all(s, buf, seconds_bytes)
    dt = time.perf_counter() - t0
    s.close()
    p.join()
    return got / dt / 1e9


def bench_sendfile(ctx, path, streams, total):
    q = ctx.Queue()
    per = total // streams
    p = ctx.Process(target=_sendfile_sender, args=(q, path, streams, per))
    p.start()
    port = q.get()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    got = [0] * streams

    def one(i):
        got[i] = _recv_all(socks[i], memoryview(bytearray(BLOCK)), per)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    for s in socks:
        s.close()
    p.join()
    return sum(got) / dt / 1e9


def _repeat(fn, seconds, least=5, rounds=3):
    """(calls, seconds) of the fastest of several rounds: the machine may be shared."""
    best = None
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while n < least or time.perf_counter() - t0 < seconds / rounds:
            fn()
            n += 1
        dt = time.perf_counter() - t0
        if best is None or n / dt > best[0] / best[1]:
            best = (n, dt)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=None, help="default: TcpTransport's (CPUs, at most 4)")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    streams = TcpTransport(SECRET, streams=args.streams).streams
    objects, size = _layout()
    path = f"/dev/shm/kvstore-bench-transport-{os.getpid()}"
    stop = ctx.Event()
    server = None
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(1024) * (size // 1024))
        rows = []
        # best of 3 runs each (the machine may be shared)
        raw = max(bench_raw(ctx, 1024 * MiB) for _ in range(3))
        rows.append(("raw socket sendall/recv_into, 1 stream", f"{raw:.2f} GB/s"))
        sf = max(bench_sendfile(ctx, path, streams, 1024 * MiB) for _ in range(3))
        rows.append((f"os.sendfile from /dev/shm, {streams} streams", f"{sf:.2f} GB/s"))
        sf1 = max(bench_sendfile(ctx, path, 1, 1024 * MiB) for _ in range(3))
        rows.append(("os.sendfile from /dev/shm, 1 stream", f"{sf1:.2f} GB/s"))

        q = ctx.Queue()
        server = ctx.Process(target=_server, args=(q, path, objects, stop))
        server.start()
        peer = ("127.0.0.1", q.get())
        t = TcpTransport(SECRET, streams=streams)

        def op(k):
            return ReadOp(k, *objects[k])
        page = [op(b"page/0")]
        pbuf = [bytearray(4096)]
        assert t.read(peer, page, pbuf, 5) == [None]
        lat = []
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            r = t.read(peer, page, pbuf, 5)
            lat.append(time.perf_counter() - t0)
            assert r == [None]
        lat.sort()
        rows.append(("TcpTransport 4 KiB read, median latency",
                     f"{statistics.median(lat) * 1e6:.0f} µs (p99 {lat[int(len(lat) * 0.99)] * 1e6:.0f} µs)"))

        def throughput(keys):
            ops = [op(k) for k in keys]
            bufs = [bytearray(o.size) for o in ops]
            total = sum(o.size for o in ops)

            def once():
                r = t.read(peer, ops, bufs, 10)
                assert r == [None] * len(ops), r
            once()
            n, dt = _repeat(once, args.seconds)
            return n * total / dt, n * len(ops) / dt
        gbs, _ = throughput([b"mb/0"])
        rows.append(("TcpTransport 1 MiB read", f"{gbs / 1e9:.2f} GB/s ({gbs / 1e9 / raw:.2f}x raw)"))
        gbs, _ = throughput([b"big"])
        rows.append(("TcpTransport 16 MiB read", f"{gbs / 1e9:.2f} GB/s ({gbs / 1e9 / raw:.2f}x raw)"))
        gbs, _ = throughput([b"mb/%d" % i for i in range(64)])
        rows.append(("TcpTransport batch 64 x 1 MiB", f"{gbs / 1e9:.2f} GB/s ({gbs / 1e9 / raw:.2f}x raw)"))
        _, objs = throughput([b"page/%d" % i for i in range(64)])
        rows.append(("TcpTransport batch 64 x 4 KiB", f"{objs / 1e3:.0f}k objects/s"))
        t.close()
        width = max(len(r[0]) for r in rows)
        print(f"loopback TCP, {os.cpu_count()} CPUs, streams={streams}")
        for name, value in rows:
            print(f"  {name:<{width}}  {value}")
    finally:
        stop.set()
        if server is not None:
            server.join(5)
            if server.is_alive():
                server.kill()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    main()
