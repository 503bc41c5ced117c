"""Start-up with an index on disk: check it in a child process, and rebuild a damaged one
from what it still yields before anything in the daemon's own process opens it.

``check_or_salvage`` runs kvstore.store.index_check's check. A sound index is left as
it is. A damaged one (or one whose reading killed the reader) is salvaged at once, with
no flag needed: the records the objects table still yields (walked forwards and
backwards in child processes) and, when the walks could not reach every object LMDB
counted, those a plain scan of the data file's pages finds, are each kept only if the
record unpacks, describes a sealed object inside the segment, and the segment's bytes
there still match the record's checksum (so nothing kept can serve wrong bytes); of
records whose extents overlap, one is kept. A new index describing exactly the kept
objects (the rest of the segment free) replaces the damaged one, under a new store
identity: clients reconnect as new clients (their holds belong to the old store),
exactly as when the slots file is lost. Puts whose put() had returned but whose seals
were still queued in the clients' seal rings are read from the old slots file and kept
under the same checks as records (kvstore.slots.queued_seals, ``add_queued_seals``). The log says, at ERROR, why
the index was rejected and how many objects were kept and dropped (and how many the
damaged index counted, when it could still count them); nothing is dropped silently.
If the segment is gone there is nothing to keep: a damaged index that still says it is
a kvstore index of this schema is removed and the store starts empty, saying so at
ERROR; one that says nothing (not even that it is ours) is left alone and the daemon
refuses. The daemon also refuses when the rebuild itself fails (no space for the new
index, say). A refusal is one line naming ``kvstore-daemon --destroy --data-dir ...``.
A start-up killed in the middle of a rebuild is finished (killed between the renames
that swap the rebuilt index in) or undone (killed while writing it) by the next one.

Owns: the decision between adopting, rebuilding and refusing, the choice of the kept
records, and writing the rebuilt index.
Must never: open the damaged index in this process, keep a record whose bytes do not
match its checksum or whose extent overlaps a kept one, or drop objects without
logging how many.
"""

import logging
import mmap
import os
import shutil
import struct
import time
import uuid
from bisect import bisect_right

import xxhash

from kvstore import checksum, record, segment, table as table_mod
from kvstore.errors import IndexDamaged, IndexFull, KVStoreError
from kvstore.record import State
from kvstore.store import allocator, index_check
from kvstore.store.schema import SCHEMA, Env, pack64

log = logging.getLogger("kvstore.daemon")


def destroy_hint(cfg):
    return f"kvstore-daemon --destroy --data-dir {cfg.data_dir}"


def check_or_salvage(cfg, path, mode, name, shm_path):
    """Check the index at path (if there is one); rebuild it if it is damaged. Returns
    None when the index was sound or absent, else a one-line summary of what was done
    (also logged). Raises IndexDamaged when it can neither be adopted nor rebuilt."""
    _finish_interrupted(path)
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return None
    v = index_check.check(path)
    if v.status == "ok":
        return None
    desc, counted, walked, notes = index_check.read_objects(path)
    desc = desc or v.desc or {}
    counted = counted if counted is not None else v.objects
    seg_path, backing = _segment_of(cfg, name, desc)
    if seg_path is None and desc.get("schema") != SCHEMA:
        # no segment and no description of ours: nothing to keep, and nothing says
        # these files are a kvstore index (a wrong --data-dir?): the operator decides
        raise IndexDamaged(f"cannot open the index in {path} ({v.reason}); no segment of this "
                           f"store is left, so nothing can be salvaged: move it away or run "
                           f"{destroy_hint(cfg)}")
    if seg_path is None:
        _swap(path, None)
        msg = (f"the index in {path} was damaged ({v.reason}) and the segment of its "
               f"{counted if counted is not None else 'unknown number of'} objects is gone: "
               f"starting empty")
        log.error("%s", msg)
        return msg
    for n in notes:
        log.debug("salvage of %s: %s", path, n)
    scanned = {}
    if counted is None or len(walked) < counted:
        try:
            scanned = index_check.scan_pages(path)
        except OSError as e:
            log.warning("salvage: could not scan the index file (%s)", e.strerror)
    try:
        with open(seg_path, "rb") as f:
            seg_size = os.fstat(f.fileno()).st_size
            if desc.get("size") and desc["size"] <= seg_size:
                seg_size = desc["size"]
            m = mmap.mmap(f.fileno(), seg_size, prot=mmap.PROT_READ) if seg_size else None
        slots_paths = [p for p in dict.fromkeys([desc.get("slots_path") or "", shm_path(name, "slots")]) if p]
        view = memoryview(m) if m else b""
        try:
            kept, dropped_bad = choose(walked, scanned, view, seg_size)
            queued = add_queued_seals(kept, slots_paths, view, seg_size)
        finally:
            if m is not None:
                view.release()
                m.close()
        info = {"segment_id": uuid.uuid4().hex, "segment_path": seg_path, "backing": backing,
                "slots_path": shm_path(name, "slots"), "table_path": desc.get("table_path") or "",
                "incarnation": desc.get("incarnation") or _last_incarnation(name)}
        new = path + f".rebuilt-{uuid.uuid4().hex[:8]}"
        try:
            write_index(new, cfg.index_map_bytes(), mode, seg_size, info, kept)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        _retire_tables(desc, name)
        for p in slots_paths:
            try:
                os.unlink(p)            # its holds and rings belong to the old store identity
            except OSError:
                pass
        _swap(path, new)
    except (OSError, KVStoreError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise IndexDamaged(f"the index in {path} is damaged ({v.reason}) and could not be rebuilt "
                           f"({why}); run {destroy_hint(cfg)} to start empty") from None
    found = len(set(walked) | set(scanned))
    if counted is not None:
        msg = (f"the index in {path} was damaged ({v.reason}); rebuilt the damaged index from what "
               f"could still be read: kept {len(kept)} objects of the {counted} it counted, "
               f"dropped {max(counted - len(kept), 0)}")
    else:
        msg = (f"the index in {path} was damaged ({v.reason}); rebuilt the damaged index from what "
               f"could still be read: kept {len(kept)} objects, dropped "
               f"{max(found - len(kept), 0)} (it could not count its objects: others may be lost)")
    msg += (f"; {dropped_bad} records read failed their checks; {queued} puts still queued in "
            f"the clients' seal rings were verified and kept; clients reconnect as new clients")
    log.error("%s", msg)
    return msg


def _segment_of(cfg, name, desc):
    """(path, backing) of the store's segment: where the index says, else at its
    default names; (None, None) if it is nowhere."""
    if desc.get("segment_path") and os.path.exists(desc["segment_path"]):
        return desc["segment_path"], desc.get("backing") or segment.backing_of(desc["segment_path"])
    for p, backing in segment.default_paths(cfg, name):
        if os.path.exists(p):
            return p, backing
    return None, None


def _retire_tables(desc, name):
    paths = {desc.get("table_path") or ""} - {""}
    try:
        paths |= {os.path.join("/dev/shm", f) for f in os.listdir("/dev/shm")
                  if f.startswith(name + "-table-")}
    except OSError:
        pass
    for p in paths:
        table_mod.retire_file(p)


def _last_incarnation(name):
    best = 0
    try:
        for f in os.listdir("/dev/shm"):
            if f.startswith(name + "-table-"):
                try:
                    best = max(best, int(f[len(name) + 7:].split("-")[0]))
                except ValueError:
                    pass
    except OSError:
        pass
    return best


def _finish_interrupted(path):
    """Finish or undo what a start-up killed in the middle of a rebuild left. Killed
    between the two renames of ``_swap`` (no index, the damaged one renamed away): the
    rebuilt index was complete, so the newest one goes in (else the next start would
    create an empty index and remove the segment with every object). Killed while
    writing a rebuilt index, or while removing the damaged one: those are removed (a
    rebuilt one has the whole index map reserved on disk)."""
    parent, base = os.path.split(path)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    rebuilt = [os.path.join(parent, n) for n in names if n.startswith(base + ".rebuilt-")]
    damaged = [os.path.join(parent, n) for n in names if n.startswith(base + ".damaged-")]
    if not os.path.exists(path) and damaged and rebuilt:
        def written(p):
            try:
                return os.stat(os.path.join(p, "data.mdb")).st_mtime_ns
            except OSError:
                return -1
        newest = max(rebuilt, key=written)
        os.rename(newest, path)
        rebuilt.remove(newest)
        log.error("an earlier start was killed while putting the index it rebuilt from a damaged "
                  "one in place (%s); it is in place now. Objects the damaged index held beyond "
                  "those it kept are lost (that start could not say how many)", path)
    for p in rebuilt + damaged:
        log.warning("removing %s, left by a start-up killed during an index rebuild", p)
        shutil.rmtree(p, ignore_errors=True)


def _swap(path, new):
    """Put the rebuilt index (or nothing) where the damaged one was, and remove that."""
    old = path + f".damaged-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    if new is not None:
        os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _valid(raw, view, usable):
    """The record if it is a sealed object inside the segment whose bytes match."""
    if len(raw) != record.PACKED_SIZE:
        return None
    try:
        rec = record.unpack(raw)
    except ValueError:
        return None
    if rec.state != State.SEALED or rec.offset % allocator.ALIGN or \
            rec.offset + allocator.extent_size(rec.size) > usable:
        return None
    data = view[rec.offset:rec.offset + rec.size]
    got = xxhash.xxh3_64_intdigest(data) if rec.size <= checksum.CHUNK else checksum.checksum(data)
    return rec if got == rec.checksum else None


def choose(walked, scanned, view, seg_size):
    """([(key, Record)] to keep, number of records read that failed their checks).
    Records the walks read come first; versions found only by the page scan fill in
    keys the walks missed (newest seal first). No two kept extents overlap."""
    usable = seg_size & ~(allocator.ALIGN - 1)
    bad = 0
    first = []
    for key, raw in walked.items():
        rec = _valid(raw, view, usable)
        if rec is None:
            bad += 1
        else:
            first.append((key, rec))
    second = []
    for key, raws in scanned.items():
        if key in walked:
            continue
        recs = [r for r in (_valid(raw, view, usable) for raw in set(raws)) if r is not None]
        if recs:
            second.append((key, max(recs, key=lambda r: r.stamp)))
        else:
            bad += 1
    kept = _no_overlap(first)
    starts = [r.offset for _, r in kept]
    ends = [r.offset + allocator.extent_size(r.size) for _, r in kept]
    fill = []
    for key, rec in _no_overlap(second):
        i = bisect_right(starts, rec.offset) - 1
        end = rec.offset + allocator.extent_size(rec.size)
        if (i >= 0 and ends[i] > rec.offset) or (i + 1 < len(starts) and starts[i + 1] < end):
            continue
        fill.append((key, rec))
    return kept + fill, bad


def add_queued_seals(kept, slots_paths, view, seg_size):
    """Add to kept (in place) the puts clients had queued in their seal rings when the
    daemon died: their put() had returned, so they must survive the rebuild like the
    records do. Each is kept only under the same rules (a sealed extent inside the
    segment whose bytes match its checksum, no overlap with a kept extent, a key not
    kept already). Returns how many were added."""
    from kvstore import protocol
    from kvstore.slots import queued_seals
    usable = seg_size & ~(allocator.ALIGN - 1)
    have = {key for key, _ in kept}
    spans = sorted((r.offset, r.offset + allocator.extent_size(r.size)) for _, r in kept)
    starts = [a for a, _ in spans]
    ends = [b for _, b in spans]
    added = []
    for path in slots_paths:
        for _, data in queued_seals(path):
            items, _ = protocol.read_seal_prefix(data)
            for _, key, off, size, csum, flags, replicas in items:
                if key in have:
                    continue
                try:
                    rec = record.Record(off, size, 0, time.monotonic_ns(), csum, State.SEALED,
                                        record.Flag(flags & record.Flag.PINNED), 0, replicas)
                    ok = _valid(record.pack(rec), view, usable)
                except (ValueError, OverflowError, struct.error):
                    ok = None
                if ok is None:
                    continue
                end = off + allocator.extent_size(size)
                i = bisect_right(starts, off) - 1
                if (i >= 0 and ends[i] > off) or (i + 1 < len(starts) and starts[i + 1] < end):
                    continue
                starts.insert(i + 1, off)
                ends.insert(i + 1, end)
                have.add(key)
                added.append((key, rec))
    kept.extend(added)
    return len(added)


def _no_overlap(items):
    items = sorted(items, key=lambda kr: kr[1].offset)
    out, end = [], -1
    for key, rec in items:
        if rec.offset >= end:
            out.append((key, rec))
            end = rec.offset + allocator.extent_size(rec.size)
    return out


#: bytes of lock.mdb reserved up front (LMDB's reader table for the daemon's 16 readers)
LOCK_BYTES = 64 << 10


def reserve_files(path, map_size):
    """Give the index files at path their space before LMDB writes through its maps:
    the index is write-mapped, and a page a full file system cannot back is SIGBUS, not
    an error. A new data file gets its two meta pages written (plainly, no map) first,
    as LMDB reads a file of zeros as not its own. Raises OSError (ENOSPC) instead."""
    fd = os.open(os.path.join(path, "lock.mdb"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < LOCK_BYTES:
            os.posix_fallocate(fd, 0, LOCK_BYTES)
    finally:
        os.close(fd)
    data = os.path.join(path, "data.mdb")
    if not os.path.exists(data):
        import lmdb
        try:
            lmdb.open(path, map_size=map_size, subdir=True, lock=False, writemap=False,
                      create=True).close()
        except lmdb.Error as e:
            raise OSError(getattr(e, "errno", None) or 28, str(e)) from None
    fd = os.open(data, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, max(map_size, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def write_index(path, map_size, mode, seg_size, info, kept):
    """A fresh index at path describing exactly the kept objects (all else free)."""
    os.makedirs(path, mode=0o700)
    reserve_files(path, map_size)
    env = Env(path, map_size, create=True, mode=mode)
    try:
        d = env.dbs
        usable = seg_size & ~(allocator.ALIGN - 1)
        with env.write() as txn:
            env.set_meta(txn, "schema", str(SCHEMA))
            env.set_meta(txn, "size", seg_size)
            env.set_meta(txn, "next_cid", 1)
            for k, v in info.items():
                env.set_meta(txn, k, v)
            used = lru_bytes = 0
            at = 0
            for key, rec in sorted(kept, key=lambda kr: kr[1].offset):
                ext = allocator.extent_size(rec.size)
                if rec.offset > at:
                    allocator.free(txn, d, at, rec.offset - at)
                at = rec.offset + ext
                rec = rec._replace(creator=0)
                txn.put(key, record.pack(rec), db=d.objects)
                used += ext
                if not rec.pinned:
                    txn.put(pack64(rec.stamp) + key, b"", db=d.lru)
                    lru_bytes += ext
            if usable > at:
                allocator.free(txn, d, at, usable - at)
            env.set_meta(txn, "used", used)
            env.set_meta(txn, "lru_bytes", lru_bytes)
    except IndexFull:
        raise IndexFull(f"the {len(kept)} objects kept do not fit an index of index_map_size "
                        f"{map_size} bytes; raise --index-map-size") from None
    finally:
        env.close()
