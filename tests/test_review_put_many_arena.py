"""Review: put_many whose values cross an arena boundary.

Writer._take() gives the old arena back (a one-way RETURN on the socket) and asks for
a new one (GRANT) while the seals of the values already copied into the old arena in
this same put_many are still only in the local ``items`` list: they reach the ring in
the ``finally`` of put_many, after the daemon has applied the RETURN. The daemon frees
[frontier, end) of the old arena, which includes those values, and the GRANT hands the
same space out again (here: to the same client, at the same offset), so a later value
of the batch is copied over an earlier one. The earlier seal is then accepted (it lies
at the new arena's frontier) with the old checksum over the new bytes, and the later
seal is refused as 'outside the space granted'.
"""


def test_put_many_across_an_arena_boundary_keeps_every_value(daemon):
    c = daemon.client()
    other = daemon.client()
    try:
        vals = [bytes([i]) * (400 << 10) for i in (1, 2, 3)]   # 3 x 400 KiB > first 1 MiB arena
        assert c.put_many(["a", "b", "c"], vals) == [True, True, True]
        for k, v in zip("abc", vals):
            view = other.get(k)
            assert view is not None, f"{k}: a put that returned True is missing"
            try:
                assert bytes(view[:16]) == v[:16], f"{k}: a view of another value's bytes"
            finally:
                other.release(k)
        for k, v in zip("abc", vals):
            assert other.read(k) == v
        assert other.verify() == []
    finally:
        c.close()
        other.close()
