"""Review 3: rebuilding a damaged index must not bring deleted objects back.

The salvage scans the data file's pages for records when the walks cannot reach every
object; LMDB is copy-on-write, so pages it freed still hold older versions of records,
including those of objects deleted since. Such a record passes the salvage's checks
when the deleted object's bytes are still in the segment (nothing reused its extent):
it was kept, and a deleted key was served again after the restart (and with a delete
followed by a put of a new value, the old value could come back in place of the new).
The sweep is the one of tests/test_damaged_index.py, with half of the objects deleted
before the daemon stops (before the fix: deleted objects came back after 14 of the 41
pages' rebuilds). A damaged meta page is the one exception allowed: the store then
comes back as of the other meta page, one transaction older (what LMDB itself does when
one meta page is bad), so the object deleted by the last transaction may be back."""

import logging
import os

from kvstore.errors import DaemonStartError

from test_damaged_index import (N, SHM, SIZE, MAP, _overwrite_page, _served, _shm_files,
                                _snapshot, _start_in_process, _used_pages, _values)


def test_salvage_keeps_no_deleted_object(make_daemon, caplog):
    d = make_daemon(size=SIZE, extra=SHM + ("--index-map-size", MAP))
    vals = _values()
    with d.client() as c:
        for k, v in vals.items():
            assert c.put(k, v)
        deleted = [k for i, k in enumerate(vals) if i % 2]
        for k in deleted:
            assert c.delete(k)
    live = {k: v for k, v in vals.items() if k not in set(deleted)}
    assert d.stop() == 0
    restore = _snapshot(d)

    index = os.path.join(d.data_dir, "index")
    resurrected = {}
    try:
        for pg in range(_used_pages(index)):
            restore()
            _overwrite_page(index, pg, seed=2000 + pg)
            try:
                o, fd = _start_in_process(d)
            except DaemonStartError:
                continue
            try:
                n, wrong = _served(o, live)      # a deleted key is "wrong": not in live
            finally:
                o.close()
                os.close(fd)
            if pg < 2:                           # a meta page: the last transaction is lost
                wrong = [k for k in wrong if k != deleted[-1]]
            if wrong:
                resurrected[pg] = wrong[:5]
    finally:
        for p in _shm_files(d.data_dir):
            os.unlink(p)
    assert not resurrected, f"deleted objects served again after a rebuild: {resurrected}"
