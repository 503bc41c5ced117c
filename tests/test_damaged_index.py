"""A damaged index never crashes the daemon and never comes up silently empty (issue 9,
item 2): real daemons, a real LMDB index overwritten page by page, real shared memory.

The sweep stores 300 objects, stops the daemon cleanly (its files are kept), and for
every used page of data.mdb in turn restores the pristine files, overwrites that page
with random bytes and brings the store up through the daemon's own start-up functions
(in this process, for speed: the check and the salvage read still run in child
processes, which is what keeps a crash inside LMDB away from the daemon). Each start
either refuses with one line, or comes up serving only objects whose bytes are exactly
what was put, and if it serves fewer than 300 an ERROR line says how many it kept and
dropped. The crash case (a page that makes LMDB abort) is run with a real daemon
process, and a plain reader in a child process shows that the page really kills.
"""

import logging
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest

from conftest import ROOT, run_py
from kvstore import checksum, segment
from kvstore.config import load_config
from kvstore.errors import DaemonStartError
from kvstore.keys import user_key

N = 300
PSIZE = 4096
SHM = ("--hugepages", "off")
SIZE = "8MiB"
MAP = "2MiB"          # a small index map: the sweep copies the whole data file per page


def _values():
    rnd = random.Random(9)
    return {f"obj-{i}".encode(): rnd.randbytes(rnd.randint(1, 6000)) for i in range(N)}


def _shm_files(data_dir):
    name = segment.segment_name(data_dir)
    return [os.path.join("/dev/shm", f) for f in os.listdir("/dev/shm") if f.startswith(name)]


def _snapshot(d):
    """Copy a stopped daemon's data dir and shared-memory files; returns restore(), which
    puts that copy back (so each damage starts from the same pristine store)."""
    saved = os.path.join(d.dir, "pristine")
    shutil.copytree(d.data_dir, saved)
    shm = {p: open(p, "rb").read() for p in _shm_files(d.data_dir)}
    assert any(not p.endswith(("-slots",)) and "-table-" not in p for p in shm), shm.keys()

    def restore():
        for p in _shm_files(d.data_dir):
            os.unlink(p)
        for p, b in shm.items():
            with open(p, "wb") as f:
                f.write(b)
        shutil.rmtree(d.data_dir)
        shutil.copytree(saved, d.data_dir)
    return restore


@pytest.fixture
def stopped_store(make_daemon):
    """A data dir holding N objects of a cleanly stopped daemon, and a saved copy of
    every file of the store (index and shared memory) to restore between tries."""
    d = make_daemon(size=SIZE, extra=SHM + ("--index-map-size", MAP))
    vals = _values()
    with d.client() as c:
        for k, v in vals.items():
            assert c.put(k, v)
        assert c.stats()["objects"] == N
    assert d.stop() == 0                     # SIGTERM: the store is kept for the next start
    yield d, vals, _snapshot(d)
    for p in _shm_files(d.data_dir):
        os.unlink(p)


def _used_pages(index):
    with open(os.path.join(index, "data.mdb"), "rb") as f:
        f.seek(136)                          # meta page 0: mm_last_pg
        a = struct.unpack("<Q", f.read(8))[0]
        f.seek(PSIZE + 136)                  # meta page 1
        b = struct.unpack("<Q", f.read(8))[0]
    return max(a, b) + 1


def _overwrite_page(index, pg, seed):
    with open(os.path.join(index, "data.mdb"), "r+b") as f:
        f.seek(pg * PSIZE)
        f.write(random.Random(seed).randbytes(PSIZE))


def _start_in_process(d):
    """The daemon's start-up (data dir lock, then open_store) in this process."""
    from kvstore.daemon import startup
    cfg = load_config(env={}, overrides={"socket": d.socket, "size": SIZE, "data_dir": d.data_dir,
                                         "hugepages": "off", "index_map_size": MAP})
    fd = startup.check_data_dir(cfg)
    try:
        return startup.open_store(cfg, 0o600, 8), fd
    except BaseException:
        os.close(fd)
        raise


def _served(o, vals):
    """(objects the opened store would serve, how many of them are wrong): every
    record is read back from the segment and compared with what was put."""
    from kvstore.store import maintenance
    keys, recs = maintenance.load_records(o.env)
    m = o.segment.map(writable=False)
    wrong = []
    try:
        for k, r in zip(keys, recs):
            want = vals.get(user_key(k))
            got = m[int(r["offset"]):int(r["offset"]) + int(r["size"])]
            if want is None or got != want or int(r["checksum"]) != checksum.checksum(want):
                wrong.append(user_key(k))
    finally:
        m.close()
    assert maintenance.check_extents(o.env, recs) == []
    assert o.table.live == len(keys)         # every kept object is published
    return len(keys), wrong


def test_page_by_page_corruption_sweep(stopped_store, caplog):
    d, vals, restore = stopped_store
    index = os.path.join(d.data_dir, "index")
    pages = _used_pages(index)
    assert pages > 10
    outcomes = {}
    for pg in range(pages):
        restore()
        _overwrite_page(index, pg, seed=1000 + pg)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kvstore"):
            try:
                o, fd = _start_in_process(d)
            except DaemonStartError as e:
                msg = str(e)
                assert "\n" not in msg and "--destroy" in msg, msg
                outcomes[pg] = "refused"
                continue
        try:
            n, wrong = _served(o, vals)
        finally:
            o.close()
            os.close(fd)
        assert wrong == [], f"page {pg}: wrong bytes served for {wrong[:5]}"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        if n < N:
            assert any(f"kept {n} objects" in m and "dropped" in m for m in errors), \
                f"page {pg}: {n} of {N} objects kept, and no ERROR says so: {errors}"
            outcomes[pg] = f"kept {n}"
        else:
            outcomes[pg] = "rebuilt" if errors else "adopted"
    # the sweep must have hit damage that matters, not only unused pages
    assert sum(1 for v in outcomes.values() if v != "adopted") >= 5, outcomes
    print("sweep:", outcomes)


# ---- a page that makes LMDB abort the process ---------------------------------------------

def _loop_branch_pages(index):
    """Point the second child of every branch page back at the page itself: LMDB's
    cursor then meets a branch page where it expects a leaf and aborts the process
    (an assertion inside liblmdb, SIGABRT). Returns how many pages were changed."""
    path = os.path.join(index, "data.mdb")
    n = 0
    with open(path, "r+b") as f:
        for pg in range(2, _used_pages(index)):
            f.seek(pg * PSIZE)
            page = f.read(PSIZE)
            pgno, _, flags, lower, _ = struct.unpack_from("<QHHHH", page)
            if pgno == pg and flags & 0x01 and (lower - 16) // 2 >= 2:
                at = struct.unpack_from("<H", page, 18)[0]
                f.seek(pg * PSIZE + at)
                f.write(struct.pack("<HHH", pg & 0xFFFF, pg >> 16, 0))
                n += 1
    return n


def test_a_page_that_kills_lmdb_readers_does_not_kill_the_daemon(stopped_store):
    d, vals, restore = stopped_store
    index = os.path.join(d.data_dir, "index")
    assert _loop_branch_pages(index) > 0
    # the danger is real: a plain walk of the index in a child process dies of a signal
    r = run_py("""
        import sys, lmdb
        env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=16)
        with env.begin() as txn:
            for name in (b"objects", b"lru", b"free_off", b"free_size"):
                db = env.open_db(name, txn=txn, create=False)
                for _ in txn.cursor(db=db):
                    pass
        print("walked")
    """, index, check=False)
    assert r.returncode < 0 or "Error" in r.stderr, (r.returncode, r.stdout, r.stderr)
    # the daemon itself (a real process) starts, says what it kept, and serves only that
    d.start()
    log = d.read_log()
    assert "Traceback" not in log and "Assertion" not in log, log
    line = next(l for l in log.splitlines() if "rebuilt the damaged index" in l)
    assert " ERROR " in line
    kept = int(line.split("kept ")[1].split()[0])
    served = 0
    with d.client() as c:
        for k, v in vals.items():
            got = c.read(k)
            if got is not None:
                assert bytes(got) == v, k
                served += 1
        assert c.stats()["objects"] == kept
        assert c.put(b"after-rebuild", b"x" * 1000)
        assert bytes(c.read(b"after-rebuild")) == b"x" * 1000
        assert c.verify() == []
    assert served == kept
    if kept < N:
        assert f"dropped {N - kept}" in line, line
    assert d.stop() == 0


def test_a_lost_objects_table_is_not_an_empty_store(stopped_store):
    """The objects table gone from the main database (LMDB then opens it as a new, empty
    table): the store used to come up 'recovered' and empty. Now the check sees the
    table missing and the rebuild finds the records on the pages the table left."""
    d, vals, restore = stopped_store
    index = os.path.join(d.data_dir, "index")
    run_py("""
        import sys, lmdb
        env = lmdb.open(sys.argv[1], max_dbs=16)
        with env.begin(write=True) as txn:
            txn.drop(env.open_db(b"objects", txn=txn), delete=True)
    """, index)
    d.start()
    log = d.read_log()
    assert "table objects is missing" in log, log
    line = next(l for l in log.splitlines() if "rebuilt the damaged index" in l)
    kept = int(line.split("kept ")[1].split()[0])
    assert kept > 0, line               # the records were still on the file's pages
    with d.client() as c:
        n = 0
        for k, v in vals.items():
            got = c.read(k)
            if got is not None:
                assert bytes(got) == v
                n += 1
        assert n == kept == c.stats()["objects"]
    assert d.stop() == 0


def test_counters_that_disagree_with_the_records_are_damage(stopped_store):
    """An index whose records are intact but whose used counter is wrong (what a torn
    table would look like) is rebuilt, not adopted as if it were sound."""
    d, vals, restore = stopped_store
    index = os.path.join(d.data_dir, "index")
    run_py("""
        import struct, sys, lmdb
        env = lmdb.open(sys.argv[1], max_dbs=16)
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            txn.put(b"used", struct.pack("<Q", 0), db=meta)
    """, index)
    d.start()
    log = d.read_log()
    assert "the used counter says 0 bytes" in log, log
    assert f"kept {N} objects of the {N} it counted, dropped 0" in log
    with d.client() as c:
        assert c.stats()["objects"] == N
        assert all(bytes(c.read(k)) == v for k, v in list(vals.items())[:20])
    assert d.stop() == 0


def test_damaged_index_whose_segment_is_gone_starts_empty_and_says_so(stopped_store):
    d, vals, restore = stopped_store
    index = os.path.join(d.data_dir, "index")
    _loop_branch_pages(index)
    for p in _shm_files(d.data_dir):
        os.unlink(p)
    d.start()
    log = d.read_log()
    line = next(l for l in log.splitlines() if "is gone: starting empty" in l)
    assert " ERROR " in line and f"the segment of its {N} objects" in line, line
    assert "Traceback" not in log, log
    with d.client() as c:
        assert c.stats()["objects"] == 0
    assert d.stop() == 0


def test_destroy_of_a_damaged_index_never_crashes(stopped_store):
    d, vals, restore = stopped_store
    index = os.path.join(d.data_dir, "index")
    _loop_branch_pages(index)
    for pg in (0, 1):                        # both meta pages too: nothing describes the store
        _overwrite_page(index, pg, seed=pg)
    seg = [p for p in _shm_files(d.data_dir) if "-table-" not in p and not p.endswith("-slots")]
    assert seg and all(os.path.exists(p) for p in seg)
    r = subprocess.run([sys.executable, "-m", "kvstore.daemon", "--data-dir", d.data_dir, "--destroy"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "removed the store" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(os.path.exists(p) for p in seg)
    assert not os.path.exists(index)
    assert _shm_files(d.data_dir) == []
