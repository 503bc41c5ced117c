"""Review: a client that raises its own ``sent`` word (slots file, written with a plain
store: the client maps the whole counters area read-write) with nothing in its ring
makes every other client's miss (get/contains/read/delete/pin/keys settle) wait up to
SETTLE_WAIT = 1 s, and keeps the daemon from ever sleeping (_rings_waiting -> select
timeout 0) until _settle_counters, once a second, levels it; the client can raise it
again at once. Claims 1 and 5 ("a hostile sent counter ... is ignored").
"""

import time


def test_a_hostile_sent_counter_does_not_delay_other_clients(daemon):
    bad = daemon.client()
    c = daemon.client()
    try:
        slot = bad._conn.att.slot
        worst = 0.0
        for i in range(4):
            slot.sent[slot.slot] = int(slot.applied[slot.slot]) + 1000
            t0 = time.monotonic()
            assert c.get(f"missing{i}") is None
            worst = max(worst, time.monotonic() - t0)
        assert worst < 0.2, f"a miss waited {worst:.2f} s for seals that will never come"
    finally:
        c.close()
        bad.close()
