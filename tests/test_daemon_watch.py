"""What the daemon notices while it runs: its segment file cut or removed behind its back,
and a flood of bad connections (rate-limited log lines with a count of what was left out).

Real daemons on real shared memory. Anything that maps the segment runs in a child
process: a client touching a truncated segment gets SIGBUS, and that must not be the
test runner. The daemon itself never touches the segment's memory, so it must survive
every case here and stop with exit status 0.
"""

import logging
import os
import re
import socket

import pytest

from conftest import raw_hello, run_py, wait_for
from kvstore.daemon.ratelimit import LogLimiter
from kvstore import protocol
from kvstore.errors import SegmentGone

SHM = ["--hugepages", "off"]

PUT_SOME = """
import sys
from kvstore.client import Client
with Client(sys.argv[1]) as c:
    for i in range(50):
        assert c.put(f"k{i}", bytes([i]) * 4096)
    print(c.stats()["segment_path"])
"""

NEW_CLIENT = """
import json, sys
from kvstore.client import Client
from kvstore.errors import KVStoreError
try:
    with Client(sys.argv[1], reconnect_timeout=1) as c:
        ok = c.put("after", b"a" * 100) and c.read("after") == b"a" * 100
        print(json.dumps({"error": None, "ok": ok, "k1": c.read("k1") == bytes([1]) * 4096,
                          "problem": c.stats()["segment_problem"]}))
except KVStoreError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def new_client(d):
    import json
    r = run_py(NEW_CLIENT, d.socket)
    return json.loads(r.stdout.strip().splitlines()[-1])


def error_lines(d):
    return [line for line in d.read_log().splitlines() if " ERROR " in line]


def test_truncated_segment_is_detected_refused_and_reported_at_restart(make_daemon):
    d = make_daemon(extra=SHM)
    seg = run_py(PUT_SOME, d.socket).stdout.strip()
    size = os.stat(seg).st_size
    s, _ = raw_hello(d.socket)                 # a client connected before the cut (no mapping)
    try:
        os.truncate(seg, size // 2)
        # noticed by the periodic check alone (nobody connects meanwhile): within a few seconds
        line = wait_for(lambda: [l for l in error_lines(d) if "was truncated to" in l], timeout=8,
                        what="the ERROR line about the truncated segment")[0]
        assert f"{size // 2} of its {size} bytes" in line and "50 objects" in line
        assert "Restart the daemon" in line
        # a new client gets the typed error, not a raw ValueError from mmap
        got = new_client(d)
        assert got["error"] == "SegmentGone" and "Restart the daemon" in got["message"], got
        # the connected client may no longer take space in the cut segment
        s.sendall(protocol.grant(1 << 20, 4096))
        with pytest.raises(SegmentGone):
            protocol.recv_message(s)
        s.sendall(protocol.encode(protocol.STATS, {}))     # the index still answers
        mtype, body, _ = protocol.recv_message(s)
        assert mtype == protocol.STATS_REPLY and "truncated" in body["segment_problem"]
        assert d.proc.poll() is None
        assert len([l for l in error_lines(d) if "was truncated to" in l]) == 1   # logged once
    finally:
        s.close()
    assert d.stop() == 0
    assert "so the next start begins empty" in d.read_log()
    d.start()
    restart = [l for l in error_lines(d) if "by another process; starting empty" in l]
    assert restart and f"truncated to {size // 2} of its {size} bytes" in restart[-1], d.read_log()
    assert "50 objects recorded in the index are lost" in restart[-1]
    got = new_client(d)
    assert got["error"] is None and got["ok"] and not got["k1"] and got["problem"] is None, got


def test_a_new_client_right_after_the_cut_is_refused_before_the_periodic_check(make_daemon):
    d = make_daemon(extra=SHM)
    seg = run_py(PUT_SOME, d.socket).stdout.strip()
    os.truncate(seg, 0)
    got = new_client(d)                        # the HELLO itself looks at the file
    assert got["error"] == "SegmentGone", got
    assert d.proc.poll() is None


def test_unlinked_segment_is_detected_and_the_store_keeps_serving(make_daemon):
    d = make_daemon(extra=SHM)
    seg = run_py(PUT_SOME, d.socket).stdout.strip()
    os.unlink(seg)
    line = wait_for(lambda: [l for l in error_lines(d) if "was removed (unlinked)" in l], timeout=8,
                    what="the ERROR line about the removed segment")[0]
    assert "nothing is lost yet" in line and "50 objects are lost then" in line
    got = new_client(d)                        # the open file still works for everyone
    assert got["error"] is None and got["ok"] and got["k1"], got
    assert "was removed" in got["problem"]
    assert d.stop() == 0
    assert "so the next start begins empty" in d.read_log()


def test_replaced_segment_is_detected(make_daemon):
    d = make_daemon(extra=SHM)
    seg = run_py(PUT_SOME, d.socket).stdout.strip()
    size = os.stat(seg).st_size
    os.rename(seg, seg + ".moved")
    try:
        with open(seg, "wb") as f:             # another file of the same size at its path
            f.truncate(size)
        wait_for(lambda: [l for l in error_lines(d) if "was replaced" in l], timeout=8,
                 what="the ERROR line about the replaced segment")
        got = new_client(d)
        assert got["error"] is None and got["k1"], got
    finally:
        os.unlink(seg + ".moved")


# ---- rate-limited warnings ----------------------------------------------------------------

def test_a_thousand_garbage_connections_log_a_bounded_number_of_lines(make_daemon):
    d = make_daemon(extra=SHM)
    before = d.read_log().count("WARNING dropping connection")
    for _ in range(1000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.socket)
        s.sendall(b"\xff" * 16)                # a frame length no kvstore client sends
        s.close()
    # the window's end brings the count, without a stop
    line = wait_for(lambda: re.search(r"suppressed (\d+) more 'protocol' messages.*", d.read_log()),
                    timeout=25, what="the line counting the suppressed warnings")
    assert "frame length" in line.group(0)     # its example names what was wrong
    assert d.stop() == 0                       # a stop flushes a window still open
    log = d.read_log()
    logged = log.count("WARNING dropping connection") - before
    assert logged <= 15, logged                # a few per 10 s window, not one per connection
    counted = sum(int(n) for n in re.findall(r"suppressed (\d+) more 'protocol' messages", log))
    assert logged + counted == 1000, (logged, counted)   # each bad connection logged or counted


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_limiter_counts_what_it_suppresses_per_kind(caplog):
    clock = _Clock()
    log = logging.getLogger("test.limiter")
    lim = LogLimiter(log, window=10.0, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.limiter"):
        for i in range(10):
            lim("a", logging.WARNING, "bad %d", i)
        lim("b", logging.INFO, "other")
        clock.t += 5
        lim.flush()                            # the window is not over: nothing yet
        assert [r.getMessage() for r in caplog.records] == ["bad 0", "bad 1", "bad 2", "other"]
        clock.t += 5
        lim.flush()
        msgs = [r.getMessage() for r in caplog.records]
        assert msgs[4].startswith("suppressed 7 more 'a' messages in the last 10 s")
        assert msgs[4].endswith("the last: bad 9") and caplog.records[4].levelno == logging.WARNING
        assert len(msgs) == 5                  # 'b' suppressed nothing: no line for it
        lim("a", logging.WARNING, "again")     # a new window logs at once
        assert caplog.records[-1].getMessage() == "again"
        for _ in range(4):
            lim("a", logging.WARNING, "more")
        lim.flush(force=True)                  # at stop: every count comes out
        assert caplog.records[-1].getMessage().startswith("suppressed 2 more 'a' messages")
