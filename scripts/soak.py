#!/usr/bin/env python3
"""Fault-injection soak: writers and readers against a daemon that keeps getting killed.

Runs N writer and M reader processes for a given time with random value sizes, and at
random moments SIGKILLs the daemon (restarting it on the same data dir) or a random
client (respawning it). Every value is derived from its key, so any reader can verify
it. Writers log each key once put() has returned; at the end every logged key must
read back intact. Reports operations, daemon restarts, objects verified, lost (must be
0), corrupted (must be 0), bytes leaked once every client is gone (must be 0) and the
longest time one client call waited (for the daemon to come back). Exit status 1 if
anything was lost, corrupted or leaked.
"""

import argparse
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

SIZES = (1, 512, 4096, 65536, 262144)


def payload(key, size):
    seed = hashlib.blake2b(key.encode(), digest_size=64).digest()
    return (seed * (size // 64 + 1))[:size]


def size_of(key):
    return SIZES[int(hashlib.md5(key.encode()).hexdigest(), 16) % len(SIZES)]


# Counters are lock-free arrays with one slot per worker, written only by that worker
# (and its respawned successor): a worker SIGKILLed while holding a shared lock would
# otherwise deadlock everyone who reads the counter.

def writer(wid, gen, sock, logdir, budget, ops, max_wait, stop_at):
    from kvstore.client import Client
    from kvstore.errors import StoreFull, StoreUnavailable
    c = Client(sock, reconnect_timeout=60)
    log = open(os.path.join(logdir, f"w{wid}-{gen}.keys"), "a", buffering=1)
    n = 0
    while time.time() < stop_at:
        key = f"w{wid}-{gen}-{n}"
        n += 1
        size = size_of(key)
        if budget[wid] < size:
            break
        budget[wid] -= size
        t0 = time.monotonic()
        try:
            c.put(key, payload(key, size))
        except (StoreFull, StoreUnavailable):
            continue
        max_wait[wid] = max(max_wait[wid], time.monotonic() - t0)
        log.write(key + "\n")
        ops[wid] += 1
    while time.time() < stop_at:
        time.sleep(0.1)


def _logged_keys(logdir):
    keys = []
    for name in os.listdir(logdir):
        with open(os.path.join(logdir, name)) as f:
            keys += [line.strip() for line in f if line.endswith("\n")]
    return keys


def reader(slot, sock, logdir, ops, verified, corrupted, max_wait, stop_at):
    from kvstore.client import Client
    from kvstore.errors import StoreUnavailable
    c = Client(sock, reconnect_timeout=60)
    rng = random.Random(slot)
    keys, refreshed = [], 0.0
    while time.time() < stop_at:
        if time.monotonic() - refreshed > 1.0:
            keys, refreshed = _logged_keys(logdir), time.monotonic()
        if not keys:
            time.sleep(0.05)
            continue
        key = rng.choice(keys)
        t0 = time.monotonic()
        try:
            v = c.get(key)
        except StoreUnavailable:
            continue
        max_wait[slot] = max(max_wait[slot], time.monotonic() - t0)
        if v is not None:
            if bytes(v) == payload(key, size_of(key)):
                verified[slot] += 1
            else:
                corrupted[slot] += 1
            c.release(key)
        ops[slot] += 1


def start_daemon(sock, data_dir, size, log):
    from kvstore.retry import Backoff
    p = subprocess.Popen([sys.executable, "-m", "kvstore.daemon", "--socket", sock, "--size", size,
                          "--data-dir", data_dir, "--high-watermark", "1.0", "--low-watermark", "0.99",
                          "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wait = Backoff(initial=0.02, cap=0.02, deadline=30)     # a steady poll: the restart time is measured
    while not os.path.exists(sock):
        if p.poll() is not None:
            sys.exit(f"soak: the daemon exited with {p.returncode}")
        if not wait.sleep():
            break           # not up after 30 s: the clients' reconnect waits will show it
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--size", default="512MiB", help="segment size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cluster", action="store_true",
                    help="across three hosts in network namespaces (scripts/soak_cluster.py; root)")
    args, rest = ap.parse_known_args()
    if args.cluster:
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "soak_cluster.py"),
               "--seconds", str(args.seconds), "--seed", str(args.seed), *rest]
        os.execv(sys.executable, cmd)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="kvsoak-", dir="/dev/shm")
    sock, data_dir, logdir = os.path.join(tmp, "kv.sock"), os.path.join(tmp, "data"), os.path.join(tmp, "keys")
    os.makedirs(logdir)
    dlog = open(os.path.join(tmp, "daemon.log"), "ab")
    ctx = mp.get_context("spawn")
    from kvstore.sizes import parse_size
    slots = args.writers + args.readers          # writers use slots 0.., readers after them
    # 60% of the segment in all: no eviction is ever needed, so every logged key must survive
    budget = ctx.RawArray("q", [int(parse_size(args.size) * 0.6) // max(1, args.writers)] * slots)
    ops, verified, corrupted = (ctx.RawArray("q", slots) for _ in range(3))
    max_wait = ctx.RawArray("d", slots)
    stop_at = time.time() + args.seconds
    daemon = start_daemon(sock, data_dir, args.size, dlog)
    restarts = client_kills = 0
    gens = {}

    def spawn(kind, i):
        if kind == "w":
            gens[i] = gens.get(i, -1) + 1
            return ctx.Process(target=writer, args=(i, gens[i], sock, logdir, budget, ops, max_wait, stop_at))
        return ctx.Process(target=reader, args=(args.writers + i, sock, logdir, ops, verified, corrupted,
                                                max_wait, stop_at))
    workers = {("w", i): spawn("w", i) for i in range(args.writers)}
    workers.update({("r", i): spawn("r", i) for i in range(args.readers)})
    for p in workers.values():
        p.start()
    try:
        while time.time() < stop_at - 2:
            time.sleep(rng.uniform(1.0, 4.0))
            if time.time() >= stop_at - 2:
                break
            if rng.random() < 0.5:
                daemon.send_signal(signal.SIGKILL)
                daemon.wait()
                time.sleep(rng.uniform(0.1, 1.0))
                daemon = start_daemon(sock, data_dir, args.size, dlog)
                restarts += 1
            else:
                who = rng.choice(list(workers))
                workers[who].kill()
                workers[who].join()
                workers[who] = spawn(*who)
                workers[who].start()
                client_kills += 1
        for p in workers.values():
            p.join(max(1.0, stop_at - time.time() + 30))
            if p.is_alive():
                p.kill()
                p.join()
        # Final account, with every soak client gone.
        from kvstore.client import Client
        from kvstore.retry import Backoff
        keys = _logged_keys(logdir)
        lost = bad = 0
        with Client(sock) as c:
            for k in keys:
                v = c.get(k)
                if v is None:
                    lost += 1
                    continue
                bad += bytes(v) != payload(k, size_of(k))
                c.release(k)
            wait = Backoff(initial=0.05, cap=0.5, deadline=10)
            while True:                                  # the daemon cleans up dead clients
                st = c.stats()
                if st["clients"] == 1 and st["creating"] == 0 and st["held_extents"] == 0 and not st["doomed"]:
                    break
                if not wait.sleep():
                    break           # still busy after 10 s: the report below shows what is left
            # verify(): every extent is an object's, a doomed one, an arena's unused tail or
            # free, exactly once, and the used counter agrees: a leaked byte is a problem
            problems = c.verify()
            leaked = 0 if not problems else st["used"]
        print(f"soak: {args.seconds:.0f} s, {args.writers} writers, {args.readers} readers, segment {args.size}")
        print(f"  operations done        {sum(ops)}")
        print(f"  daemon restarts        {restarts} (SIGKILL)")
        print(f"  clients killed         {client_kills} (SIGKILL, respawned)")
        print(f"  objects verified       {sum(verified)} reads during the run, {len(keys) - lost - bad} of {len(keys)} logged keys at the end")
        print(f"  objects lost           {lost}")
        print(f"  objects corrupted      {bad + sum(corrupted)}")
        print(f"  bytes leaked           {leaked} (creating {st['creating']}, held {st['held_extents']}, doomed {st['doomed']})")
        print(f"  index consistent       {'yes' if not problems else problems[0]}")
        print(f"  longest client wait    {max(max_wait):.2f} s")
        dlog.flush()
        with open(os.path.join(tmp, "daemon.log"), errors="replace") as f:
            rebuilt = [ln.rstrip() for ln in f if "was damaged" in ln]
        # a SIGKILL must never damage the index: a rebuild here is a bug to chase (what
        # was queued survives it, but the clients lose their holds), so say why it happened
        print(f"  index rebuilds         {len(rebuilt)}" + (f" (first: {rebuilt[0][:300]})" if rebuilt else ""))
        ok = lost == 0 and bad + sum(corrupted) == 0 and leaked == 0 and not problems \
            and st["creating"] == 0 and st["held_extents"] == 0
        if not ok:                  # the daemon's own account of the run, before tmp goes
            dlog.flush()
            with open(os.path.join(tmp, "daemon.log"), errors="replace") as f:
                lines = [ln for ln in f if " WARNING " in ln or " ERROR " in ln]
            print("  daemon warnings and errors (last 40):")
            for ln in lines[-40:]:
                print("    " + ln.rstrip()[:300])
        return 0 if ok else 1
    finally:
        for p in workers.values():
            if p.is_alive():
                p.kill()
        daemon.terminate()
        daemon.wait(30)
        subprocess.run([sys.executable, "-m", "kvstore.daemon", "--data-dir", data_dir, "--destroy"],
                       capture_output=True, cwd=ROOT)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
