"""The daemon's LMDB index: environment, tables, and how a write transaction fails.

Owns: opening the environment, the table names and key formats, the store-wide
counters in ``meta``, and turning LMDB's failures into kvstore's typed errors.

Only the daemon opens this index. Clients read the published table
(kvstore.table) and publish holds in their slots (kvstore.slots); they never run an
LMDB transaction, so no client can take LMDB's locks away from anyone. What every
caller in the daemon must know about LMDB:
- Write transactions exclude each other (one writer lock per environment, robust across
  processes). The daemon runs one at a time, from its one loop thread.
- A read transaction pins the pages of its snapshot until it ends: keep them short.
- An environment must not be used after fork, and a process opens it once (LMDB
  forbids two handles on one file in one process).

Tables (byte keys; integers big-endian so LMDB order is numeric order):
  objects      key -> record (kvstore.record)
  lru          stamp(8) + key -> ''          sealed, unpinned objects, CLOCK order
  creating     cid(8) + key -> ''            what each client is creating (create())
  doomed       offset(8) -> extent size      unpublished, freed once no hold names it
  clients      cid(8) -> JSON {pid, start, namespace, slot}
  arenas       frontier(8) -> cid, end, frontier space granted to a client for its puts
                                                 (keyed by its frontier: kvstore.store.objects)
  free_off / free_size                       see allocator.py
  meta         schema, size, used, next_cid, segment_id, segment_path, backing,
               slots_path, table_path, incarnation
File modes: data.mdb and lock.mdb are 0600 (set explicitly), whatever access mode
the store's shared files have: only the daemon uses them.
Must never: be opened by a client process, or leave a half-applied change (every
change is inside one transaction).
"""

import os
import struct
from types import SimpleNamespace

import lmdb

from kvstore import record
from kvstore.errors import IndexFull, KVStoreError, StoreUnavailable

#: Bumped when the tables or the record layout change; an older index is not adopted.
SCHEMA = 10 + record.LAYOUT
TABLES = ("meta", "objects", "lru", "creating", "doomed", "clients", "arenas",
          "free_off", "free_size")

U64 = struct.Struct(">Q")          # keys: numeric order
LE64 = struct.Struct("<Q")         # counter values
ARENA = struct.Struct("<QQQ")      # cid, end, frontier
pack64 = U64.pack

_INDEX_FULL = ("the index is full; restart the daemon with a larger --index-map-size "
               "(index_map_size in the config file)")


class Write:
    """A write transaction whose LMDB failures come out as kvstore's typed errors."""

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


class Env:
    """The daemon's one handle on the index."""

    def __init__(self, path, map_size, create=False, mode=0o600):
        # ``mode`` is accepted for the callers' sake and not used: the index is the
        # daemon's alone (no client opens it), so its files are 0600 whatever the
        # store's access mode, set explicitly below (LMDB's mode goes through the umask)
        if create:
            # py-lmdb would create a missing directory with ``mode`` (0600: no search bit),
            # which only root can then enter
            try:
                os.makedirs(path, 0o700, exist_ok=True)
            except OSError as e:
                raise StoreUnavailable(f"cannot create the index directory {path}: {e.strerror}") from None
        try:
            self.env = lmdb.open(path, map_size=map_size, subdir=True, max_dbs=len(TABLES), mode=0o600,
                                 max_readers=16, sync=False, metasync=False, writemap=True,
                                 map_async=False, readahead=False, meminit=False, create=create,
                                 lock=True)
        except lmdb.Error as e:
            raise StoreUnavailable(f"cannot open the index at {path}: {e}") from None
        for name in ("data.mdb", "lock.mdb"):
            try:
                os.chmod(os.path.join(path, name), 0o600)
            except OSError:
                pass                     # not ours to change (a read-only look): leave it
        try:
            if create:
                with Write(self.env) as txn:
                    handles = {n: self.env.open_db(n.encode(), txn=txn, create=True) for n in TABLES}
            else:
                handles = {n: self.env.open_db(n.encode(), create=False) for n in TABLES}
        except lmdb.Error as e:
            self.env.close()
            raise StoreUnavailable(f"cannot open the index tables at {path}: {e}") from None
        self.dbs = SimpleNamespace(**handles)
        self.path = path

    def close(self):
        self.env.close()

    def write(self):
        return Write(self.env)

    def read(self):
        return self.env.begin()

    # ---- meta ---------------------------------------------------------------------------
    def meta(self, txn, name, default=None):
        raw = txn.get(name.encode(), db=self.dbs.meta)
        return default if raw is None else raw

    def meta_int(self, txn, name):
        raw = txn.get(name.encode(), db=self.dbs.meta)
        return 0 if raw is None else LE64.unpack(raw)[0]

    def set_meta(self, txn, name, value):
        if isinstance(value, int):
            value = LE64.pack(value)
        elif isinstance(value, str):
            value = value.encode()
        txn.put(name.encode(), value, db=self.dbs.meta)

    def add_used(self, txn, delta):
        self.set_meta(txn, "used", self.meta_int(txn, "used") + delta)

    def describe(self):
        """{schema, size, segment_id, segment_path, backing, slots_path, table_path,
        incarnation} recorded by the last daemon, or None for a fresh index."""
        try:
            with self.read() as txn:
                if self.meta(txn, "schema") is None:
                    return None
                text = {k: (self.meta(txn, k) or b"").decode()
                        for k in ("segment_id", "segment_path", "backing", "slots_path", "table_path")}
                return dict(text, schema=int(self.meta(txn, "schema")), size=self.meta_int(txn, "size"),
                            incarnation=self.meta_int(txn, "incarnation"))
        except (lmdb.Error, ValueError, UnicodeDecodeError, struct.error) as e:
            raise StoreUnavailable(f"the index at {self.path} is unreadable ({e})") from None
