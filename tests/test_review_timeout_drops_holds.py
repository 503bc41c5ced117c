"""Review: a request that times out (Connection.request -> _reset: shutdown of the
socket) makes the daemon drop the client (_close -> _drop_client: slot scrubbed, holds
gone, registration deleted); the watchdog then cannot resume (no registration) and the
client comes back as a NEW client ("fresh store" path), its earlier views no longer
protected: their extents are freed and reused while the caller still reads them
(claim 2). Any daemon pause longer than ``timeout`` does it; a client can cause one
(see test_review_storefull_flood.py). Here the daemon is paused with SIGSTOP.
"""

import signal
import time

import pytest

from conftest import wait_for
from kvstore.errors import StoreUnavailable


def test_a_timed_out_request_keeps_the_clients_holds(daemon):
    h = daemon.client(timeout=0.5)
    other = daemon.client()
    try:
        other.put("k", b"A" * 4096)
        view = h.get("k")
        cid = h.cid
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                h.stats()                          # times out after 0.5 s
        finally:
            time.sleep(0.2)
            daemon.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: h.connected, timeout=10, what="reconnect")
        other.delete("k")
        b = other.create("n", 4096)                # best fit: k's extent if it was freed
        b[:] = b"B" * 4096
        other.seal("n")
        assert bytes(view[:4]) == b"AAAA", "a held view now shows another object's bytes"
        assert h.cid == cid, "the client came back as a new client"
    finally:
        h.close()
        other.close()
