"""kvstore.record: the packed object record.

Covers pack/unpack round trips for edge values (zero and 2**64-1 in every u64 field,
every State, every Flag combination, the limits of replicas (u16) and incarnation
(u32)), the named fields surviving the round trip (incarnation and replicas are packed
in the opposite order from the tuple's), PACKED_SIZE, and that unpack of a buffer of the
wrong length raises struct.error.
"""

import itertools
import struct

import pytest

from kvstore import record
from kvstore.record import Flag, Record, State

U64_MAX = 2 ** 64 - 1


def _rec(**kw):
    base = dict(offset=0, size=0, creator=0, stamp=0, checksum=0, state=State.CREATING)
    base.update(kw)
    return Record(**base)


def test_packed_size_is_48_bytes():
    assert record.PACKED_SIZE == 48
    assert len(record.pack(_rec())) == record.PACKED_SIZE


def test_defaults():
    r = _rec()
    assert r.flags == Flag.NONE and r.incarnation == 0 and r.replicas == 1
    assert record.unpack(record.pack(r)) == r


@pytest.mark.parametrize("value", [0, 1, 2 ** 32, U64_MAX - 1, U64_MAX])
@pytest.mark.parametrize("field", ["offset", "size", "creator", "stamp", "checksum"])
def test_u64_fields_round_trip_at_the_edges(field, value):
    r = _rec(**{field: value})
    back = record.unpack(record.pack(r))
    assert back == r
    assert getattr(back, field) == value


def test_all_u64_fields_at_max_at_once():
    r = Record(U64_MAX, U64_MAX, U64_MAX, U64_MAX, U64_MAX, State.SEALED, Flag.PINNED,
               2 ** 32 - 1, 2 ** 16 - 1)
    assert record.unpack(record.pack(r)) == r


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("flags", [Flag(0)] + [Flag(sum(c)) for n in range(1, len(Flag) + 1)
                                               for c in itertools.combinations([f.value for f in Flag if f.value], n)])
def test_every_state_and_flag_combination(state, flags):
    r = _rec(offset=4096, size=123, state=state, flags=flags)
    back = record.unpack(record.pack(r))
    assert back == r
    assert type(back.state) is State and back.state is state
    assert isinstance(back.flags, Flag) and back.flags == flags
    assert back.sealed == (state == State.SEALED)
    assert back.pinned == bool(flags & Flag.PINNED)


@pytest.mark.parametrize("incarnation, replicas", [
    (0, 0), (0, 1), (1, 3), (7, 2 ** 16 - 1), (2 ** 32 - 1, 1), (2 ** 32 - 1, 2 ** 16 - 1), (12345, 42),
])
def test_replicas_and_incarnation_keep_their_names(incarnation, replicas):
    r = _rec(state=State.SEALED, incarnation=incarnation, replicas=replicas)
    back = record.unpack(record.pack(r))
    assert back.incarnation == incarnation
    assert back.replicas == replicas
    assert back == r


def test_fields_are_not_swapped():
    """Distinct values in every field come back in the same named field."""
    r = Record(offset=11, size=22, creator=33, stamp=44, checksum=55, state=State.SEALED,
               flags=Flag.PINNED, incarnation=66, replicas=77)
    assert record.unpack(record.pack(r))._asdict() == r._asdict()


def test_unpack_accepts_any_bytes_like_of_the_right_length():
    raw = record.pack(_rec(offset=64, size=10, state=State.SEALED))
    assert record.unpack(bytearray(raw)) == record.unpack(raw)
    assert record.unpack(memoryview(raw)) == record.unpack(raw)


def test_state_byte_sits_after_the_five_u64s():
    """kvstore.store.objects.keys reads the state at byte 40 without unpacking."""
    raw = record.pack(_rec(state=State.SEALED))
    assert raw[40] == State.SEALED
    assert record.pack(_rec(state=State.CREATING))[40] == State.CREATING


@pytest.mark.parametrize("n", [0, 1, record.PACKED_SIZE - 1, record.PACKED_SIZE + 1, 2 * record.PACKED_SIZE])
def test_unpack_of_wrong_length_raises_struct_error(n):
    with pytest.raises(struct.error):
        record.unpack(b"\x00" * n)


@pytest.mark.parametrize("field, value", [
    ("offset", -1), ("offset", 2 ** 64), ("replicas", 2 ** 16), ("incarnation", 2 ** 32), ("incarnation", -1),
])
def test_pack_of_out_of_range_field_raises_struct_error(field, value):
    with pytest.raises(struct.error):
        record.pack(_rec(**{field: value}))
