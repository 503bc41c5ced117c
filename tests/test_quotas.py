"""Per-namespace quotas between tenants (kvstore.store.quotas): a guaranteed share that
others' puts and the watermark sweep never evict below, own objects evicted first when a
namespace is over its quota, pins bounded by the quota, QuotaExceeded when there is no
room within the rules, and usage rebuilt after a restart. Real daemons, real eviction."""

import signal

import pytest

from kvstore.config import load_config
from kvstore.errors import ConfigError, QuotaExceeded, StoreFull

KiB, MiB = 1 << 10, 1 << 20
NO_SWEEP = ("--high-watermark", "1.0", "--low-watermark", "0.99")


def _fill(c, prefix, n, size, start=0):
    for i in range(start, start + n):
        c.put(f"{prefix}{i}", bytes([i % 251]) * size)


def _present(c, prefix, n):
    return sum(c.contains(f"{prefix}{i}") for i in range(n))


def test_without_quotas_one_namespace_evicts_another(make_daemon):
    """The behaviour quotas exist to change: plain LRU across namespaces."""
    d = make_daemon(size="16MiB", extra=NO_SWEEP)
    with d.client(namespace="b") as b, d.client(namespace="a") as a:
        _fill(b, "b", 20, 128 * KiB)
        _fill(a, "a", 200, 128 * KiB)          # 25 MiB through a 16 MiB segment
        assert _present(b, "b", 20) == 0


def test_quota_is_a_guaranteed_share(make_daemon):
    d = make_daemon(size="16MiB", extra=(*NO_SWEEP, "--namespace-quotas", "b=4MiB"))
    with d.client(namespace="b") as b, d.client(namespace="a") as a:
        _fill(b, "b", 20, 128 * KiB)           # 2.5 MiB, within b's 4 MiB
        _fill(a, "a", 200, 128 * KiB)          # a (no quota) churns through the rest
        assert _present(b, "b", 20) == 20
        assert all(bytes(b.get(f"b{i}")) == bytes([i]) * 128 * KiB and b.release(f"b{i}") is None
                   for i in range(20))
        assert _present(a, "a", 200) > 50      # a kept using what b does not need
        st = a.stats()["namespaces"]
        assert st["b"]["quota"] == 4 * MiB and st["b"]["used"] >= 20 * 128 * KiB
        assert st["a"]["quota"] == 0


def test_over_its_quota_a_namespace_evicts_its_own_objects_first(make_daemon):
    d = make_daemon(size="16MiB", extra=(*NO_SWEEP, "--namespace-quotas", "a=4MiB"))
    with d.client(namespace="c") as c, d.client(namespace="a") as a:
        _fill(c, "c", 16, 128 * KiB)           # c (no quota): the oldest objects
        _fill(a, "a", 300, 128 * KiB)          # a borrows free space, then evicts its own
        assert _present(c, "c", 16) == 16
        assert _present(a, "a", 300) > 32      # a is well over its 4 MiB quota: it borrowed


def test_a_guaranteed_share_is_taken_back_from_a_borrower(make_daemon):
    d = make_daemon(size="16MiB", extra=(*NO_SWEEP, "--namespace-quotas", "a=4MiB,b=8MiB"))
    with d.client(namespace="a") as a, d.client(namespace="b") as b:
        _fill(a, "a", 100, 128 * KiB)          # a fills (nearly) the whole segment
        _fill(b, "b", 48, 128 * KiB)           # 6 MiB: b's share comes back from a's loan
        assert _present(b, "b", 48) == 48
        kept = _present(a, "a", 100)
        assert kept * 128 * KiB >= 4 * MiB - 128 * KiB   # never below a's quota
        assert kept < 100


def test_watermark_sweep_leaves_guaranteed_shares(make_daemon):
    d = make_daemon(size="16MiB", extra=("--high-watermark", "0.5", "--low-watermark", "0.3",
                                         "--namespace-quotas", "b=8MiB"))
    with d.client(namespace="b") as b:
        _fill(b, "b", 48, 128 * KiB)           # 6 MiB: over the 50% watermark, within b's quota
        import time
        time.sleep(0.5)                        # the sweep runs every 10 ms
        assert _present(b, "b", 48) == 48


def test_pins_are_bounded_by_the_quota(make_daemon):
    d = make_daemon(size="16MiB", extra=(*NO_SWEEP, "--namespace-quotas", "a=1MiB,b=12MiB"))
    with d.client(namespace="a") as a, d.client() as other:
        for i in range(8):                      # 8 x 128 KiB: exactly a's 1 MiB quota
            assert a.put(f"p{i}", b"x" * (128 * KiB), pin=True)
        with pytest.raises(QuotaExceeded, match="quota"):
            a.put("p8", b"x" * (128 * KiB), pin=True)
        assert a.contains("p8")                 # stored, but not pinned (the error says so)
        with pytest.raises(QuotaExceeded):
            a.pin("p8")
        a.unpin("p0")
        a.pin("p8")                             # room again within a's quota
        # namespaces without a quota share the 3 MiB the quotas leave
        other.put("big", b"z" * (2 * MiB), pin=True)
        other.put("big2", b"z" * (2 * MiB))
        with pytest.raises(QuotaExceeded, match="without a quota"):
            other.pin("big2")


def test_no_room_within_the_rules_is_quota_exceeded(make_daemon):
    d = make_daemon(size="8MiB", extra=(*NO_SWEEP, "--namespace-quotas", "a=1MiB,b=7MiB"))
    with d.client(namespace="b") as b, d.client(namespace="a") as a:
        for i in range(8):
            a.put(f"p{i}", b"x" * (128 * KiB), pin=True)   # a's whole quota, pinned
        _fill(b, "b", 48, 128 * KiB)           # b takes 6 of its 7 MiB
        with pytest.raises(QuotaExceeded) as e:
            a.put("huge", b"m" * (2 * MiB))     # only b's guaranteed share could make room
        assert isinstance(e.value, StoreFull)   # callers that catch StoreFull still do
        assert "'a'" in str(e.value) and "namespace_quotas" in str(e.value)
        assert _present(b, "b", 48) == 48       # nothing of b's was evicted
        assert b.put("b-more", b"b" * (512 * KiB))   # b still gets its share


def test_usage_is_rebuilt_after_a_restart(make_daemon):
    d = make_daemon(size="16MiB", extra=(*NO_SWEEP, "--namespace-quotas", "b=4MiB"))
    with d.client(namespace="b") as b:
        _fill(b, "b", 20, 128 * KiB)
        b.pin("b0")
        before = b.stats()["namespaces"]["b"]
    d.stop(signal.SIGKILL)
    d.start()
    with d.client(namespace="b") as b, d.client(namespace="a") as a:
        assert b.stats()["namespaces"]["b"] == before
        _fill(a, "a", 200, 128 * KiB)
        assert _present(b, "b", 20) == 20


@pytest.mark.parametrize("value, match", [
    ("a", "name=size"), ("a=0", "at least 1"), ("a=2GiB", "more than"), ("a=lots", "a")])
def test_bad_quota_config(value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(env={}, overrides={"namespace_quotas": value, "size": "1GiB"})


def test_quota_config_forms():
    cfg = load_config(env={"KVSTORE_NAMESPACE_QUOTAS": "a=1GiB, =512MiB"}, overrides={"size": "4GiB"})
    assert cfg.namespace_quotas == {"a": 1 << 30, "": 512 * MiB}


def test_unsealed_creations_are_bounded_like_pins(make_daemon):
    d = make_daemon(size="16MiB", extra=(*NO_SWEEP, "--namespace-quotas", "a=1MiB,b=8MiB"))
    with d.client(namespace="a") as a, d.client(namespace="c") as c:
        for i in range(8):
            a.create(f"a{i}", 128 * KiB)        # a's whole quota, unsealed
        with pytest.raises(QuotaExceeded, match="create of b?'a8'.*unsealed"):
            a.create("a8", 128 * KiB)
        a.seal("a0")                            # sealed, it may be evicted: room again
        a.create("a8", 128 * KiB)
        with pytest.raises(QuotaExceeded, match="without a quota"):
            for i in range(64):                 # c may not hold b's share fixed either
                c.create(f"c{i}", 512 * KiB)
        assert c.stats()["namespaces"]["c"]["pinned"] <= 7 * MiB
