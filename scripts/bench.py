#!/usr/bin/env python3
"""kvstore benchmark: put / get / contains / batched get latencies and bandwidths.

Starts its own daemon (a fresh data dir, discarded afterwards) unless --socket names a
running one, measures 4 KiB, 64 KiB, 1 MiB and 16 MiB values from one client, and
prints every figure beside this machine's memcpy bandwidth (np.copyto of 256 MiB)
measured in the same run. Speed belongs here, never in timed test asserts.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kvstore.client import Client  # noqa: E402

ROUNDS = 3
SIZES = [(4 << 10, "4 KiB"), (64 << 10, "64 KiB"), (1 << 20, "1 MiB"), (16 << 20, "16 MiB")]


def memcpy_bandwidth():
    src = np.ones(256 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return src.nbytes / statistics.median(times) / 1e9


def pct(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def timed(fn, items):
    out = []
    pc = time.perf_counter
    for it in items:
        t0 = pc()
        fn(it)
        out.append(pc() - t0)
    return out


def start_daemon(size, hugepages):
    tmp = tempfile.mkdtemp(prefix="kvbench-", dir="/dev/shm")   # the index on tmpfs, as advised
    sock = os.path.join(tmp, "kv.sock")
    args = [sys.executable, "-m", "kvstore.daemon", "--socket", sock, "--size", size,
            "--data-dir", os.path.join(tmp, "data"), "--discard-on-exit", "--log-level", "WARNING",
            "--high-watermark", "0.99", "--low-watermark", "0.98"]
    if hugepages:
        args += ["--hugepages", "require", "--reserve-hugepages"]
    proc = subprocess.Popen(args)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("bench: the daemon did not start")
        time.sleep(0.05)
    return proc, sock, tmp


def bench_size(c, nbytes, label, count):
    payload = np.random.default_rng(1).integers(0, 255, nbytes, dtype=np.uint8)
    keys = [f"bench-{nbytes}-{i}".encode() for i in range(count)]
    rows = []

    t_put = timed(lambda k: c.put(k, payload), keys)
    rows.append(("put", t_put, nbytes))
    dst = np.empty(nbytes, dtype=np.uint8)

    def get_copy(k):
        v = c.get(k)
        np.copyto(dst, np.frombuffer(v, dtype=np.uint8))
        c.release(k)
    batches = [keys[i:i + 64] for i in range(0, len(keys) - 63, 64)] or [keys[:64]]
    batches = (batches * (1 + 20 // len(batches)))[:max(20, len(batches))]
    t_get, t_rel, t_copy, t_has, t_batch, t_batch_rel = [], [], [], [], [], []
    pc = time.perf_counter
    for _ in range(ROUNDS):        # read-side figures: samples of several rounds pooled
        t_get += timed(c.get, keys)
        t_rel += timed(c.release, keys)
        t_copy += timed(get_copy, keys)
        t_has += timed(c.contains, keys)
        for b in batches:          # each batch is released before the next: no cached holds
            t0 = pc()
            c.get_many(b)
            t1 = pc()
            c.release_many(b)
            t_batch.append(t1 - t0)
            t_batch_rel.append(pc() - t1)
    rows += [("get (zero-copy)", t_get, None), ("release", t_rel, None),
             ("get + copy-out + release", t_copy, nbytes), ("contains", t_has, None),
             ("get_many(64)", t_batch, None), ("release_many(64)", t_batch_rel, None)]
    try:
        import torch  # noqa: F401  (the torch extra; the row is left out without it)
    except ImportError:
        torch = None
    if torch is not None:
        step = 4096 if nbytes >= 4096 else 1

        def tensor_touch(k):       # a typed view (its own mapping) with every page read
            t = c.get_tensor(k)
            int(t[::step].sum())
            del t
            c.release(k)
        t_tensor = []
        for _ in range(ROUNDS):
            t_tensor += timed(tensor_touch, keys)
        rows.append(("get_tensor + touch + release", t_tensor, None))
    for k in keys:
        c.delete(k)
    puts_per_s = len(keys) / sum(t_put)
    objs_per_s = 64 * len(t_batch) / sum(t_batch)
    return rows, puts_per_s, objs_per_s


def bench_recovery(size, counts, obj_bytes):
    """Recovery time (dead clients dropped, extents checked, every object's checksum
    verified, the published index rebuilt) after a daemon SIGKILL, for growing numbers
    of objects: should grow about linearly."""
    import re
    import signal
    print(f"{obj_bytes}-byte objects")
    print(f"{'objects':>8} {'recovery':>10} {'per object':>11} {'start to ready':>15}")
    for n in counts:
        proc, sock, tmp = start_daemon(size, False)
        try:
            c = Client(sock)
            payload = b"r" * obj_bytes
            for lo in range(0, n, 10000):
                hi = min(n, lo + 10000)
                c.put_many([b"rec-%d" % i for i in range(lo, hi)], [payload] * (hi - lo))
            while c.stats()["objects"] < n:      # every seal applied before the kill
                time.sleep(0.05)
            c.close()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            log = os.path.join(tmp, "restart.log")
            with open(log, "w") as f:
                args = [sys.executable, "-m", "kvstore.daemon", "--socket", sock, "--size", size,
                        "--data-dir", os.path.join(tmp, "data"), "--discard-on-exit"]
                t0 = time.monotonic()
                proc = subprocess.Popen(args, stderr=f)
            while "ready" not in open(log).read():
                time.sleep(0.01)
            wall = time.monotonic() - t0          # interpreter start, index check, recovery
            m = re.search(r"recovered (\d+) objects .* in ([\d.]+) s", open(log).read())
            secs = float(m.group(2))
            print(f"{int(m.group(1)):>8} {secs:>9.3f}s {secs / n * 1e6:>9.1f}us {wall:>14.3f}s")
        finally:
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(tmp, ignore_errors=True)


def bench_mooncake(sock, mem, quick):
    """The same sizes through the Mooncake-compatible facade: put_from / get_into on
    registered buffers (one copy each way), get_into from a second process, put / get
    of bytes, and batch_put_from / batch_get_into of 16 keys."""
    from kvstore.client.mooncake import MooncakeDistributedStore
    s = MooncakeDistributedStore()
    if s.setup({"master_server_address": sock}) != 0:
        sys.exit(f"bench: setup failed: {s.last_error}")
    print(f"{'size':>7} {'facade operation':<26} {'median':>10} {'p99':>10} {'GB/s':>7} {'x memcpy':>8}")
    for nbytes, label in SIZES:
        budget = (256 << 20) if quick else (1 << 30)
        count = max(64, min(2000 if not quick else 500, budget // nbytes))
        src = np.random.default_rng(2).integers(0, 255, nbytes * 16, dtype=np.uint8)
        dst = np.zeros(nbytes * 16, dtype=np.uint8)
        dst.fill(1)                      # fault the pages in now, not in the first timed copy
        for a in (src, dst):
            assert s.register_buffer(a.ctypes.data, a.nbytes) == 0
        sp, dp = src.ctypes.data, dst.ctypes.data
        keys = [f"mc-{nbytes}-{i}" for i in range(count)]
        rows = [("put_from", timed(lambda k: s.put_from(k, sp, nbytes), keys), nbytes)]
        t_get = []
        for _ in range(ROUNDS):
            t_get += timed(lambda k: s.get_into(k, dp, nbytes), keys)
        rows.append(("get_into", t_get, nbytes))
        other = subprocess.run([sys.executable, __file__, "--mooncake-reader", sock, str(nbytes), str(count)],
                               capture_output=True, text=True, check=True)
        rows.append(("get_into, other process", [float(x) for x in other.stdout.split()], nbytes))
        for k in keys:
            s.remove(k)
        n_bytes_keys = min(count, 200)
        payload = bytes(src[:nbytes])
        rows.append(("put (bytes)", timed(lambda k: s.put(k, payload), keys[:n_bytes_keys]), nbytes))
        rows.append(("get (bytes)", timed(s.get, keys[:n_bytes_keys]), nbytes))
        for k in keys[:n_bytes_keys]:
            s.remove(k)
        batches = [keys[i:i + 16] for i in range(0, min(count, 320) - 15, 16)]
        ptrs, dptrs, sizes = [sp + i * nbytes for i in range(16)], [dp + i * nbytes for i in range(16)], [nbytes] * 16
        rows.append(("batch_put_from(16)", timed(lambda b: s.batch_put_from(b, ptrs, sizes), batches), 16 * nbytes))
        rows.append(("batch_get_into(16)", timed(lambda b: s.batch_get_into(b, dptrs, sizes), batches), 16 * nbytes))
        assert np.array_equal(dst, src), "batch_get_into returned other bytes"
        for b in batches:
            for k in b:
                s.remove(k)
        for name, samples, gb_bytes in rows:
            med = statistics.median(samples)
            gbs = gb_bytes / med / 1e9
            print(f"{label:>7} {name:<26} {med * 1e6:8.1f}us {pct(samples, .99) * 1e6:8.1f}us "
                  f"{gbs:7.2f} {gbs / mem:8.2f}")
        for a in (src, dst):
            s.unregister_buffer(a.ctypes.data)
    s.close()


def mooncake_reader(sock, nbytes, count):
    """--mooncake-reader: get_into of keys another process stored; prints the timings."""
    from kvstore.client.mooncake import MooncakeDistributedStore
    s = MooncakeDistributedStore()
    assert s.setup({"master_server_address": sock}) == 0
    dst = np.empty(nbytes, dtype=np.uint8)
    assert s.register_buffer(dst.ctypes.data, dst.nbytes) == 0
    keys = [f"mc-{nbytes}-{i}" for i in range(count)]
    t = []
    for _ in range(ROUNDS):
        t += timed(lambda k: s.get_into(k, dst.ctypes.data, nbytes), keys)
    print(" ".join(f"{x:.9f}" for x in t))
    s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", help="use a running daemon instead of starting one")
    ap.add_argument("--size", default="3GiB", help="segment size of the daemon started here")
    ap.add_argument("--hugepages", action="store_true", help="start the daemon on huge pages (root)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke run)")
    ap.add_argument("--recovery", action="store_true",
                    help="measure restart recovery after a daemon SIGKILL for growing object counts")
    ap.add_argument("--recovery-counts", default="1000,10000,100000,1000000",
                    help="object counts for --recovery (comma-separated)")
    ap.add_argument("--recovery-bytes", type=int, default=1024, help="object size for --recovery")
    ap.add_argument("--mooncake-api", action="store_true",
                    help="the same sizes through the Mooncake-compatible facade (put_from / get_into)")
    ap.add_argument("--mooncake-reader", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--cluster", action="store_true",
                    help="cross-host figures between two network namespaces (scripts/bench_cluster.py; root)")
    args = ap.parse_args()

    if args.cluster:
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, os.path.join(here, "bench_cluster.py")] + (["--quick"] if args.quick else [])
        os.execv(sys.executable, cmd)

    if args.mooncake_reader:
        sock, nbytes, count = args.mooncake_reader
        return mooncake_reader(sock, int(nbytes), int(count))
    if args.recovery:
        return bench_recovery(args.size, [int(x) for x in args.recovery_counts.split(",")],
                              args.recovery_bytes)
    proc = tmp = None
    sock = args.socket
    if sock is None:
        proc, sock, tmp = start_daemon(args.size, args.hugepages)
    try:
        c = Client(sock)
        mem = memcpy_bandwidth()
        print(f"kvstore bench  segment: {c.backing}, {c.segment_size >> 20} MiB  "
              f"memcpy (np.copyto 256 MiB): {mem:.1f} GB/s")
        if args.mooncake_api:
            c.close()
            return bench_mooncake(sock, mem, args.quick)
        print(f"{'size':>7} {'operation':<26} {'median':>10} {'p99':>10} {'GB/s':>7} {'x memcpy':>8}")
        for nbytes, label in SIZES:
            budget = (256 << 20) if args.quick else (1 << 30)
            count = max(64, min(5000 if not args.quick else 500, budget // nbytes))
            rows, puts_per_s, objs_per_s = bench_size(c, nbytes, label, count)
            for name, samples, gb_bytes in rows:
                med = statistics.median(samples)
                if name.endswith("(64)"):
                    extra = f"{64 / med / 1e3:7.0f}k objects/s"
                    print(f"{label:>7} {name:<26} {med * 1e6:8.1f}us {pct(samples, .99) * 1e6:8.1f}us  {extra}")
                    continue
                gbs = gb_bytes / med / 1e9 if gb_bytes else None
                gb_col = f"{gbs:7.2f} {gbs / mem:8.2f}" if gbs else f"{'':7} {'':8}"
                print(f"{label:>7} {name:<26} {med * 1e6:8.1f}us {pct(samples, .99) * 1e6:8.1f}us {gb_col}")
            print(f"{label:>7} {'puts/s, one client':<26} {puts_per_s / 1e3:8.1f}k   "
                  f"get_many objects/s: {objs_per_s / 1e3:.0f}k")
        c.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
