"""Eviction policy: which sealed objects go when space is needed.

Owns: the choice of victims. The policy is CLOCK (second chance), the classic cheap
approximation of least-recently-used: the ``lru`` table ((stamp, key) -> '') keeps
sealed, unpinned objects in the order they were sealed or last given a second chance.
A release only sets the object's REFERENCED flag (one write, none for an object already
flagged), so hot objects cost no ordering writes. Walking from the old end, a
referenced object has its flag cleared and moves to the young end; an unreferenced one
that nobody holds is a victim; a held one is skipped where it stands.
The index calls ``victims`` both when a put cannot fit (inline, in the putting client's
transaction) and from the daemon's watermark sweep.
Must never: yield an object that any client holds or that is pinned (pinned objects
are not in the table), or drop anything itself: the index drops what this picks.
"""

import struct

_OFF = struct.Struct(">Q")


class ClockPolicy:
    def victims(self, txn, dbs, index):
        """Yield (key, record) of evictable objects, least recently used first.

        Each yielded object's lru entry is already deleted (through the cursor, so the
        walk stays valid); the caller must drop the object itself.
        """
        cur = txn.cursor(db=dbs.lru)
        cur.first()
        rewalk = False
        while True:
            entry = cur.key()
            if not entry:                   # empty table or past the end
                # Entries given a second chance went to the young end; if the cursor
                # fell off the end while deleting, it never reached them: walk once more
                # (their flags are clear now, so this pass ends).
                if not rewalk:
                    return
                rewalk = False
                cur.first()
                continue
            key = entry[8:]
            rec = index.record(txn, key)
            if rec is None:                 # defensive: an entry without its object
                cur.delete()
                continue
            if txn.get(_OFF.pack(rec[0]), db=dbs.holders) is not None:
                cur.next()                  # held: keep it, look further
                continue
            cur.delete()                    # moves to the next entry
            if index.is_referenced(rec):
                index.second_chance(txn, key, rec)   # re-enters at the young end
                rewalk = True
                continue
            yield key, rec
