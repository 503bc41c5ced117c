"""kvstore.slots: the slots file (SlotsFile, the daemon) and a client's view (ClientSlot).

A SlotsFile in tmp_path (nslots=8) and ClientSlots on an os.open fd of the same file,
mapped from SlotsFile.describe(). Covers: hold(offset) shows in SlotsFile.held([slot])
(offset 0 included: entries are stored +1), unhold removes it, freed entries are reused,
the same offset held twice, holds of several slots merged sorted and unique, clear(),
scrub(slot) (no holds, counters zero, a new client of the slot starts empty), the seal
counters (note_sent / applied / applied_mine / in_flight / caught_up / settle / set_high),
reopening the file (same layout: adopted, holds and counters kept; another nslots or
capacity: not adopted, empty), a second ClientSlot of the same slot picking up its
entries, and TooManyHolds past a small hold capacity.
"""

import os

import numpy as np
import pytest

from kvstore.errors import TooManyHolds
from kvstore.slots import ClientSlot, SlotsFile

NSLOTS = 8


class Slots:
    def __init__(self, path, nslots=NSLOTS, **kw):
        self.path = str(path)
        self.file = SlotsFile(self.path, nslots, **kw)
        self.desc = self.file.describe()
        self.fd = os.open(self.path, os.O_RDWR)
        self.clients = []

    def client(self, slot):
        c = ClientSlot(self.fd, self.desc, slot)
        self.clients.append(c)
        return c

    def held(self, *slots):
        return self.file.held(list(slots)).tolist()

    def close(self):
        for c in self.clients:
            c.close()
        os.close(self.fd)
        self.file.close()


@pytest.fixture
def slots(tmp_path):
    s = Slots(tmp_path / "slots")
    yield s
    s.close()


# ---- holds ---------------------------------------------------------------------------------
def test_no_holds_at_first(slots):
    assert slots.held(*range(NSLOTS)) == []
    assert slots.file.held([]).dtype == np.uint64 and len(slots.file.held([])) == 0


def test_hold_shows_in_held(slots):
    c = slots.client(3)
    c.hold(4096)
    assert slots.held(3) == [4096]
    assert slots.held(0, 1, 2, 4) == []


def test_hold_of_offset_zero_and_the_largest_offset(slots):
    c = slots.client(0)
    c.hold(0)
    c.hold(2 ** 64 - 2)
    assert slots.held(0) == [0, 2 ** 64 - 2]


def test_unhold_removes_the_hold(slots):
    c = slots.client(1)
    i = c.hold(64)
    j = c.hold(128)
    c.unhold(i)
    assert slots.held(1) == [128]
    c.unhold(j)
    assert slots.held(1) == []


def test_freed_entries_are_reused(slots):
    c = slots.client(2)
    idx = [c.hold(64 * k) for k in range(5)]
    assert idx == [0, 1, 2, 3, 4] and c.count == 5
    c.unhold(1)
    c.unhold(3)
    assert sorted([c.hold(1000 * 64), c.hold(2000 * 64)]) == [1, 3]
    assert c.count == 5                               # no new entry was used
    assert c.hold(3000 * 64) == 5 and c.count == 6
    assert slots.held(2) == [0, 128, 256, 1000 * 64, 2000 * 64, 3000 * 64]


def test_the_same_offset_held_twice_needs_two_unholds(slots):
    c = slots.client(0)
    i, j = c.hold(640), c.hold(640)
    assert i != j and slots.held(0) == [640]
    c.unhold(i)
    assert slots.held(0) == [640]
    c.unhold(j)
    assert slots.held(0) == []


def test_holds_of_several_slots_are_merged_sorted_and_unique(slots):
    a, b, c = slots.client(0), slots.client(5), slots.client(7)
    for off in (512, 64, 4096):
        a.hold(off)
    for off in (64, 128):
        b.hold(off)
    c.hold(1 << 40)
    assert slots.held(0, 5, 7) == [64, 128, 512, 4096, 1 << 40]
    assert slots.held(5) == [64, 128]
    assert slots.held(7, 0) == [64, 512, 4096, 1 << 40]


def test_clear_drops_every_hold_and_entries_are_reused(slots):
    c = slots.client(4)
    for k in range(10):
        c.hold(64 * k)
    c.clear()
    assert slots.held(4) == []
    assert sorted(c.hold(64 * (100 + k)) for k in range(10)) == list(range(10))
    assert c.count == 10
    assert slots.held(4) == [64 * (100 + k) for k in range(10)]


def test_a_second_mapping_of_a_slot_picks_up_its_entries(slots):
    """A ClientSlot made over a region in use (e.g. a re-attach) sees the count and reuses
    the free entries below it."""
    c = slots.client(6)
    for k in range(4):
        c.hold(64 * k)
    c.unhold(1)
    again = slots.client(6)
    assert again.count == 4
    assert again.hold(9 * 64) == 1
    assert again.hold(10 * 64) == 4
    assert slots.held(6) == [0, 128, 192, 9 * 64, 10 * 64]


def test_scrub_empties_a_slot_and_zeroes_its_counters(slots):
    c = slots.client(2)
    other = slots.client(3)
    for k in range(6):
        c.hold(64 * k)
    other.hold(999 * 64)
    c.note_sent(17)
    slots.file.applied[2] = 12
    slots.file.scrub(2)
    assert slots.held(2) == []
    assert int(slots.file.sent[2]) == 0 and int(slots.file.applied[2]) == 0
    assert int(c.sent[2]) == 0 and c.applied_mine() == 0
    assert slots.held(3) == [999 * 64]                 # other slots untouched
    fresh = slots.client(2)
    assert fresh.count == 0
    assert fresh.hold(64) == 0


def test_scrub_of_an_unused_slot(slots):
    slots.file.scrub(NSLOTS - 1)
    assert slots.held(NSLOTS - 1) == []


# ---- seal counters -------------------------------------------------------------------------
def test_counters_start_at_zero(slots):
    c = slots.client(0)
    assert c.in_flight() == {}
    assert c.applied_mine() == 0
    assert c.caught_up({})


def test_note_sent_and_applied(slots):
    c = slots.client(1)
    c.note_sent(5)
    assert int(slots.file.sent[1]) == 5               # the daemon sees what the client wrote
    assert c.in_flight() == {1: 5}
    slots.file.applied[1] = 3
    assert c.applied_mine() == 3
    assert c.in_flight() == {1: 5}
    assert not c.caught_up({1: 5}) and c.caught_up({1: 3})
    slots.file.applied[1] = 5
    assert c.in_flight() == {}
    assert c.caught_up({1: 5})


def test_in_flight_names_every_slot_with_seals_pending(slots):
    me, a, b = slots.client(0), slots.client(3), slots.client(7)
    a.note_sent(10)
    b.note_sent(4)
    slots.file.applied[7] = 4
    assert me.in_flight() == {3: 10}
    b.note_sent(6)
    assert me.in_flight() == {3: 10, 7: 6}
    want = me.in_flight()
    assert not me.caught_up(want)
    slots.file.applied[3] = 10
    assert not me.caught_up(want)
    slots.file.applied[7] = 6
    assert me.caught_up(want)
    assert me.in_flight() == {}


def test_in_flight_ignores_applied_ahead_of_sent(slots):
    c = slots.client(0)
    slots.file.applied[2] = 9                         # e.g. settled, then the slot's sent was reset
    assert c.in_flight() == {}


def test_in_flight_with_large_counters(slots):
    c = slots.client(0)
    c.note_sent(2 ** 63 + 5)
    slots.file.applied[0] = 2 ** 63 + 4
    assert c.in_flight() == {0: 2 ** 63 + 5}


def test_settle_forgets_a_gone_clients_seals(slots):
    gone, me = slots.client(5), slots.client(0)
    gone.note_sent(8)
    slots.file.applied[5] = 2
    assert me.in_flight() == {5: 8}
    slots.file.settle(5)
    assert me.in_flight() == {}
    assert int(slots.file.applied[5]) == 8


def test_set_high_limits_the_slots_readers_scan(slots):
    me, low, high = slots.client(0), slots.client(1), slots.client(6)
    low.note_sent(3)
    high.note_sent(4)
    slots.file.set_high(2)
    assert me.in_flight() == {1: 3}
    slots.file.set_high(NSLOTS)
    assert me.in_flight() == {1: 3, 6: 4}


# ---- reopening -----------------------------------------------------------------------------
def test_a_fresh_file_is_not_adopted(slots):
    assert slots.file.adopted is False


def test_reopening_with_the_same_layout_adopts_and_keeps_holds(tmp_path):
    path = tmp_path / "slots"
    s = Slots(path)
    c = s.client(4)
    c.hold(64)
    c.hold(8192)
    c.note_sent(11)
    s.file.applied[4] = 7
    s.close()
    again = Slots(path)
    try:
        assert again.file.adopted is True
        assert again.held(4) == [64, 8192]
        assert int(again.file.sent[4]) == 11 and int(again.file.applied[4]) == 7
        c2 = again.client(4)
        assert c2.count == 2 and c2.in_flight() == {4: 11}
    finally:
        again.close()


def test_reopening_while_the_first_handle_is_open_shares_the_holds(tmp_path):
    s = Slots(tmp_path / "slots")
    try:
        c = s.client(0)
        c.hold(640)
        second = SlotsFile(s.path, NSLOTS)
        try:
            assert second.adopted is True
            assert second.held([0]).tolist() == [640]
            c.hold(1280)
            assert second.held([0]).tolist() == [640, 1280]
        finally:
            second.close()
    finally:
        s.close()


@pytest.mark.parametrize("kw", [dict(nslots=4), dict(nslots=16), dict(nslots=NSLOTS, capacity=4096)])
def test_reopening_with_another_layout_does_not_adopt(tmp_path, kw):
    path = tmp_path / "slots"
    s = Slots(path)
    s.client(1).hold(64)
    s.client(1).note_sent(3)
    s.close()
    nslots = kw.pop("nslots")
    again = Slots(path, nslots, **kw)
    try:
        assert again.file.adopted is False
        assert again.held(*range(min(nslots, NSLOTS))) == []
        assert not again.file.sent.any() and not again.file.applied.any()
        assert again.client(1).count == 0
    finally:
        again.close()


def test_reopening_a_file_that_is_not_a_slots_file(tmp_path):
    path = tmp_path / "slots"
    path.write_bytes(b"x" * 100)
    s = Slots(path)
    try:
        assert s.file.adopted is False and s.held(0) == []
    finally:
        s.close()


# ---- capacity ------------------------------------------------------------------------------
def test_too_many_holds_past_capacity(tmp_path):
    s = Slots(tmp_path / "slots", capacity=4)
    try:
        assert s.desc["hold_capacity"] == 4
        c = s.client(2)
        assert [c.hold(64 * k) for k in range(4)] == [0, 1, 2, 3]
        with pytest.raises(TooManyHolds):
            c.hold(64 * 10)
        assert s.held(2) == [0, 64, 128, 192]          # the refused hold left nothing behind
        c.unhold(2)
        assert c.hold(64 * 10) == 2                   # room again once one is released
        with pytest.raises(TooManyHolds):
            c.hold(64 * 11)
        c.clear()
        assert [c.hold(64 * k) for k in range(4)] and s.held(2) == [0, 64, 128, 192]
    finally:
        s.close()


def test_small_capacity_slots_do_not_overlap(tmp_path):
    s = Slots(tmp_path / "slots", capacity=4)
    try:
        cs = [s.client(i) for i in range(NSLOTS)]
        for i, c in enumerate(cs):
            for k in range(4):
                c.hold((i * 100 + k) * 64)
        for i in range(NSLOTS):
            assert s.held(i) == [(i * 100 + k) * 64 for k in range(4)]
    finally:
        s.close()
