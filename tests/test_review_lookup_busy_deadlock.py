"""Review (after 9910b04): Reader._lookup_busy calls conn.ready() while the caller holds
the client lock (get_many/_get_pass, read_many/_read_optimistic, put_many's lookup_state
all run under it), and ready() waits for the watchdog's reconnect_once, which needs that
same lock (``with self.lock, self.io_lock``). So a get() that is waiting for an object
being created when the daemon restarts (the new daemon retires the table it is polling)
blocks its own client's reconnection until reconnect_timeout, then fails with
StoreUnavailable, although the daemon was back within a second.
"""

import signal
import threading
import time

from conftest import wait_for


def test_a_get_waiting_across_a_restart_does_not_block_its_own_reconnection(make_daemon):
    d = make_daemon()
    creator = d.client(reconnect_timeout=30)
    reader = d.client(reconnect_timeout=8)
    try:
        buf = creator.create("x", 100)
        buf[:] = b"z" * 100
        result = {}

        def wait_get():
            t0 = time.monotonic()
            try:
                v = reader.get("x", timeout=20)
                result["value"] = None if v is None else bytes(v)
            except Exception as e:               # noqa: BLE001 - reported below
                result["error"] = repr(e)
            result["took"] = time.monotonic() - t0
        t = threading.Thread(target=wait_get)
        t.start()
        time.sleep(0.3)                          # the get is polling the CREATING entry
        d.stop(signal.SIGKILL)
        d.start()
        wait_for(lambda: creator.connected, timeout=15, what="the creator reconnecting")
        creator.seal("x")
        t.join(30)
        assert "error" not in result, f"{result} (reader connected: {reader.connected})"
        assert result["value"] == b"z" * 100 and result["took"] < 5, result
    finally:
        creator.close()
        reader.close()
