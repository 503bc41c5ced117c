"""Review 3: space freed inside the used part of a client's live arena and granted to
another client as a new arena must not cut the first client off from its own arena.

Arenas were keyed by their start offset, and a seal's arena was found as the arena
with the greatest start at or below the seal's offset. When objects in the used part
of a client's live arena were deleted (or evicted), their space was free and could be
granted, under pressure, to another client as a new arena: at the very same start
(the grant's put replaced the first client's arena record, and the rest of that arena
leaked until a restart, whose index check then called the index damaged and dropped
objects), or anywhere inside (the new arena then shadowed the old one). Either way
the first client's next puts in its arena were refused by the daemon as "outside the
space granted to it", silently: put() had returned True and the putting client even
read the value back (its own seal in flight), while every other client missed it.
Found by a random workload over several namespaces (the quota accounting review)."""

import pytest

KiB = 1 << 10
NO_SWEEP = ("--high-watermark", "1.0", "--low-watermark", "0.99")


@pytest.mark.parametrize("freed", ["k0", "k1"], ids=["arena-start", "inside-arena"])
def test_space_freed_in_a_live_arena_and_granted_again(make_daemon, freed):
    d = make_daemon(size="4MiB", extra=NO_SWEEP)
    with d.client() as a, d.client() as b, d.client() as c:
        for k in ("k0", "k1", "k2"):                   # the start of a's arena
            assert a.put(k, k.encode() * 32 * KiB)
        st = a.stats()
        c.create("filler", st["size"] - st["used"])    # nothing else is free now
        c.seal("filler")
        assert a.delete(freed)                         # a hole in the used part of a's arena
        assert b.put("b0", b"b" * 64 * KiB)            # granted exactly that space
        assert a.put("k3", b"3" * 64 * KiB)            # in a's arena, past its frontier
        assert a.put("k4", b"4" * 64 * KiB)
        a.stats()                                      # a round trip: its seals are applied
        for k, v in (("k3", b"3"), ("k4", b"4")):
            assert c.contains(k), f"a's put of {k} was silently dropped by the daemon"
            assert bytes(c.read(k)) == v * 64 * KiB
        assert bytes(c.read("b0")) == b"b" * 64 * KiB
        a.close()                                      # gives back the rest of its arena
        b.close()
        assert c.verify() == []                        # no space leaked
        st = c.stats()
    assert "outside the space granted" not in d.read_log()
    d.stop()
    d.start()                                          # the next start finds nothing to mend
    with d.client() as c:
        assert bytes(c.read("k3")) == b"3" * 64 * KiB
        assert c.verify() == []
    assert "damaged" not in d.read_log()
