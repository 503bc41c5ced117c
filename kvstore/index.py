"""The object index: an LMDB environment beside the segment, shared by the daemon and
every client process.

Owns: the schema and every transaction on it. Object records (key -> offset, size,
creator, CLOCK stamp, xxh3-64 checksum computed by the sealing client, state, flags), hold counts, creations in progress,
doomed extents (deleted while held), registered clients and store-wide counters.
Clients run these transactions themselves (LMDB's robust writer lock serialises them
across processes, and a writer killed mid-transaction leaves no trace), so a get or a
put needs no round trip to the daemon; the daemon runs the ones that clean up after
dead clients and keep usage under the high watermark.

Tables (byte keys; integers big-endian so LMDB order is numeric order):
  objects      key -> record
  lru          stamp(8) + key -> ''             sealed, unpinned objects, CLOCK order
  holders      offset(8) -> cid(8) * n          the clients holding that extent (each
                                                once: clients count repeats locally)
  creating     cid(8) + key -> ''               what each client is creating
  doomed       offset(8) -> extent size         deleted while held; freed at last release
  clients      cid(8) -> JSON {pid, start, namespace}
  free_off / free_size                          see allocator.py
  meta         'size', 'used', 'next_cid', 'segment_id', 'segment_path', 'schema'

Must never: make an unsealed object visible to a reader, free an extent a client
holds, or leave a half-applied change (every operation is one transaction).
"""

import json
import os
import struct
import time
from types import SimpleNamespace

import lmdb

from . import allocator
from .errors import (AlreadySealed, IndexFull, KVStoreError, NotCreator, ObjectNotFound,
                     StoreFull, StoreUnavailable)
from .eviction import ClockPolicy
from .keys import user_key

SCHEMA = 2      # 2: checksums recorded at seal
CREATING, SEALED = 1, 2
PINNED, REFERENCED = 1, 2       # record flags; REFERENCED: used since its last second chance

# off, size, creator cid, lru stamp, checksum, state, flags
_REC = struct.Struct("<QQQQQBB")
_U64 = struct.Struct(">Q")
_LE64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_TABLES = ("meta", "objects", "lru", "holders", "creating", "doomed",
           "clients", "free_off", "free_size")

# results of acquire() for keys that are not held
MISS = None
BEING_CREATED = -1
_unpack_rec = _REC.unpack
_pack_rec = _REC.pack
_pack64 = _U64.pack
def _without(cids, cid8):
    """cids (concatenated 8-byte ids) with one occurrence of cid8 removed, or None if absent."""
    for i in range(0, len(cids), 8):
        if cids[i:i + 8] == cid8:
            return cids[:i] + cids[i + 8:]
    return None


def pid_start_time(pid):
    """The kernel's start time of a process (to tell a reused pid), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[19])


_INDEX_FULL = "the index is full; restart the daemon with a larger index_map_size"


class _Write:
    """A write transaction whose LMDB failures come out as kvstore's typed errors
    (a class, not contextlib: this is on every hot path)."""

    __slots__ = ("env", "txn")

    def __init__(self, env):
        self.env = env

    def __enter__(self):
        self.txn = self.env.begin(write=True)
        return self.txn

    def __exit__(self, etype, exc, tb):
        try:
            if etype is None:
                self.txn.commit()
                return False
            self.txn.abort()
        except lmdb.MapFullError:
            raise IndexFull(_INDEX_FULL) from None
        except lmdb.Error as e:
            raise KVStoreError(f"index error: {e}; restart the daemon if it persists") from None
        if issubclass(etype, lmdb.MapFullError):
            raise IndexFull(_INDEX_FULL) from None
        if issubclass(etype, lmdb.Error):
            raise KVStoreError(f"index error: {exc}; restart the daemon if it persists") from None
        return False


class Index:
    """One process's handle on the index. Not fork-safe: open a new one in a child."""

    def __init__(self, path, map_size, create=False, max_readers=1024, mode=0o600):
        try:
            self.env = lmdb.open(path, map_size=map_size, subdir=True, max_dbs=len(_TABLES), mode=mode,
                                 max_readers=max_readers, sync=False, metasync=False,
                                 writemap=True, map_async=False, readahead=False,
                                 meminit=False, create=create, lock=True)
        except lmdb.Error as e:
            raise StoreUnavailable(f"cannot open the index at {path}: {e}") from None
        if create:
            with _Write(self.env) as txn:
                handles = {n: self.env.open_db(n.encode(), txn=txn, create=True) for n in _TABLES}
        else:
            handles = {n: self.env.open_db(n.encode(), create=False) for n in _TABLES}
        self.dbs = SimpleNamespace(**handles)
        self.policy = ClockPolicy()

    def close(self):
        self.env.close()

    # ---- store-wide state -------------------------------------------------------------
    def meta(self, txn, name, default=None):
        raw = txn.get(name.encode(), db=self.dbs.meta)
        return default if raw is None else raw

    def _add_used(self, txn, delta):
        meta = self.dbs.meta
        (used,) = _LE64.unpack(txn.get(b"used", db=meta))
        txn.put(b"used", _LE64.pack(used + delta), db=meta)

    def init_fresh(self, segment_size, segment_id, segment_path):
        """Forget everything and describe an empty segment."""
        with _Write(self.env) as txn:
            for name in _TABLES:
                txn.drop(getattr(self.dbs, name), delete=False)
            m = self.dbs.meta
            txn.put(b"schema", str(SCHEMA).encode(), db=m)
            txn.put(b"size", _LE64.pack(segment_size), db=m)
            txn.put(b"used", _LE64.pack(0), db=m)
            txn.put(b"next_cid", _LE64.pack(1), db=m)
            txn.put(b"segment_id", segment_id.encode(), db=m)
            txn.put(b"segment_path", segment_path.encode(), db=m)
            allocator.init(txn, self.dbs, segment_size)

    def segment_id(self):
        with self.env.begin() as txn:
            raw = self.meta(txn, "segment_id")
        return None if raw is None else raw.decode()

    def describe(self):
        """(schema, segment size, segment id, segment path) recorded, or None if fresh."""
        with self.env.begin() as txn:
            if self.meta(txn, "schema") is None:
                return None
            return (int(self.meta(txn, "schema")), _LE64.unpack(self.meta(txn, "size"))[0],
                    self.meta(txn, "segment_id").decode(), self.meta(txn, "segment_path").decode())

    def stats(self):
        with self.env.begin() as txn:
            d = self.dbs
            size = _LE64.unpack(self.meta(txn, "size"))[0]
            used = _LE64.unpack(self.meta(txn, "used"))[0]
            n_free = txn.stat(d.free_off)["entries"]
            return {"size": size, "used": used, "objects": txn.stat(d.objects)["entries"],
                    "evictable": txn.stat(d.lru)["entries"],
                    "creating": txn.stat(d.creating)["entries"],
                    "held_extents": txn.stat(d.holders)["entries"],
                    "doomed": txn.stat(d.doomed)["entries"],
                    "clients": txn.stat(d.clients)["entries"], "free_extents": n_free}

    def used(self):
        with self.env.begin() as txn:
            return _LE64.unpack(self.meta(txn, "used"))[0]

    # ---- clients ----------------------------------------------------------------------
    def register_client(self, pid, namespace=""):
        with _Write(self.env) as txn:
            (cid,) = _LE64.unpack(txn.get(b"next_cid", db=self.dbs.meta))
            txn.put(b"next_cid", _LE64.pack(cid + 1), db=self.dbs.meta)
            info = {"pid": pid, "start": pid_start_time(pid), "namespace": namespace}
            txn.put(_pack64(cid), json.dumps(info).encode(), db=self.dbs.clients)
        return cid

    def clients(self):
        with self.env.begin() as txn:
            return {_U64.unpack(k)[0]: json.loads(v)
                    for k, v in txn.cursor(db=self.dbs.clients)}

    def dead_clients(self):
        """{cid: info} of registered clients whose process is gone (pid gone or reused)."""
        return {cid: info for cid, info in self.clients().items()
                if pid_start_time(info["pid"]) != info["start"]}

    def drop_client(self, cid):
        """Undo everything a gone client left: its holds and its unsealed creations.

        Returns (holds released, creations reclaimed).
        """
        d, prefix = self.dbs, _pack64(cid)
        with _Write(self.env) as txn:
            held = []
            for off8, cids in txn.cursor(db=d.holders):
                if _without(cids, prefix) is not None:
                    held.append(off8)
            for off8 in held:
                self._unhold(txn, off8, prefix)
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
                    rec = _unpack_rec(raw)
                    if rec[5] == CREATING and rec[2] == cid:
                        self._drop(txn, key, rec)
                        reclaimed += 1
            txn.delete(prefix, db=d.clients)
        return len(held), reclaimed

    # ---- objects: internals (inside a write txn) ----------------------------------------
    def _drop(self, txn, key, rec, lru_done=False):
        """Remove an object; its extent is freed now, or at the last release if held."""
        d = self.dbs
        off, size, _, stamp, _, state, flags = rec
        txn.delete(key, db=d.objects)
        if state == SEALED and not flags & PINNED and not lru_done:
            txn.delete(_pack64(stamp) + key, db=d.lru)
        ext = allocator.extent_size(size)
        off8 = _pack64(off)
        if txn.get(off8, db=d.holders) is not None:
            txn.put(off8, _LE64.pack(ext), db=d.doomed)
        else:
            allocator.free(txn, d, off, ext)
            self._add_used(txn, -ext)

    def _unhold(self, txn, off8, cid8):
        """Remove one client's hold on an extent; free it if doomed and now unheld.
        Returns False if that client did not hold it."""
        d = self.dbs
        cids = txn.get(off8, db=d.holders)
        rest = None if cids is None else _without(cids, cid8)
        if rest is None:
            return False
        if rest:
            txn.put(off8, rest, db=d.holders)
            return True
        txn.delete(off8, db=d.holders)
        ext = txn.get(off8, db=d.doomed)
        if ext is not None:
            txn.delete(off8, db=d.doomed)
            (ext,) = _LE64.unpack(ext)
            allocator.free(txn, d, _U64.unpack(off8)[0], ext)
            self._add_used(txn, -ext)
        return True

    def _allocate(self, txn, ext):
        """An extent of ext bytes, evicting if needed. -> (offset, whether it evicted)"""
        off = allocator.alloc(txn, self.dbs, ext)
        evicted = off is None
        if off is None:
            for key, rec in self.policy.victims(txn, self.dbs, self):
                self._drop(txn, key, rec, lru_done=True)
                off = allocator.alloc(txn, self.dbs, ext)
                if off is not None:
                    break
            else:
                raise StoreFull(
                    f"no room for {ext} bytes: everything left is held, pinned or being "
                    f"created; release or delete objects, or start the daemon with a larger --size")
        self._add_used(txn, ext)
        return off, evicted

    # ---- objects: operations ----------------------------------------------------------
    def create(self, cid, key, nbytes, pinned=False, sealed_data=None):
        """Reserve space for a new object.

        Returns (offset, None, sealed) on success, or (None, state, False) when the key
        already exists (state SEALED or CREATING), changing nothing. With ``sealed_data``
        (a callable given the offset that writes the bytes and returns their checksum)
        the object is written and
        sealed in the same transaction, visible complete or not at all (sealed=True), but
        only into space that was free: if room had to be made by evicting, the bytes
        must not land in a victim's extent before the eviction commits (an abort would
        bring the victim back over them), so the object is left CREATING (sealed=False)
        and the caller writes and seals it.
        """
        d = self.dbs
        with _Write(self.env) as txn:
            raw = txn.get(key, db=d.objects)
            if raw is not None:
                return None, _unpack_rec(raw)[5], False
            off, evicted = self._allocate(txn, allocator.extent_size(nbytes))
            flags = PINNED if pinned else 0
            if sealed_data is None or evicted:
                txn.put(key, _pack_rec(off, nbytes, cid, 0, 0, CREATING, flags), db=d.objects)
                txn.put(_pack64(cid) + key, b"", db=d.creating)
                return off, None, False
            csum = sealed_data(off)
            stamp = time.monotonic_ns()
            txn.put(key, _pack_rec(off, nbytes, cid, stamp, csum, SEALED, flags), db=d.objects)
            if not pinned:
                txn.put(_pack64(stamp) + key, b"", db=d.lru)
            return off, None, True

    def _own_creation(self, txn, cid, key, op):
        """The record of an object this client is creating, or the error saying why not."""
        raw = txn.get(key, db=self.dbs.objects)
        if raw is None:
            raise ObjectNotFound(f"{op} of {user_key(key)!r}: no such object; create() it first")
        rec = _unpack_rec(raw)
        if rec[5] == SEALED:
            hint = "seal each object once" if op == "seal" else "use delete() instead"
            raise AlreadySealed(f"{op} of {user_key(key)!r}: already sealed; {hint}")
        if rec[2] != cid:
            raise NotCreator(f"{op} of {user_key(key)!r}: another client is creating it; only its creator may {op} it")
        return rec

    def seal(self, cid, key, csum):
        """Seal an object this client created, recording its checksum."""
        d = self.dbs
        with _Write(self.env) as txn:
            off, size, creator, _, _, _, flags = self._own_creation(txn, cid, key, "seal")
            stamp = time.monotonic_ns()
            txn.put(key, _pack_rec(off, size, creator, stamp, csum, SEALED, flags), db=d.objects)
            txn.delete(_pack64(cid) + key, db=d.creating)
            if not flags & PINNED:
                txn.put(_pack64(stamp) + key, b"", db=d.lru)

    def abort(self, cid, key):
        with _Write(self.env) as txn:
            rec = self._own_creation(txn, cid, key, "abort")
            txn.delete(_pack64(cid) + key, db=self.dbs.creating)
            self._drop(txn, key, rec)

    def acquire(self, cid, keys):
        """Hold each sealed key. Per key: (offset, size, checksum), MISS, or
        (BEING_CREATED, creator)."""
        d = self.dbs
        holders, objects = d.holders, d.objects
        cid8 = _pack64(cid)
        out = []
        append = out.append
        with _Write(self.env) as txn:
            get, put = txn.get, txn.put
            for key in keys:
                raw = get(key, db=objects)
                if raw is None:
                    append(MISS)
                    continue
                off, size, creator, _, csum, state, _ = _unpack_rec(raw)
                if state != SEALED:
                    append((BEING_CREATED, creator))
                    continue
                off8 = _pack64(off)
                cids = get(off8, db=holders)
                put(off8, cid8 if cids is None else cids + cid8, db=holders)
                append((off, size, csum))
        return out

    def release(self, cid, items):
        """Drop this client's hold on each (key, offset) and mark the object recently used."""
        cid8 = _pack64(cid)
        with _Write(self.env) as txn:
            for key, off in items:
                if self._unhold(txn, _pack64(off), cid8):
                    self._mark_used(txn, key, off)

    def touch(self, items):
        """Mark each (key, offset) recently used, as a release does, without a hold
        (for copies made without one; see Client.read_many)."""
        with _Write(self.env) as txn:
            for key, off in items:
                self._mark_used(txn, key, off)

    def _mark_used(self, txn, key, off):
        objects = self.dbs.objects
        raw = txn.get(key, db=objects)
        if raw is None or raw[-1] & REFERENCED:
            return                                # gone, or already marked: no write
        roff, size, creator, stamp, csum, state, flags = _unpack_rec(raw)
        if roff == off and state == SEALED:
            txn.put(key, _pack_rec(roff, size, creator, stamp, csum, state, flags | REFERENCED), db=objects)

    # ---- hooks for the eviction policy --------------------------------------------------
    def record(self, txn, key):
        raw = txn.get(key, db=self.dbs.objects)
        return None if raw is None else _unpack_rec(raw)

    @staticmethod
    def is_referenced(rec):
        return bool(rec[6] & REFERENCED)

    def second_chance(self, txn, key, rec):
        """Clear REFERENCED and move the object to the young end of the lru table."""
        off, size, creator, _, csum, state, flags = rec
        now = time.monotonic_ns()
        txn.put(key, _pack_rec(off, size, creator, now, csum, state, flags & ~REFERENCED), db=self.dbs.objects)
        txn.put(_pack64(now) + key, b"", db=self.dbs.lru)

    def lookup(self, key):
        """The record of a key as a tuple, or None (read-only, no hold)."""
        with self.env.begin(db=self.dbs.objects) as txn:
            raw = txn.get(key)
        return None if raw is None else _unpack_rec(raw)

    def drop_if_at(self, key, off):
        """Drop the object under key if it still lives at off (a corrupt object found by
        a reader or by recovery). Returns True if dropped."""
        with _Write(self.env) as txn:
            raw = txn.get(key, db=self.dbs.objects)
            if raw is None:
                return False
            rec = _unpack_rec(raw)
            if rec[0] != off or rec[5] != SEALED:
                return False
            self._drop(txn, key, rec)
            return True

    def sealed_records(self):
        """[(key, offset, size, checksum)] of every sealed object (for recovery)."""
        with self.env.begin(db=self.dbs.objects) as txn:
            return [(k, r[0], r[1], r[4]) for k, r in
                    ((k, _unpack_rec(v)) for k, v in txn.cursor()) if r[5] == SEALED]

    def sealed_keys(self, prefix):
        """Keys of the sealed objects whose index key starts with prefix (a namespace)."""
        out = []
        with self.env.begin(db=self.dbs.objects) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    if v[-2] == SEALED:
                        out.append(k)
        return out

    def lookup_many(self, keys):
        with self.env.begin(db=self.dbs.objects) as txn:
            get = txn.get
            return [None if raw is None else _unpack_rec(raw) for raw in map(get, keys)]

    def contains(self, key):
        with self.env.begin(db=self.dbs.objects) as txn:
            raw = txn.get(key)
        return raw is not None and raw[-2] == SEALED

    def delete(self, key):
        """Delete a sealed object (deferred to the last release if held). False if none."""
        with _Write(self.env) as txn:
            raw = txn.get(key, db=self.dbs.objects)
            if raw is None:
                return False
            rec = _unpack_rec(raw)
            if rec[5] != SEALED:
                return False
            self._drop(txn, key, rec)
            return True

    def set_pinned(self, key, pinned):
        d = self.dbs
        with _Write(self.env) as txn:
            raw = txn.get(key, db=d.objects)
            if raw is None:
                raise ObjectNotFound(f"pin of {user_key(key)!r}: no such object")
            off, size, creator, stamp, csum, state, flags = _unpack_rec(raw)
            was = bool(flags & PINNED)
            if was == pinned:
                return
            flags = flags | PINNED if pinned else flags & ~PINNED
            txn.put(key, _pack_rec(off, size, creator, stamp, csum, state, flags), db=d.objects)
            if state == SEALED:
                if pinned:
                    txn.delete(_pack64(stamp) + key, db=d.lru)
                else:
                    txn.put(_pack64(stamp) + key, b"", db=d.lru)

    def evict_to(self, target_used, max_objects=256):
        """Evict LRU objects until used <= target_used; returns (evicted, used after)."""
        n = 0
        with _Write(self.env) as txn:
            used = _LE64.unpack(self.meta(txn, "used"))[0]
            if used > target_used:
                for key, rec in self.policy.victims(txn, self.dbs, self):
                    self._drop(txn, key, rec, lru_done=True)
                    n += 1
                    used = _LE64.unpack(self.meta(txn, "used"))[0]
                    if used <= target_used or n >= max_objects:
                        break
        return n, used

    def check(self):
        """Consistency check: extents of objects, doomed and free tile the segment exactly
        once. Returns a list of problems (empty when consistent). For tests and recovery."""
        d = self.dbs
        problems = []
        with self.env.begin() as txn:
            size = _LE64.unpack(self.meta(txn, "size"))[0]
            used = _LE64.unpack(self.meta(txn, "used"))[0]
            extents = [(o, l, "free") for o, l in allocator.free_extents(txn, d)]
            for k, raw in txn.cursor(db=d.objects):
                rec = _unpack_rec(raw)
                extents.append((rec[0], allocator.extent_size(rec[1]), k))
            for k, v in txn.cursor(db=d.doomed):
                extents.append((_U64.unpack(k)[0], _LE64.unpack(v)[0], "doomed"))
            extents.sort()
            pos = 0
            for off, ln, what in extents:
                if off != pos:
                    problems.append(f"extent {what!r} at {off}, expected {pos}")
                pos = max(pos, off + ln)
            if pos != size & ~(allocator.ALIGN - 1):
                problems.append(f"extents end at {pos}, segment usable size {size}")
            busy = sum(ln for _, ln, w in extents if w != "free")
            if busy != used:
                problems.append(f"used counter {used} != allocated {busy}")
        return problems
