"""Review 3: keys() of a namespace holding many long keys. A KEYS reply carried up to
512 keys; 512 keys of the longest kind allowed (a 64-byte namespace and 256-byte keys)
are about 164 KiB, past the 64 KiB message limit, so keys() failed (reported as a lost
daemon) for any namespace with a few hundred keys over about 128 bytes."""


def test_keys_of_many_long_keys(daemon):
    with daemon.client(namespace="n" * 64) as c:
        ks = [("%05d" % i) + "k" * 250 for i in range(1200)]
        assert c.put_many(ks, [b"v"] * len(ks)) == [True] * len(ks)
        got = c.keys()
        assert sorted(k.decode() if isinstance(k, bytes) else k for k in got) == sorted(ks)
