"""A store outage, from a client's side: real daemons killed and restarted.

Creating a Client while the daemon restarts waits for it (a socket path that never
existed fails at once); calls made while the daemon is away wait at most
reconnect_timeout per outage, then fail at once until the watchdog is back (at once
from the start with fail_fast); a segment truncated behind the daemon's back gives a
new client a typed SegmentGone instead of a raw ValueError (in a child process).
"""

import os
import signal
import threading
import time

import pytest

from conftest import run_py, wait_for
from kvstore.client import Client
from kvstore.errors import ClientClosed, SegmentGone, StoreUnavailable


def test_socket_that_never_existed_fails_at_once(tmp_path):
    path = str(tmp_path / "nobody.sock")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="does not exist") as e:
        Client(path, reconnect_timeout=30)
    assert time.monotonic() - t0 < 1.0
    assert f"kvstore-daemon --socket {path}" in str(e.value)       # the fix is named


def test_path_that_is_not_a_socket_fails_at_once(tmp_path):
    path = tmp_path / "kv.sock"
    path.write_text("not a socket")
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="is not a socket"):
        Client(str(path), reconnect_timeout=30)
    assert time.monotonic() - t0 < 1.0


def test_client_created_while_the_daemon_restarts_waits_for_it(make_daemon):
    """SIGKILL leaves the socket file behind: a Client created then keeps trying for up
    to reconnect_timeout, and connects to the daemon once it is back."""
    d = make_daemon()
    with d.client() as c:
        c.put("k", b"before the restart")
    d.stop(signal.SIGKILL)
    assert os.path.exists(d.socket)
    got = {}

    def create():
        t0 = time.monotonic()
        try:
            got["client"] = Client(d.socket, reconnect_timeout=30)
        except Exception as e:        # reported below
            got["error"] = e
        got["took"] = time.monotonic() - t0

    t = threading.Thread(target=create)
    t.start()
    time.sleep(1.0)
    assert t.is_alive() and not got, got          # still waiting, not failed at once
    d.start()
    t.join(30)
    assert not t.is_alive()
    assert "error" not in got, got
    c = got["client"]
    try:
        assert got["took"] >= 1.0
        assert bytes(c.read("k")) == b"before the restart"
        assert c.put("k2", b"after")
    finally:
        c.close()


def test_stale_socket_without_a_daemon_fails_after_reconnect_timeout(make_daemon):
    d = make_daemon()
    d.stop(signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="no kvstore daemon answers") as e:
        Client(d.socket, reconnect_timeout=0.5)
    took = time.monotonic() - t0
    assert 0.4 <= took < 3.0
    assert "kvstore-daemon --socket" in str(e.value)


def test_calls_wait_once_per_outage_then_fail_at_once(make_daemon):
    """The first call in an outage waits (until reconnect_timeout after it began); every
    later call fails at once instead of waiting again; after the restart calls work."""
    d = make_daemon()
    c = d.client(reconnect_timeout=1.0)
    try:
        c.put("k", b"v")
        d.stop(signal.SIGKILL)
        wait_for(lambda: c._down, what="the watchdog noticing the outage")
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unreachable"):
            c.get("k")
        first = time.monotonic() - t0
        assert 0.5 <= first < 3.0
        t0 = time.monotonic()
        for i in range(50):
            with pytest.raises(StoreUnavailable):
                c.put(f"x{i}", b"y")
            with pytest.raises(StoreUnavailable):
                c.contains("k")
        assert time.monotonic() - t0 < 0.5            # 100 calls, not 100 waits
        d.start()
        wait_for(lambda: c.connected, timeout=20, what="reconnection")
        assert bytes(c.read("k")) == b"v"
        # a new outage waits again (once)
        d.stop(signal.SIGKILL)
        wait_for(lambda: c._down, what="the second outage")
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            c.stats()
        assert time.monotonic() - t0 >= 0.5
    finally:
        c.close()


def test_fail_fast_never_waits(make_daemon):
    d = make_daemon()
    c = Client(d.socket, reconnect_timeout=30, fail_fast=True)
    try:
        c.put("k", b"v")
        d.stop(signal.SIGKILL)
        wait_for(lambda: c._down, what="the watchdog noticing the outage")
        t0 = time.monotonic()
        for _ in range(20):
            with pytest.raises(StoreUnavailable):
                c.read("k")
        assert time.monotonic() - t0 < 0.5
        d.start()
        wait_for(lambda: c.connected, timeout=20, what="reconnection in the background")
        assert bytes(c.read("k")) == b"v"
    finally:
        c.close()


TRUNCATED_CHILD = """
import sys
from kvstore.client import Client
from kvstore.errors import SegmentGone
try:
    Client(sys.argv[1], reconnect_timeout=2)
except SegmentGone as e:
    print("SegmentGone:", e)
    sys.exit(0)
except Exception as e:
    print("other:", type(e).__name__, e)
    sys.exit(3)
print("connected")
sys.exit(4)
"""


@pytest.mark.parametrize("keep", [0, 4096])
def test_truncated_segment_gives_new_clients_segment_gone(make_daemon, keep):
    """The segment file truncated behind the running daemon's back (to nothing, or to
    one page): a new client, in a child process, gets SegmentGone naming the fix, not
    ``ValueError: mmap length is greater than file size``."""
    d = make_daemon()
    with d.client() as c:
        path = c.stats()["segment_path"]
    if not path.startswith("/dev/shm/"):
        pytest.skip(f"the segment is on {path}, not /dev/shm: this test truncates a /dev/shm segment")
    os.truncate(path, keep)
    r = run_py(TRUNCATED_CHILD, d.socket, check=False, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    # refused by the daemon's check at HELLO, or by the client's own check of the file
    assert "SegmentGone:" in r.stdout and "restart the daemon" in r.stdout.lower(), r.stdout
    assert path in r.stdout and "truncated" in r.stdout
    assert issubclass(SegmentGone, StoreUnavailable)    # callers catching outages catch it too


RACE_CHILD = """
import os, socket, sys
from kvstore import protocol
from kvstore.client.connection import Attachment
from kvstore.errors import SegmentGone
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(protocol.hello(os.getpid(), "", None))
mtype, body, fds = protocol.recv_message(s, with_fds=3)
assert mtype == protocol.WELCOME, mtype
os.truncate(sys.argv[2], int(sys.argv[3]))      # after the daemon's check, before our mapping
try:
    Attachment(body, *fds)
except SegmentGone as e:
    print("SegmentGone:", e)
    sys.exit(0)
except Exception as e:
    print("other:", type(e).__name__, e)
    sys.exit(3)
print("mapped")
sys.exit(4)
"""


def test_segment_truncated_after_the_daemons_check_gives_segment_gone(make_daemon):
    """The client checks the file itself before mapping it: a truncation after the
    daemon's check at HELLO (a real WELCOME and its fds, then os.truncate) still gives
    SegmentGone naming the file and the fix, in a child process that survives."""
    d = make_daemon()
    with d.client() as c:
        path = c.stats()["segment_path"]
    if not path.startswith("/dev/shm/"):
        pytest.skip(f"the segment is on {path}, not /dev/shm: this test truncates a /dev/shm segment")
    r = run_py(RACE_CHILD, d.socket, path, 8192, check=False, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "SegmentGone:" in r.stdout and path in r.stdout and "restart the daemon" in r.stdout
    assert "mmap length" not in r.stdout + r.stderr


def test_store_link_serves_without_the_daemon_and_connects_in_the_background(make_daemon, caplog):
    """The engine adapters' StoreLink: no daemon at start is one WARNING and calls that
    fail at once; when the daemon starts, a background thread connects (one INFO)."""
    import logging
    from kvstore.client.adapters._link import StoreLink
    caplog.set_level(logging.INFO, logger="kvstore.test-link")
    d = make_daemon(start=False)
    link = StoreLink(d.socket, logger=logging.getLogger("kvstore.test-link"), name="test").start()
    try:
        t0 = time.monotonic()
        for _ in range(100):
            with pytest.raises(StoreUnavailable) as e:
                link.client()
            assert link.failed(e.value)          # an outage: the caller logs nothing
        assert time.monotonic() - t0 < 0.5
        assert not link.failed(ValueError("not an outage"))
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "unavailable" in warned[0].getMessage()
        assert link.outages == 1 and link.failed_calls >= 200
        d.start()
        wait_for(lambda: link.connected, timeout=20, what="the background connection")
        assert link.client().put("k", b"v")
        assert any("is back" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    finally:
        link.close()
    with pytest.raises(ClientClosed) as e:     # after close(): closed, and counted as an outage
        link.client()
    assert link.failed(e.value)


LINK_FORK_CHILD = """
import multiprocessing, sys
from kvstore.client.adapters._link import StoreLink
link = StoreLink(sys.argv[1]).start()
parent_cid = link.client().cid
link.client().put("from-parent", b"p")

def child(q):
    c = link.client()                 # not the parent's client: a new one of its own
    q.put((c.cid, bytes(c.read("from-parent")), c.put("from-child", b"c")))

ctx = multiprocessing.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
cid, got, wrote = q.get(timeout=30)
p.join(30)
assert p.exitcode == 0, p.exitcode
assert cid != parent_cid and got == b"p" and wrote, (cid, parent_cid, got, wrote)
assert bytes(link.client().read("from-child")) == b"c"     # the parent's client still works
link.close()
print("ok")
"""


def test_store_link_after_fork_uses_a_client_of_its_own(daemon):
    r = run_py(LINK_FORK_CHILD, daemon.socket, timeout=60)
    assert r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_hung_daemon_costs_one_timeout_per_outage(make_daemon):
    """A daemon that stops answering (SIGSTOP): the first call waits its ``timeout``,
    the connection is reset and the watchdog takes over; later calls wait at most what
    is left of reconnect_timeout, then fail at once; after SIGCONT the client is back."""
    d = make_daemon()
    c = d.client(timeout=1.0, reconnect_timeout=0.5)
    try:
        c.put("k", b"v")
        d.proc.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                c.stats()
            assert 0.8 <= time.monotonic() - t0 < 3.0
            wait_for(lambda: c._down, what="the watchdog taking over")
            times = []
            for _ in range(20):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    c.stats()
                times.append(time.monotonic() - t0)
            assert sum(times) < 1.5 and sorted(times)[-2] < 0.1, times
        finally:
            d.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: c.connected, timeout=20, what="reconnection after SIGCONT")
        assert bytes(c.read("k")) == b"v" and c.stats()["objects"] >= 1
    finally:
        c.close()


def test_release_during_an_outage_is_immediate_and_sticks(make_daemon):
    """Holds are the client's own: releasing a view while the daemon is away neither
    waits reconnect_timeout nor fails (a view's finalizer releases it too), and the
    restarted daemon sees the object unheld (it can be deleted and its space reused)."""
    d = make_daemon()
    c = d.client(reconnect_timeout=5)
    try:
        c.put("k", b"v" * 1000)
        v = c.get("k")
        assert bytes(v[:3]) == b"vvv"
        d.stop(signal.SIGKILL)
        wait_for(lambda: c._down, what="the watchdog noticing the outage")
        t0 = time.monotonic()
        c.release("k")
        assert time.monotonic() - t0 < 0.5
        with pytest.raises(KeyError):            # ObjectNotFound: it was released once
            c.release("k")
        d.start()
        wait_for(lambda: c.connected, timeout=20, what="reconnection")
        assert not c._reader.held
        assert c.delete("k") and c.get("k") is None
        assert c.verify() == []
    finally:
        c.close()
