"""Review of issue 10: many concurrent FETCHes whose keys sit on several holders must all
be answered. The fetch pool ran each FETCH and, inside it, one task per holder on the
same 8-thread pool and waited for them without a bound: 8 FETCHes of keys on two
holders filled the pool with waiters and every later FETCH, LOCATE and DELETE_ALL of
that daemon hung for good."""

import threading
import time

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import make_kv, kv  # noqa: F401


def test_many_concurrent_fetches_from_two_holders_all_answer(kv):
    a, b, c = kv["a"], kv["b"], kv["c"]
    n = 24
    va = {f"a{i}".encode(): bytes([i]) * 3000 for i in range(n)}
    vc = {f"c{i}".encode(): bytes([100 + i]) * 3000 for i in range(n)}
    for d, values in ((a, va), (c, vc)):
        with d.client() as cl:
            for k, v in values.items():
                assert cl.put(k, v)
    deadline = time.monotonic() + 10
    with b.client() as cb:
        while not all(cb.contains_anywhere(list(va) + list(vc))):
            assert time.monotonic() < deadline, "location records did not arrive"
            time.sleep(0.05)
    clients = [b.client(timeout=6.0) for _ in range(n)]
    barrier = threading.Barrier(n)
    results, errors = {}, []

    def one(i):
        ka, kc = f"a{i}".encode(), f"c{i}".encode()
        try:
            barrier.wait(10)
            got = clients[i].get_many([ka, kc])     # two holders: one pull task each
            results[i] = [bytes(x) if x is not None else None for x in got]
            clients[i].release_many([ka, kc])
        except Exception as e:                       # noqa: BLE001 (asserted below)
            errors.append((i, repr(e)))
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    took = time.monotonic() - t0
    for cl in clients:
        cl.close()
    assert not errors, f"{len(errors)} gets failed, first: {errors[:2]}"
    for i in range(n):
        assert results[i] == [va[f"a{i}".encode()], vc[f"c{i}".encode()]]
    assert took < 6, f"{n} concurrent two-holder fetches took {took:.1f} s"
    with b.client(timeout=5.0) as cb:                # the daemon still answers cluster requests
        assert cb.contains_anywhere([b"a0", b"nowhere"]) == [True, False]
