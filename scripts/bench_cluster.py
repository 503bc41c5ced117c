#!/usr/bin/env python3
"""Cross-host figures (``scripts/bench.py --cluster``): two hosts as network namespaces
joined by a bridge (tests/clusterlib.py, MTU 65535), a kvstore daemon on each (static
peers), and in the same run the references the figures must be read against: a raw
Python socket (one stream, sendall of a memoryview into recv_into a buffer) and
os.sendfile from a /dev/shm file with as many streams as the transport uses.

Prints: cross-host get latency at 4 KiB (median and p99 of first gets on B of keys
sealed on A), throughput at 64 KiB, 1 MiB and 16 MiB and for batches of 64 x 1 MiB,
each both as ``get`` (the zero-copy view: the pull into B's segment is the whole cost)
and as ``read`` (plus the verified copy into the caller's buffer), batches of 64 x 4 KiB
(objects/s) and the cluster-wide existence check of 64 keys. Root only (it makes namespaces); everything is removed at the end.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

# the streams kvstore.transport.tcp uses for the daemon's reads (its default: this host's
# CPUs, at most 4): the sendfile reference uses as many
STREAMS = max(1, min(4, os.cpu_count() or 1))
PORT = 7700

RECEIVER = textwrap.dedent("""
    import socket, sys, time, threading
    port, streams, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    lst = socket.create_server(("0.0.0.0", port), backlog=16)
    print("listening", flush=True)
    buf = bytearray(64 << 20)
    conns = [lst.accept()[0] for _ in range(streams)]
    t0 = None
    def drain(c, n):
        global t0
        view = memoryview(buf)
        got = 0
        while got < n:
            k = c.recv_into(view[(got % (48 << 20)):(got % (48 << 20)) + (16 << 20)])
            if k == 0:
                break
            if t0 is None:
                t0 = time.perf_counter()
            got += k
    ts = [threading.Thread(target=drain, args=(c, total // streams)) for c in conns]
    [t.start() for t in ts]
    [t.join() for t in ts]
    print(total / (time.perf_counter() - t0) / 1e9, flush=True)
""")

SENDER = textwrap.dedent("""
    import os, socket, sys, threading
    host, port, streams, total, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    conns = [socket.create_connection((host, port)) for _ in range(streams)]
    block = 16 << 20
    if mode == "sendfile":
        path = "/dev/shm/kvs-bench-sendfile-%d" % os.getpid()
        with open(path, "wb") as f:
            f.write(os.urandom(block) * 4)
        fd = os.open(path, os.O_RDONLY)
        os.unlink(path)
    data = memoryview(bytearray(os.urandom(block)))
    def send(c, n):
        sent = 0
        while sent < n:
            if mode == "sendfile":
                sent += os.sendfile(c.fileno(), fd, sent % (3 * block), min(block, n - sent))
            else:
                c.sendall(data[:min(block, n - sent)])
                sent += min(block, n - sent)
        c.close()
    ts = [threading.Thread(target=send, args=(c, total // streams)) for c in conns]
    [t.start() for t in ts]
    [t.join() for t in ts]
""")


def reference(cl, mode, streams, total):
    """GB/s of a raw transfer from host a to host b."""
    recv = cl.py("b", RECEIVER, str(PORT + 50), str(streams), str(total))
    assert recv.stdout.readline().strip() == "listening", recv.stderr.read()
    cl.run("a", [sys.executable, "-c", SENDER, cl.addr("b"), str(PORT + 50), str(streams), str(total), mode],
           check=True, timeout=120)
    out = recv.stdout.readline().strip()
    recv.wait(30)
    return float(out)


def median_us(samples):
    return statistics.median(samples) * 1e6


def p99_us(samples):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench --cluster makes network namespaces: run it as root")
    from clusterlib import Cluster, unavailable_reason
    from kvcluster import KV
    why = unavailable_reason()
    if why:
        sys.exit(f"bench --cluster: {why}")
    n_lat = 200 if args.quick else 1000
    tmp = tempfile.mkdtemp(prefix="kvs-bench-cluster-", dir="/dev/shm")   # data dirs on tmpfs, as advised
    cl = Cluster(2).up()
    kv = None
    try:
        total = (512 << 20) if args.quick else (2 << 30)
        raw = reference(cl, "sendall", 1, total)
        sf = reference(cl, "sendfile", STREAMS, total)
        kv = KV(cl, tmp, 2, size="2GiB")
        for d in kv.d.values():
            d.peers = [o.id for o in kv.d.values() if o is not d]
        kv.start()
        a, b = kv["a"], kv["b"]
        ca, cb = a.client(), b.client()
        rows = []

        def wait_located(keys):
            deadline = time.monotonic() + 30
            while not all(cb.contains_anywhere(keys)):
                if time.monotonic() > deadline:
                    sys.exit("bench --cluster: location records did not arrive")
                time.sleep(0.05)

        # 4 KiB latency: first gets on B of keys sealed on A
        keys = [f"lat-{i}".encode() for i in range(n_lat)]
        v = os.urandom(4096)
        for k in keys:
            ca.put(k, v)
        wait_located(keys[-64:])
        wait_located(keys[:64])
        lat = []
        for k in keys:
            t0 = time.perf_counter()
            x = cb.get(k)
            lat.append(time.perf_counter() - t0)
            assert x is not None
            cb.release(k)
        local = []
        for k in keys[:200]:
            t0 = time.perf_counter()
            cb.get(k)
            local.append(time.perf_counter() - t0)
            cb.release(k)
        rows.append(("get 4 KiB, cross-host (first get on B)", f"{median_us(lat):.0f} µs median, "
                     f"p99 {p99_us(lat):.0f} µs", ""))
        rows.append(("get 4 KiB, then local on B", f"{median_us(local):.1f} µs median", ""))

        for size, count in ((64 << 10, 400), (1 << 20, 200), (16 << 20, 24)):
            if args.quick:
                count = max(4, count // 4)
            for how in ("get", "read"):
                ks = [f"tp-{how}-{size}-{i}".encode() for i in range(count)]
                val = os.urandom(size)
                for k in ks:
                    ca.put(k, val)
                wait_located(ks)
                out = bytearray(size)
                t0 = time.perf_counter()
                for k in ks:
                    if how == "get":
                        view = cb.get(k)
                        assert len(view) == size
                        del view
                        cb.release(k)
                    else:
                        assert cb.read(k, out) == size
                dt = time.perf_counter() - t0
                gbs = size * count / dt / 1e9
                rows.append((f"{how} {size >> 10} KiB, cross-host", f"{gbs:.2f} GB/s",
                             f"{gbs / raw:.2f}x raw socket"))
                for k in ks:
                    ca.delete(k)
                    cb.delete(k)

        for size, label, how in ((1 << 20, "64 x 1 MiB", "get_many"), (1 << 20, "64 x 1 MiB", "read_many"),
                                 (4096, "64 x 4 KiB", "get_many"), (4096, "64 x 4 KiB", "read_many")):
            reps = 4 if args.quick else 16
            times = []
            for r in range(reps):
                ks = [f"batch-{how}-{size}-{r}-{i}".encode() for i in range(64)]
                val = os.urandom(size)
                for k in ks:
                    ca.put(k, val)
                wait_located(ks)
                t0 = time.perf_counter()
                got = getattr(cb, how)(ks)
                times.append(time.perf_counter() - t0)
                assert all(len(x) == size for x in got)
                del got
                if how == "get_many":
                    for k in ks:
                        cb.release(k)
                for k in ks:
                    ca.delete(k)
                    cb.delete(k)
            dt = statistics.median(times)
            if size >= 1 << 20:
                gbs = 64 * size / dt / 1e9
                rows.append((f"{how} {label}, cross-host", f"{gbs:.2f} GB/s", f"{gbs / raw:.2f}x raw socket"))
            else:
                rows.append((f"{how} {label}, cross-host", f"{64 / dt:,.0f} objects/s",
                             f"{dt * 1e3:.2f} ms per batch"))

        ks = [f"exist-{i}".encode() for i in range(64)]
        for k in ks:
            ca.put(k, b"x" * 100)
        wait_located(ks)
        ex = []
        for _ in range(50 if args.quick else 200):
            t0 = time.perf_counter()
            assert all(cb.contains_anywhere(ks))
            ex.append(time.perf_counter() - t0)
        rows.append(("contains_anywhere of 64 keys (cluster-wide)", f"{median_us(ex):.0f} µs median", ""))
        print("kvstore across hosts (two network namespaces, veth + bridge, MTU 65535)")
        print(f"  reference: raw socket, 1 stream sendall/recv_into   {raw:.2f} GB/s")
        print(f"  reference: os.sendfile from /dev/shm, {STREAMS} stream(s)   {sf:.2f} GB/s")
        for name, fig, rel in rows:
            print(f"  {name:<46} {fig:<26} {rel}")
        ca.close()
        cb.close()
    finally:
        if kv is not None:
            kv.destroy()
        cl.down()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
