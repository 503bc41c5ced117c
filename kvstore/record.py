"""The object record: what the store knows about one object, named, and packed in one place.

Owns: the ``Record`` fields and their byte layout in the daemon's LMDB index, the
``State`` and ``Flag`` enums, and the fixed-size packing of the fields the cluster will
need (the daemon ``incarnation`` that sealed the object, the number of ``replicas``
asked for). Everything that reads or writes a record goes through ``pack``/``unpack``
here; nothing indexes a record by position.
Must never: change the layout without bumping ``LAYOUT`` (the daemon refuses to adopt an
index written with another layout, and starts empty).
"""

import enum
import struct
from typing import NamedTuple

#: Bumped whenever the packed layout below changes.
LAYOUT = 3


class State(enum.IntEnum):
    CREATING = 1      # space reserved by create(); visible as "being created", never readable
    SEALED = 2        # immutable and readable by everyone


class Flag(enum.IntFlag):
    NONE = 0
    PINNED = 1        # never evicted until unpinned


class Record(NamedTuple):
    offset: int           # where the object's bytes start in the segment
    size: int             # its length in bytes
    creator: int          # client id that created (or sealed) it
    stamp: int            # CLOCK order: monotonic ns of its seal or last second chance
    checksum: int         # xxh3-64 of its bytes, recorded at seal (0 while CREATING)
    state: State
    flags: Flag = Flag.NONE
    incarnation: int = 0  # the daemon run that sealed it (cluster: locations are per run)
    replicas: int = 1     # copies the writer asked for (cluster placement)

    @property
    def sealed(self):
        return self.state == State.SEALED

    @property
    def pinned(self):
        return bool(self.flags & Flag.PINNED)


_PACK = struct.Struct("<QQQQQBBHI")     # 48 bytes


def pack(rec):
    return _PACK.pack(rec.offset, rec.size, rec.creator, rec.stamp, rec.checksum,
                      rec.state, rec.flags, rec.replicas, rec.incarnation)


def unpack(raw):
    off, size, creator, stamp, csum, state, flags, replicas, inc = _PACK.unpack(raw)
    return Record(off, size, creator, stamp, csum, State(state), Flag(flags), inc, replicas)


#: Size of a packed record (tests and recovery read many at once).
PACKED_SIZE = _PACK.size
