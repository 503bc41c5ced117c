"""Eviction policy: which sealed objects go when space is needed. It advises; the caller acts.

Owns: the decision for one candidate at a time. The policy is CLOCK (second chance), the
cheap approximation of least-recently-used. The caller (kvstore.store.objects) walks
sealed, unpinned objects from the oldest end of its ``lru`` table and asks about each
``Candidate``: its key, size, whether a client holds it, and whether it was used since
its last second chance (the "referenced" mark clients set in the published table).
The answer is SKIP (held: keep it where it stands), SECOND_CHANCE (the caller clears the
mark and moves it to the young end) or EVICT (the caller unpublishes it, and frees its
extent once no hold table names it). Like Plasma's policy, this module never touches a
table, a record or an extent.
Must never: advise evicting a held object (pinned objects are never offered).
"""

import enum
from typing import NamedTuple


class Candidate(NamedTuple):
    key: bytes
    size: int
    held: bool
    referenced: bool


class Advice(enum.Enum):
    SKIP = "skip"
    SECOND_CHANCE = "second chance"
    EVICT = "evict"


class ClockPolicy:
    def advise(self, c):
        if c.held:
            return Advice.SKIP
        if c.referenced:
            return Advice.SECOND_CHANCE
        return Advice.EVICT

    def victims(self, candidates, need):
        """For a plain walk (tests, tools): advice for candidates in age order until the
        evicted sizes add up to ``need`` bytes. Yields (candidate, advice)."""
        freed = 0
        for c in candidates:
            a = self.advise(c)
            yield c, a
            if a is Advice.EVICT:
                freed += c.size
                if freed >= need:
                    return
