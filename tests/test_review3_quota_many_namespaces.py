"""Review 3: with quotas configured, many namespaces must not break stats() for
everyone, and namespaces that are empty again must not be remembered for ever.

stats()["namespaces"] listed every namespace in use; past about a thousand of them the
STATS reply exceeded the 64 KiB message limit and every client's stats() failed with
a ProtocolError. And the daemon kept a count for every namespace it had ever seen
(empty ones too), which every eviction walks."""

from kvstore.keys import namespace_prefix

QUOTAS = ("--namespace-quotas", "tenant=4MiB")


def test_stats_with_many_namespaces(make_daemon):
    d = make_daemon(size="64MiB", extra=QUOTAS)
    names = [f"user-{i:05d}-" + "x" * 40 for i in range(1500)]
    for n in names:
        with d.client(namespace=n) as c:
            assert c.put("k", b"v" * 100)
    with d.client(namespace="tenant") as t:
        assert t.put("k", b"t" * 1000)
        st = t.stats()                                 # failed: the reply was too big
        ns = st["namespaces"]
        assert ns["tenant"]["quota"] == 4 << 20        # the configured ones are always there
        assert len(ns) < 1500
        assert st["namespaces_in_use"] == 1501         # and how many there are in all
    for n in names:                                    # empty them again
        with d.client(namespace=n) as c:
            assert c.delete("k")
    with d.client(namespace="tenant") as t:
        st = t.stats()
        assert st["namespaces_in_use"] == 1, st["namespaces"]
        assert set(st["namespaces"]) == {"tenant"}
