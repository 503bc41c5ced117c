"""Review 11: pooled control links that the peer closed (it restarted; or, since this
change, they sat idle for CONTROL_IDLE = 60 s while the member poll kept only one of
them busy) make requests to a healthy peer fail. ClusterNode.request retries a failed
pooled link once, but the retry pops the NEXT pooled link, which is just as dead: with
two or more stale links pooled the request raises. The reannounce a restart triggers is
such a request, so the restarted home never gets this daemon's location records (they
are "sent again when the membership changes", which already happened)."""

import signal
import threading
import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401
from kvstore.cluster.directory import homes


def test_requests_to_a_restarted_peer_do_not_fail_on_stale_pooled_links(kv):
    a, b, c = kv["a"], kv["b"], kv["c"]
    ids = [a.id, b.id, c.id]
    with a.client() as ca:
        ours = [k for k in (f"ann{i}".encode() for i in range(600)) if b.id in homes(ca._key(k), ids)][:30]
        probe = [k for k in (f"prb{i}".encode() for i in range(3000))
                 if homes(ca._key(k), ids) == [b.id, c.id]][:64]
        assert ca.put_many(ours, [b"o" * 200] * len(ours)) == [True] * len(ours)
    # several control links from a to b at once (concurrent lookups on b), then pooled
    errors = []

    def hammer(ks):
        try:
            with a.client() as c1:
                for _ in range(5):
                    c1.contains_anywhere(ks)
        except Exception as e:                          # noqa: BLE001
            errors.append(e)
    ts = [threading.Thread(target=hammer, args=(probe[i::8],)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    deadline = time.monotonic() + 10
    while b.cluster_stats().get("location_records", 0) < len(ours):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = a.cluster_stats().get("announce_failures", 0)
    b.kill(signal.SIGKILL)
    b.start()
    kv.wait_members(3)
    deadline = time.monotonic() + 8
    while b.cluster_stats().get("location_records", 0) < len(ours) and time.monotonic() < deadline:
        time.sleep(0.1)
    failed = a.cluster_stats().get("announce_failures", 0) - before
    held = b.cluster_stats().get("location_records", 0)
    assert failed == 0 and held >= len(ours), (
        f"a's reannounce to the restarted home b failed {failed} time(s) on stale pooled links; "
        f"b keeps {held} of a's {len(ours)} records")
