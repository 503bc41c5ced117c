"""Review 3: a namespace's unsealed creations are counted as used but are
not bounded the way pins are, so a namespace without a quota (or over its quota) can
take the whole segment with create() calls it never seals, and a namespace with a
quota then cannot get even the first byte of its guaranteed share (StoreFull), although
nothing of it is used. Pins are bounded by the quota for exactly this reason."""

KiB, MiB = 1 << 10, 1 << 20
NO_SWEEP = ("--high-watermark", "1.0", "--low-watermark", "0.99")


def test_unsealed_creations_cannot_take_a_guaranteed_share(make_daemon):
    d = make_daemon(size="16MiB", extra=(*NO_SWEEP, "--namespace-quotas", "b=8MiB"))
    with d.client(namespace="c") as c, d.client(namespace="b") as b:
        made = 0
        try:
            for i in range(64):                      # c has no quota: it may borrow...
                c.create(f"c{i}", 512 * KiB)
                made += 1
        except Exception:
            pass
        print("c created", made, c.stats()["namespaces"])
        # ...but b, using nothing, must still get its guaranteed share
        for i in range(8):
            b.put(f"b{i}", b"b" * 512 * KiB)
        assert all(b.contains(f"b{i}") for i in range(8))
