"""Eviction policy: which sealed objects go when space is needed.

Owns: the choice of victims, least recently used first, from the ``lru`` table
((stamp, key) -> ''). Pinned objects are never in that table; held objects are in it
but skipped. The index calls ``victims`` both when a put cannot fit (inline, in the
putting client's transaction) and from the daemon's watermark sweep.
Must never: yield an object that any client holds or that is pinned, or remove
anything itself: the index drops what this policy picks.
"""

import struct

_OFF = struct.Struct(">Q")


class LRUPolicy:
    """Least-recently-used first; a touch moves an object to the young end."""

    def victims(self, txn, dbs, unpack_record):
        """Yield (key, record) of evictable objects, oldest first.

        Each yielded object's lru entry is already deleted (through the cursor, so the
        iteration stays valid); the caller must drop the object itself.
        """
        cur = txn.cursor(db=dbs.lru)
        cur.first()
        while True:
            entry = cur.key()
            if not entry:                   # empty table or past the end
                return
            key = entry[8:]
            raw = txn.get(key, db=dbs.objects)
            rec = unpack_record(raw) if raw is not None else None
            if rec is not None and txn.get(_OFF.pack(rec[0]), db=dbs.holders) is not None:
                cur.next()                  # held: keep it, look further
                continue
            cur.delete()                    # moves to the next entry
            if rec is not None:
                yield key, rec
