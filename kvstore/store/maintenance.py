"""The daemon's own upkeep of the store: clients that come and go, space that comes back,
recovery after a restart, and the consistency check.

Owns: registering and dropping clients (a dropped client's creations are reclaimed, its
arenas' unused space freed; its holds are scrubbed by the caller in kvstore.slots),
reclaiming doomed extents once no hold names them, the watermark sweep, initialising a
fresh index, reading every record at once for recovery (checksums verified, then the
published table built in one vectorised pass), and ``check``: do objects, doomed
extents, arena tails and free extents tile the segment exactly, and does the published
table show exactly the committed records.
Runs only in the daemon, between its requests (kvstore.store.objects has those).
Must never: free an extent a hold table names, or drop a live client's state.
"""

import json

import numpy as np
import xxhash

from kvstore import checksum, record, table as table_mod
from kvstore.record import State

from . import allocator
from .schema import ARENA, LE64, SCHEMA, TABLES, U64, pack64

extent_size = allocator.extent_size


def pid_start_time(pid):
    """The kernel's start time of a process (to tell a reused pid), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()
    if fields[0] in (b"Z", b"X"):        # exited, not yet reaped: gone for us
        return None
    return int(fields[19])


def init_fresh(env, segment_size, info):
    """Forget everything and describe an empty segment (info: segment_id, segment_path,
    backing, slots_path, table_path, incarnation)."""
    with env.write() as txn:
        for name in TABLES:
            txn.drop(getattr(env.dbs, name), delete=False)
        env.set_meta(txn, "schema", str(SCHEMA))
        env.set_meta(txn, "size", segment_size)
        env.set_meta(txn, "used", 0)
        env.set_meta(txn, "lru_bytes", 0)
        env.set_meta(txn, "next_cid", 1)
        for k, v in info.items():
            env.set_meta(txn, k, v)
        allocator.init(txn, env.dbs, segment_size)


def set_meta(env, **values):
    with env.write() as txn:
        for k, v in values.items():
            env.set_meta(txn, k, v)


# ---- clients ---------------------------------------------------------------------------------
def register_client(env, pid, namespace, slot):
    with env.write() as txn:
        cid = env.meta_int(txn, "next_cid")
        env.set_meta(txn, "next_cid", cid + 1)
        info = {"pid": pid, "start": pid_start_time(pid), "namespace": namespace, "slot": slot}
        txn.put(pack64(cid), json.dumps(info).encode(), db=env.dbs.clients)
    return cid


def clients(env):
    with env.read() as txn:
        return {U64.unpack(k)[0]: json.loads(v) for k, v in txn.cursor(db=env.dbs.clients)}


def dead_clients(env):
    """{cid: info} of registered clients whose process is gone (pid gone or reused)."""
    return {cid: info for cid, info in clients(env).items()
            if pid_start_time(info["pid"]) != info["start"]}


def drop_client(store, b, cid):
    """Undo what a gone client left in the index: its unsealed creations and the unused
    space of its arenas. Returns (creations reclaimed, arena bytes freed)."""
    txn, d = b.txn, store.dbs
    prefix = pack64(cid)
    creating = []
    cur = txn.cursor(db=d.creating)
    if cur.set_range(prefix):
        while cur.key()[:8] == prefix:
            creating.append(cur.key()[8:])
            cur.delete()
    reclaimed = 0
    for key in creating:
        raw = txn.get(key, db=d.objects)
        if raw is not None:
            rec = record.unpack(raw)
            if rec.state == State.CREATING and rec.creator == cid:
                store._drop(b, key, rec)
                reclaimed += 1
    arenas = [(k, ARENA.unpack(v)) for k, v in txn.cursor(db=d.arenas)]
    freed = 0
    for k, (owner, end, frontier) in arenas:
        if owner == cid:
            txn.delete(k, db=d.arenas)
            if end > frontier:
                store._free(txn, frontier, end - frontier)
                freed += end - frontier
    txn.delete(prefix, db=d.clients)
    return reclaimed, freed


# ---- space -----------------------------------------------------------------------------------
def doomed_count(env):
    with env.read() as txn:
        return txn.stat(env.dbs.doomed)["entries"]


def reclaim(store, b):
    """Free doomed extents that no client holds any more. Returns how many."""
    txn, d = b.txn, store.dbs
    doomed = [(U64.unpack(k)[0], LE64.unpack(v)[0]) for k, v in txn.cursor(db=d.doomed)]
    if not doomed:
        return 0
    held = b.held(rescan=True)
    n = 0
    for off, ext in doomed:
        if off not in held:
            txn.delete(pack64(off), db=d.doomed)
            store._free(txn, off, ext)
            n += 1
    return n


def used(env):
    with env.read() as txn:
        return env.meta_int(txn, "used")


def stats(env):
    with env.read() as txn:
        d = env.dbs
        return {"size": env.meta_int(txn, "size"), "used": env.meta_int(txn, "used"),
                "objects": txn.stat(d.objects)["entries"], "evictable": txn.stat(d.lru)["entries"],
                "creating": txn.stat(d.creating)["entries"], "doomed": txn.stat(d.doomed)["entries"],
                "clients": txn.stat(d.clients)["entries"], "arenas": txn.stat(d.arenas)["entries"],
                "free_extents": txn.stat(d.free_off)["entries"]}


# ---- recovery --------------------------------------------------------------------------------
def load_records(env):
    """(keys, records as a structured array) of every object, in key order (two C-level
    walks of the table: a million records take a fraction of a second)."""
    with env.read() as txn:
        keys = list(txn.cursor(db=env.dbs.objects).iternext(keys=True, values=False))
        raw = b"".join(txn.cursor(db=env.dbs.objects).iternext(keys=False, values=True))
    recs = np.frombuffer(raw, dtype=RECORD_DTYPE) if raw else np.empty(0, RECORD_DTYPE)
    return keys, recs


RECORD_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u8"), ("creator", "<u8"), ("stamp", "<u8"),
                         ("checksum", "<u8"), ("state", "u1"), ("flags", "u1"), ("replicas", "<u2"),
                         ("incarnation", "<u4")])
assert RECORD_DTYPE.itemsize == record.PACKED_SIZE


def corrupt_objects(view, keys, recs):
    """Indices of sealed objects whose bytes no longer match their checksum."""
    h, big = xxhash.xxh3_64_intdigest, checksum.CHUNK
    idx = np.flatnonzero(recs["state"] == State.SEALED)
    offs, sizes = recs["offset"][idx].tolist(), recs["size"][idx].tolist()
    if sizes and max(sizes) <= big:
        got = [h(view[o:o + n]) for o, n in zip(offs, sizes)]
    else:
        got = [checksum.checksum(view[o:o + n]) for o, n in zip(offs, sizes)]
    bad = np.asarray(got, dtype=np.uint64) != recs["checksum"][idx]
    return idx[bad].tolist()


def fill_table(table, keys, recs):
    """Publish every record at once into an empty table. False if it needs more room."""
    lo, hi = table_mod.digests(keys)
    return table.fill(lo, hi, recs["state"], recs["flags"], recs["offset"], recs["size"],
                      recs["checksum"], recs["creator"])


# ---- consistency -----------------------------------------------------------------------------
def check_extents(env, recs=None):
    """Problems with the space: extents of objects, doomed extents, arena tails and free
    space must tile the segment exactly once, and the used counter must agree.
    Vectorised: a million objects take a fraction of a second."""
    d = env.dbs
    if recs is None:
        recs = load_records(env)[1]
    with env.read() as txn:
        size = env.meta_int(txn, "size")
        used_ctr = env.meta_int(txn, "used")
        free = allocator.free_extents(txn, d)
        other = [(U64.unpack(k)[0], LE64.unpack(v)[0]) for k, v in txn.cursor(db=d.doomed)]
        for k, v in txn.cursor(db=d.arenas):
            owner, end, frontier = ARENA.unpack(v)
            if end > frontier:
                other.append((frontier, end - frontier))
    obj_len = np.maximum(np.uint64(allocator.ALIGN),
                         (recs["size"] + np.uint64(allocator.ALIGN - 1)) & ~np.uint64(allocator.ALIGN - 1))
    offs = np.concatenate([recs["offset"], np.array([o for o, _ in free + other], np.uint64)])
    lens = np.concatenate([obj_len, np.array([l for _, l in free + other], np.uint64)])
    problems = []
    order = np.argsort(offs, kind="stable")
    offs, lens = offs[order].astype(np.int64), lens[order].astype(np.int64)
    ends = offs + lens
    expect = np.concatenate([[0], ends[:-1]])
    bad = np.flatnonzero(offs != expect)
    for i in bad[:5].tolist():
        problems.append(f"an extent at {int(offs[i])}, expected one at {int(expect[i])}")
    end = int(ends[-1]) if len(ends) else 0
    if end != size & ~(allocator.ALIGN - 1):
        problems.append(f"extents end at {end}, segment usable size {size}")
    busy = int(obj_len.sum()) + sum(l for _, l in other)
    if busy != used_ctr:
        problems.append(f"used counter {used_ctr} != allocated {busy}")
    return problems


def check(store):
    """check_extents, and the published table shows exactly the committed records."""
    keys, recs = load_records(store.env)
    problems = check_extents(store.env, recs)
    t = store.table
    live = t.entries()
    if len(live) != len(keys):
        problems.append(f"the published table shows {len(live)} objects, the index has {len(keys)}")
    for k, r in zip(keys, recs):
        b = t.find(k)
        if b is None:
            problems.append(f"{k!r} is not published")
        else:
            e = t.buckets[b]
            if (int(e["offset"]), int(e["size"]), int(e["checksum"]), int(e["state"])) != \
                    (int(r["offset"]), int(r["size"]), int(r["checksum"]), int(r["state"])):
                problems.append(f"{k!r} is published with other fields")
        if len(problems) > 20:
            break
    return problems

