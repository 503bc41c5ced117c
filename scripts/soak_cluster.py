#!/usr/bin/env python3
"""Fault-injection soak across hosts (``scripts/soak.py --cluster``; root).

Three hosts as network namespaces with a real etcd (tests/clusterlib.py) and a kvstore
daemon on each. Writers put on host a (every value derived from its key, logged once
put() returned); readers on hosts b and c get random logged keys, which their daemons
pull from a (or from whoever holds a replica). At random moments: a daemon is SIGKILLed
and restarted on its data, a client is SIGKILLed and respawned, a host's link is cut
for 1-3 s, etcd is restarted. During faults a reader may meet a miss or a typed
transfer error (counted as "unavailable", never as a pass); it must never meet wrong
bytes. Readers drop their host's replica of a third of what they verified, so pulls
across hosts go on for the whole run, not only until every host has a copy. At the end, with every fault healed and every daemon up, every logged key must
read back intact from hosts b and c (lost and corrupted must be 0), and each daemon,
once the soak's clients are gone, must hold nothing for them and pass verify() (leaked
must be 0). Exit status 1 otherwise.
"""

import argparse
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from soak import _logged_keys, payload, size_of, writer  # noqa: E402


def reader(slot, sock, logdir, ops, verified, unavailable, corrupted, stop_at):
    from kvstore.client import Client
    from kvstore.errors import KVStoreError
    c = Client(sock, reconnect_timeout=60, timeout=10)
    rng = random.Random(slot)
    keys, refreshed = [], 0.0
    while time.time() < stop_at:
        if time.monotonic() - refreshed > 1.0:
            keys, refreshed = _logged_keys(logdir), time.monotonic()
        if not keys:
            time.sleep(0.05)
            continue
        batch = [rng.choice(keys) for _ in range(rng.choice((1, 1, 4, 16)))]
        try:
            got = c.read_many(batch, errors="return")
        except KVStoreError:
            unavailable[slot] += len(batch)
            continue
        for k, v in zip(batch, got):
            if v is None or isinstance(v, Exception):
                unavailable[slot] += 1
            elif v == payload(k, size_of(k)):
                verified[slot] += 1
                if rng.random() < 0.3:         # drop this host's replica: the next read pulls again
                    try:
                        c.delete(k)
                    except KVStoreError:
                        pass
            else:
                corrupted[slot] += 1
        ops[slot] += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--readers", type=int, default=2, help="per reading host (b and c)")
    ap.add_argument("--size", default="256MiB", help="segment size of each daemon")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("soak --cluster makes network namespaces: run it as root")
    from clusterlib import Cluster, unavailable_reason
    from kvcluster import KV
    why = unavailable_reason()
    if why:
        sys.exit(f"soak --cluster: {why}")
    from kvstore.sizes import parse_size
    rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="kvsoak-cluster-")
    logdir = os.path.join(tmp, "keys")
    os.makedirs(logdir)
    cl = Cluster(3).up()
    kv = None
    workers = {}
    try:
        kv = KV(cl, tmp, 3, size=args.size, extra=("--log-level", "INFO", "--high-watermark", "1.0",
                                                   "--low-watermark", "0.99"))
        kv.start()
        ctx = mp.get_context("spawn")
        slots = args.writers + 2 * args.readers
        # 40% of a segment in all: b and c keep a replica of whatever they read
        budget = ctx.RawArray("q", [int(parse_size(args.size) * 0.4) // max(1, args.writers)] * slots)
        ops, verified, unavailable, corrupted = (ctx.RawArray("q", slots) for _ in range(4))
        max_wait = ctx.RawArray("d", slots)
        stop_at = time.time() + args.seconds
        gens = {}
        readers_of = {}
        for i in range(args.readers):
            readers_of[("r", i)] = "b"
            readers_of[("r", args.readers + i)] = "c"

        def spawn(kind, i):
            if kind == "w":
                gens[i] = gens.get(i, -1) + 1
                return ctx.Process(target=writer, args=(i, gens[i], kv["a"].socket, logdir, budget, ops,
                                                        max_wait, stop_at))
            host = readers_of[(kind, i)]
            return ctx.Process(target=reader, args=(args.writers + i, kv[host].socket, logdir, ops, verified,
                                                    unavailable, corrupted, stop_at))
        for i in range(args.writers):
            workers[("w", i)] = spawn("w", i)
        for key in readers_of:
            workers[key] = spawn(*key)
        for p in workers.values():
            p.start()
        faults = {"daemon kills": 0, "client kills": 0, "link cuts": 0, "etcd restarts": 0}
        while time.time() < stop_at - 4:
            time.sleep(rng.uniform(1.0, 4.0))
            if time.time() >= stop_at - 4:
                break
            r = rng.random()
            if r < 0.3:
                d = kv[rng.choice("abc")]
                d.kill()
                time.sleep(rng.uniform(0.1, 1.0))
                d.start()
                faults["daemon kills"] += 1
            elif r < 0.6:
                who = rng.choice(list(workers))
                workers[who].kill()
                workers[who].join()
                workers[who] = spawn(*who)
                workers[who].start()
                faults["client kills"] += 1
            elif r < 0.85:
                host = rng.choice("abc")
                cl.cut(host)
                time.sleep(rng.uniform(1.0, 3.0))
                cl.heal(host)
                faults["link cuts"] += 1
            else:
                cl.stop_etcd()
                time.sleep(rng.uniform(1.0, 3.0))
                cl.start_etcd()
                faults["etcd restarts"] += 1
        for p in workers.values():
            p.join(max(1.0, stop_at - time.time() + 30))
            if p.is_alive():
                p.kill()
                p.join()
        # Final account: every fault healed, every daemon up, the soak's clients gone.
        kv.wait_members(3, timeout=30)
        keys = _logged_keys(logdir)
        lost = bad = 0
        why_lost = []
        from kvstore.errors import KVStoreError
        for host in "bc":
            with kv[host].client(timeout=30) as c:
                deadline = time.monotonic() + 30
                todo = list(keys)
                while todo and time.monotonic() < deadline:    # records travel asynchronously
                    found = []
                    for i in range(0, len(todo), 256):
                        found += c.contains_anywhere(todo[i:i + 256])
                    todo = [k for k, f in zip(todo, found) if not f]
                    if todo:
                        time.sleep(0.5)
                for i in range(0, len(keys), 64):
                    batch = keys[i:i + 64]
                    try:
                        got = c.read_many(batch, errors="return")
                    except KVStoreError as e:
                        got = [e] * len(batch)
                    for k, v in zip(batch, got):
                        if v is None or isinstance(v, Exception):
                            lost += 1
                            if len(why_lost) < 5:
                                why_lost.append(f"{host}: {k}: {v!r}")
                        elif v != payload(k, size_of(k)):
                            bad += 1
        leaked, problems = 0, []
        for h, d in kv.d.items():
            with d.client() as c:
                deadline = time.monotonic() + 10
                while True:
                    st = c.stats()
                    if st["creating"] == 0 and st["held_extents"] == 0:
                        break
                    if time.monotonic() > deadline:
                        leaked += 1
                        problems.append(f"{h}: creating {st['creating']}, held {st['held_extents']}")
                        break
                    time.sleep(0.1)
                problems += [f"{h}: {p}" for p in c.verify()[:3]]
        fetched = sum(d.cluster_stats().get("fetched", 0) for d in kv.d.values())   # since restarts
        failures = {}
        for d in kv.d.values():
            for k, v in d.cluster_stats().items():
                if k.endswith("_failures"):
                    failures[k] = failures.get(k, 0) + v
        print(f"soak --cluster: {args.seconds:.0f} s, 3 hosts, {args.writers} writers on a, "
              f"{args.readers} readers on each of b and c, segments {args.size}")
        print(f"  operations done        {sum(ops)}")
        print("  faults                 " + ", ".join(f"{v} {k}" for k, v in faults.items()))
        print(f"  objects verified       {sum(verified)} reads during the run, {len(keys)} logged keys "
              f"read back on b and c at the end")
        print(f"  unavailable reads      {sum(unavailable)} (a miss or a typed error during a fault)")
        print(f"  cross-host pulls       {fetched}; failed transfers by stage {failures or 'none'}")
        print(f"  objects lost           {lost}" + (f" (e.g. {'; '.join(why_lost)})" if why_lost else ""))
        print(f"  objects corrupted      {bad + sum(corrupted)}")
        print(f"  bytes leaked           {leaked}" + (f" ({'; '.join(problems)})" if problems else ""))
        ok = lost == 0 and bad + sum(corrupted) == 0 and leaked == 0 and not problems
        if not ok:
            for h, d in kv.d.items():
                lines = [ln for ln in d.read_log().splitlines() if " WARNING " in ln or " ERROR " in ln]
                print(f"  daemon {h}: warnings and errors (last 15):")
                for ln in lines[-15:]:
                    print("    " + ln[:300])
        return 0 if ok else 1
    finally:
        for p in workers.values():
            if p.is_alive():
                p.kill()
        if kv is not None:
            kv.destroy()
        cl.down()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
