"""Looking at an index left on disk without letting it hurt the daemon: the start-up
check, the salvage read, and reading a store's description for ``--destroy``.

LMDB trusts its data file. A page overwritten with garbage can make it raise
(``MDB_CORRUPTED``, ``MDB_BAD_TXN``), return records that do not unpack, open a missing
table as a new empty one, or read outside its map and kill the process (SIGSEGV). So
every look at an index that a previous run left goes through ``in_child``: a forked
child opens the environment itself (read-only, no lock file: the caller holds the data
dir lock, and no client ever opens the index), sends what it found through a pipe, and
exits; the parent only reads the pipe and the child's exit status. A child that dies
of a signal or runs past its time is a verdict like any other.

``check`` walks every table and every record: sizes and formats of keys and values,
records unpacked with kvstore.record, extents inside the segment, lru and creating
entries that name existing objects of the right state, each table's entry count
against LMDB's own count (a lost subtree), the free lists mirroring each other, the
extents of objects, doomed extents, arena tails and free space tiling the segment
exactly, and the ``used`` and ``lru_bytes`` counters. Last, a write transaction that
is aborted (no write map, nothing reaches the file) makes LMDB read its free-page list,
whose damage would otherwise show only as failed puts later.

``read_objects`` is the salvage read: the objects table walked from its first key
forwards and from its last key backwards (a damaged page stops a walk; the two walks
together get everything on either side of it), streamed in small batches so a child
that crashes half-way still delivers what it read before.

Owns: the verdict on an index on disk (ok / damaged / crashed), the records a damaged
one still yields, and its description read safely.
Must never: open an index in the caller's process, write to the index it looks at, or
take longer than its timeout.
"""

import io
import os
import pickle
import select
import signal
import struct
import time

from kvstore import record
from kvstore.record import State

from . import allocator
from .schema import ARENA, LE64, SCHEMA, TABLES, U64

#: seconds a look may take (a million objects are walked in a few seconds)
TIMEOUT = 300.0
#: records per message of the salvage read (what a crash can lose of what was read)
BATCH = 128
_TEXT = ("segment_id", "segment_path", "backing", "slots_path", "table_path")
_INTS = ("size", "used", "lru_bytes", "next_cid", "incarnation")


class Verdict:
    """status: "ok", "damaged" or "crashed"; problems: what was wrong (first is the
    reason); desc: the index's own description (describe()'s fields) when readable;
    objects: how many objects LMDB counted in the objects table, when readable."""

    def __init__(self, status, problems=(), desc=None, objects=None):
        self.status, self.problems, self.desc, self.objects = status, list(problems), desc, objects

    @property
    def reason(self):
        return self.problems[0] if self.problems else ""

    def __repr__(self):
        return f"Verdict({self.status!r}, {self.problems[:3]!r}, objects={self.objects})"


# ---- the child process ---------------------------------------------------------------------
def _die_with_parent(parent):
    """SIGKILL this (forked) process when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:                      # the parent died before the prctl
        os._exit(5)


def in_child(fn, *args, timeout=TIMEOUT):
    """Run fn(send, *args) in a forked child. Returns (messages sent, how it ended):
    "exit 0", "exit N", "signal NAME" or "timeout" (the child is killed)."""
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:                                    # the child: never returns
        code = 0
        try:
            # it holds the parent's data-dir lock (inherited): it must not outlive the
            # parent, or a daemon killed mid-check could not be restarted until it ends
            _die_with_parent(parent)
            os.close(r)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 2)            # LMDB's assertion text: the verdict says it all
            import faulthandler
            faulthandler.disable()      # (a test runner's: its stack dump would go elsewhere)
            out = os.fdopen(w, "wb", buffering=1 << 16)

            def send(obj):
                pickle.dump(obj, out, protocol=pickle.HIGHEST_PROTOCOL)
                out.flush()
            try:
                fn(send, *args)
            except BaseException as e:              # noqa: BLE001 (reported, not raised)
                send(("error", f"{type(e).__name__}: {e}"))
                code = 3
            out.close()
        except BaseException:                       # noqa: BLE001
            code = 4
        os._exit(code)
    os.close(w)
    buf = bytearray()
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 1 << 20)
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(r)
        if timed_out:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, status = os.waitpid(pid, 0)
    msgs = []
    f = io.BytesIO(bytes(buf))
    while f.tell() < len(buf):
        try:
            msgs.append(pickle.load(f))
        except Exception:                           # noqa: BLE001 (a message cut by a crash)
            break
    if timed_out:
        how = "timeout"
    elif os.WIFSIGNALED(status):
        how = "signal " + signal.Signals(os.WTERMSIG(status)).name
    else:
        how = f"exit {os.WEXITSTATUS(status)}"
    return msgs, how


def _open(path, readonly=True):
    import lmdb
    return lmdb.open(path, subdir=True, readonly=readonly, lock=False, create=False,
                     max_dbs=len(TABLES) + 1, writemap=False, readahead=False, map_size=1 << 20)


def _read_meta(txn, env):
    """describe()'s fields, each read on its own (one bad value spoils only itself)."""
    db = env.open_db(b"meta", txn=txn, create=False)
    out = {}
    for k in ("schema",) + _TEXT + _INTS:
        raw = txn.get(k.encode(), db=db)
        if raw is None:
            out[k] = None
        elif k == "schema":
            out[k] = int(raw)
        elif k in _TEXT:
            out[k] = raw.decode()
        else:
            out[k] = LE64.unpack(raw)[0]
    return out


def _meta_child(send, path):
    env = _open(path)
    with env.begin() as txn:
        send(("desc", _read_meta(txn, env)))
    env.close()


def read_meta(path, timeout=30.0):
    """The description an index on disk carries, or None if it cannot be read."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return None
    msgs, _ = in_child(_meta_child, path, timeout=timeout)
    return next((m[1] for m in msgs if m[0] == "desc"), None)


# ---- the check ------------------------------------------------------------------------------
class _Damage(Exception):
    pass


def _walk(txn, db, name, n_expected, problems):
    """Every (key, value) of a table; its count checked against LMDB's own."""
    items = list(txn.cursor(db=db))
    if len(items) != n_expected:
        problems.append(f"table {name} holds {len(items)} entries, LMDB counts {n_expected}")
    return items


def _check_child(send, path):
    import lmdb
    import numpy as np
    problems = []
    env = _open(path)
    with env.begin() as txn:
        names = set(txn.cursor().iternext(keys=True, values=False))
        missing = [n for n in TABLES if n.encode() not in names]
        if missing:
            send(("objects", None))
            raise _Damage(f"table {missing[0]} is missing from the index")
        dbs = {n: env.open_db(n.encode(), txn=txn, create=False) for n in TABLES}
        counts = {n: txn.stat(dbs[n])["entries"] for n in TABLES}
        send(("objects", counts["objects"]))
        desc = _read_meta(txn, env)
        send(("desc", desc))
        if desc["schema"] != SCHEMA:               # another layout: the caller starts fresh
            return
        for k in ("schema", "segment_path") + _INTS:
            if desc[k] is None:
                raise _Damage(f"meta has no {k}")
        size = desc["size"]
        usable = size & ~(allocator.ALIGN - 1)
        t = {n: _walk(txn, dbs[n], n, counts[n], problems) for n in TABLES}
    env.close()

    # objects, vectorised (a million records take a fraction of a second)
    from .maintenance import RECORD_DTYPE
    keys = [k for k, _ in t["objects"]]
    values = [v for _, v in t["objects"]]
    if not all(keys) or any(n != record.PACKED_SIZE for n in set(map(len, values))):
        for k, v in t["objects"]:
            if not k or len(v) != record.PACKED_SIZE:
                raise _Damage(f"object record of {len(v)} bytes under key {k[:40]!r}")
    recs = np.frombuffer(b"".join(values), RECORD_DTYPE)
    state, flags = recs["state"], recs["flags"]
    sizes, offsets = recs["size"].astype(np.uint64), recs["offset"].astype(np.uint64)
    ext = np.maximum(np.uint64(allocator.ALIGN),
                     (sizes + np.uint64(allocator.ALIGN - 1)) & ~np.uint64(allocator.ALIGN - 1))
    bad = ~np.isin(state, (int(State.CREATING), int(State.SEALED))) | (flags & ~np.uint8(1) != 0)
    bad |= (offsets % np.uint64(allocator.ALIGN) != 0) | (sizes > np.uint64(usable)) \
        | (offsets > np.uint64(usable) - np.minimum(ext, np.uint64(usable)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _Damage(f"object {keys[i][:40]!r} has a bad record (state {int(state[i])}, "
                      f"flags {int(flags[i])}, {int(offsets[i])}+{int(sizes[i])})")
    unp = np.flatnonzero((state == State.SEALED) & (flags & np.uint8(1) == 0))
    unpinned_bytes = int(ext[unp].sum())
    # the lru table is (stamp, key) in LMDB order: the sealed unpinned objects sorted by
    # stamp, then by key (keys come in LMDB order, so a key's rank is its byte order)
    stamps = recs["stamp"][unp].astype(np.uint64)
    order = unp[np.lexsort((unp, stamps))]
    lru = t["lru"]
    ok = len(lru) == len(order) and not any(v for _, v in lru) and \
        all(len(k) > 8 for k, _ in lru)
    if ok and len(lru):
        got_stamps = np.frombuffer(b"".join(k[:8] for k, _ in lru), ">u8").astype(np.uint64)
        ok = bool(np.array_equal(got_stamps, recs["stamp"][order].astype(np.uint64))) and \
            [k[8:] for k, _ in lru] == [keys[i] for i in order.tolist()]
    if not ok:
        raise _Damage(f"lru has {len(lru)} entries that do not match the {len(order)} "
                      f"sealed unpinned objects")
    creating = sorted(keys[i] for i in np.flatnonzero(state == State.CREATING).tolist())
    if any(v for _, v in t["creating"]) or sorted(k[8:] for k, _ in t["creating"]) != creating:
        raise _Damage("creating entries do not match the objects being created")
    exts = ext.astype(np.int64)
    offs = offsets.astype(np.int64)
    # space
    other = []
    for k, v in t["doomed"]:
        other.append((U64.unpack(k)[0], LE64.unpack(v)[0]))
    for k, v in t["arenas"]:
        U64.unpack(k)
        owner, end, frontier = ARENA.unpack(v)
        if not frontier <= end <= usable:
            raise _Damage(f"arena {k.hex()} ends past the segment")
        if end > frontier:
            other.append((frontier, end - frontier))
    free = [(U64.unpack(k)[0], LE64.unpack(v)[0]) for k, v in t["free_off"]]
    by_size = sorted(struct.unpack(">QQ", k)[::-1] for k, v in t["free_size"])
    if by_size != sorted(free):
        raise _Damage("the two free-space tables disagree")
    import json
    for k, v in t["clients"]:
        U64.unpack(k)
        if not isinstance(json.loads(v), dict):
            raise _Damage("a client entry is not a JSON object")
    offs = np.concatenate([offs, np.array([o for o, _ in free + other], dtype=np.int64)])
    lens = np.concatenate([exts, np.array([n for _, n in free + other], dtype=np.int64)])
    order = np.argsort(offs, kind="stable")
    offs, lens = offs[order], lens[order]
    ends = offs + lens
    expect = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    bad = np.flatnonzero(offs != expect)
    if len(bad):
        i = int(bad[0])
        raise _Damage(f"the extents do not tile the segment (one at {int(offs[i])}, "
                      f"expected one at {int(expect[i])})")
    if (int(ends[-1]) if len(ends) else 0) != usable:
        raise _Damage(f"the extents end at {int(ends[-1]) if len(ends) else 0}, not at {usable}")
    busy = int(exts.sum()) + sum(n for _, n in other)
    if busy != desc["used"]:
        raise _Damage(f"the used counter says {desc['used']} bytes, the records {busy}")
    if unpinned_bytes != desc["lru_bytes"]:
        raise _Damage(f"the lru_bytes counter says {desc['lru_bytes']}, the records {unpinned_bytes}")
    if problems:
        raise _Damage(problems[0])

    # LMDB's free-page list: read by any allocation. Aborted, and without a write map
    # nothing reaches the file.
    if os.access(os.path.join(path, "data.mdb"), os.W_OK):
        env = _open(path, readonly=False)
        info = env.info()
        psize = env.stat()["psize"]
        pages = min(info["last_pgno"] + 1, 1024)
        txn = env.begin(write=True)
        try:
            meta = env.open_db(b"meta", txn=txn, create=False)
            txn.put(b"\x00check", bytes(pages * psize), db=meta)
        except lmdb.MapFullError:
            pass
        finally:
            txn.abort()
        env.close()
    send(("ok",))


def check(path, timeout=TIMEOUT):
    """The verdict on the index in path (which must exist), from a child process."""
    msgs, how = in_child(_check_child, path, timeout=timeout)
    desc = next((m[1] for m in msgs if m[0] == "desc"), None)
    objects = next((m[1] for m in msgs if m[0] == "objects"), None)
    if any(m[0] == "ok" for m in msgs) or (desc and desc.get("schema") != SCHEMA and how == "exit 0"):
        return Verdict("ok", (), desc, objects)
    errors = [m[1] for m in msgs if m[0] == "error"]
    if how.startswith("signal") or how == "timeout":
        return Verdict("crashed", [f"reading it killed the reader ({how})"] + errors, desc, objects)
    return Verdict("damaged", [e.split(": ", 1)[1] if e.startswith("_Damage") else e
                               for e in errors] or [f"the check ended with {how}"], desc, objects)


# ---- the salvage read -----------------------------------------------------------------------
def _read_child(send, path, backward):
    env = _open(path)
    txn = env.begin()
    try:
        try:
            send(("desc", _read_meta(txn, env)))
        except Exception as e:                      # noqa: BLE001 (no description: go on)
            send(("no-desc", str(e)))
        db = env.open_db(b"objects", txn=txn, create=False)
        try:
            send(("objects", txn.stat(db)["entries"]))
        except Exception:                           # noqa: BLE001
            pass
        cur = txn.cursor(db=db)
        batch = []
        try:
            ok = cur.last() if backward else cur.first()
            while ok:
                batch.append((cur.key(), cur.value()))
                if len(batch) >= BATCH:
                    send(("recs", batch))
                    batch = []
                ok = cur.prev() if backward else cur.next()
        finally:
            send(("recs", batch))
    finally:
        txn.abort()
        env.close()


def read_objects(path, timeout=TIMEOUT):
    """What a damaged index still yields: (desc or None, objects LMDB counted or None,
    {key: raw record}, notes on where the walks stopped)."""
    desc, counted, recs, notes = None, None, {}, []
    for backward in (False, True):
        msgs, how = in_child(_read_child, path, backward, timeout=timeout)
        for m in msgs:
            if m[0] == "desc" and desc is None:
                desc = m[1]
            elif m[0] == "objects" and counted is None:
                counted = m[1]
            elif m[0] == "recs":
                recs.update(m[1])
            elif m[0] == "error":
                notes.append(f"{'backward' if backward else 'forward'} walk: {m[1]}")
        if how != "exit 0" and how != "exit 3":
            notes.append(f"{'backward' if backward else 'forward'} walk: {how}")
    return desc, counted, recs, notes


# ---- the page scan --------------------------------------------------------------------------
_PAGE = struct.Struct("<QHHHH")         # pgno, pad, flags, lower, upper
_NODE = struct.Struct("<HHHH")          # lo, hi, flags, ksize
_P_LEAF, _P_LEAF2, _P_META = 0x02, 0x20, 0x08
_MAGIC = 0xBEEFC0DE


def _meta_pages(f, psize):
    """The valid ones of the two meta pages (page 0 and 1), as bytes."""
    for pg in (0, 1):
        f.seek(pg * psize)
        page = f.read(psize)
        if len(page) < 160:
            continue
        pgno, _, flags, _, _ = _PAGE.unpack_from(page)
        if pgno == pg and flags & _P_META and struct.unpack_from("<I", page, 16)[0] == _MAGIC:
            yield page


def _last_page(f, psize):
    """The highest last-used page either meta page names (None if neither is valid)."""
    return max((struct.unpack_from("<Q", page, 136)[0] for page in _meta_pages(f, psize)),
               default=None)


def scan_pages(path, psize=4096):
    """{key: [raw record, ...]} of every leaf node on any page of the data file that
    holds a record-sized value: a plain read of the file (no LMDB, nothing that can
    crash), for an index whose tables cannot be walked. Pages LMDB's own free list
    names are skipped (``free_pages``): they hold older versions of records, among them
    records of objects deleted since, whose bytes may still be in the segment and would
    pass every check (a deleted object, or the value a key had before it was deleted
    and put again, would come back). They are read only when no other page yields a
    record at all (the objects table lost whole: better old versions than nothing).
    Other pages no longer in use may still be read (when the free list cannot be read),
    so a key can come with older versions of its record; the caller keeps only records
    that pass their checks."""
    import numpy as np
    found = {}
    fpath = os.path.join(path, "data.mdb")
    with open(fpath, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        last = _last_page(f, psize)
        npages = size // psize if last is None else min(size // psize, last + 1)
        free = free_pages(f, psize, npages)
        for use_free in (False, True):
            if use_free and (found or not free):
                break                     # free pages only when nothing else yields a record
            chunk = 4096                  # pages per read
            for first in range(2, npages, chunk):
                f.seek(first * psize)
                buf = f.read(min(chunk, npages - first) * psize)
                n = len(buf) // psize
                flags = np.frombuffer(buf, np.uint16, count=n * psize // 2).reshape(n, psize // 2)[:, 5]
                for i in np.flatnonzero((flags & (_P_LEAF | _P_LEAF2 | _P_META)) == _P_LEAF).tolist():
                    if (first + i in free) == use_free:
                        _scan_leaf(memoryview(buf)[i * psize:(i + 1) * psize], psize, found)
    return found


class _BadFreeList(Exception):
    pass


_P_BRANCH, _P_OVERFLOW, _F_BIGDATA = 0x01, 0x04, 0x01
_FREE_ROOT_AT, _TXNID_AT = 80, 144      # in a meta page: mm_dbs[FREE_DBI].md_root, mm_txnid


def free_pages(f, psize, npages):
    """The page numbers LMDB's free list (its FREE_DBI tree) names, read from the newest
    meta page whose free list reads cleanly (plain reads, bounds checked: a damaged
    tree is a refusal, never a crash); an empty set when neither does."""
    metas = [(struct.unpack_from("<Q", page, _TXNID_AT)[0],
              struct.unpack_from("<Q", page, _FREE_ROOT_AT)[0]) for page in _meta_pages(f, psize)]
    for _, root in sorted(metas, reverse=True):
        try:
            return _free_tree(f, psize, npages, root)
        except (_BadFreeList, struct.error):
            continue
    return set()


def _free_tree(f, psize, npages, root):
    def page(pg, expect_pgno=True):
        if not 2 <= pg < npages:
            raise _BadFreeList(f"page {pg} out of range")
        f.seek(pg * psize)
        p = f.read(psize)
        if len(p) < psize or (expect_pgno and _PAGE.unpack_from(p)[0] != pg):
            raise _BadFreeList(f"page {pg} is not itself")
        return p

    free = set()
    if root == 0xFFFFFFFFFFFFFFFF:           # P_INVALID: an empty free list
        return free
    todo, seen = [(root, 0)], set()
    while todo:
        pg, depth = todo.pop()
        if pg in seen or depth > 32:
            raise _BadFreeList("a loop in the free list")
        seen.add(pg)
        p = page(pg)
        _, _, flags, lower, upper = _PAGE.unpack_from(p)
        if not 16 <= lower <= upper <= psize or not flags & (_P_BRANCH | _P_LEAF):
            raise _BadFreeList(f"page {pg} is not a tree page")
        for i in range((lower - 16) // 2):
            at = struct.unpack_from("<H", p, 16 + 2 * i)[0]
            if at < upper or at + 8 > psize:
                raise _BadFreeList(f"a node of page {pg} is out of place")
            lo, hi, nflags, ksize = _NODE.unpack_from(p, at)
            if flags & _P_BRANCH:
                todo.append((lo | (hi << 16) | (nflags << 32), depth + 1))
                continue
            dsize, start = lo | (hi << 16), at + 8 + ksize
            if nflags & _F_BIGDATA:
                ov = struct.unpack_from("<Q", p, start)[0]
                head = page(ov)
                if not _PAGE.unpack_from(head)[2] & _P_OVERFLOW:
                    raise _BadFreeList(f"page {ov} is not an overflow page")
                npg = struct.unpack_from("<I", head, 12)[0]
                if not 16 + dsize <= npg * psize or ov + npg > npages:
                    raise _BadFreeList(f"overflow page {ov} is too short")
                f.seek(ov * psize + 16)
                data = f.read(dsize)
            else:
                data = p[start:start + dsize]
            if len(data) != dsize or dsize < 8 or dsize % 8:
                raise _BadFreeList(f"a free-list entry of page {pg} has {dsize} bytes")
            n = struct.unpack_from("<Q", data)[0]
            if (n + 1) * 8 > dsize:
                raise _BadFreeList(f"a free-list entry of page {pg} counts {n} pages")
            ids = struct.unpack_from(f"<{n}Q", data, 8)
            if any(not 2 <= x < npages for x in ids):
                raise _BadFreeList(f"a free-list entry of page {pg} names a page out of range")
            free.update(ids)
    return free


def _scan_leaf(page, psize, found):
    _, _, _, lower, upper = _PAGE.unpack_from(page)
    if not 16 <= lower <= upper <= psize:
        return
    for i in range((lower - 16) // 2):
        at = struct.unpack_from("<H", page, 16 + 2 * i)[0]
        if at < upper or at + 8 > psize:
            continue
        lo, hi, nflags, ksize = _NODE.unpack_from(page, at)
        dsize = lo | (hi << 16)
        if nflags or dsize != record.PACKED_SIZE or not ksize or at + 8 + ksize + dsize > psize:
            continue
        key = bytes(page[at + 8:at + 8 + ksize])
        found.setdefault(key, []).append(bytes(page[at + 8 + ksize:at + 8 + ksize + dsize]))
