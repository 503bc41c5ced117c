"""Review 3: a live process that opens connections, says HELLO and drops them in a
loop must not write one log line per connection at the default level (nor one that
sends requests and hangs up before the replies: "gone mid-reply", 19,000 INFO lines in
30 s of a frame fuzz, nor one that says BYE each time). Each such
client is kept for its resume grace, and "lost its connection; kept 60 s" was logged
at INFO for every one of them (300 connections: 300 lines in 2 s, and as many "did
not come back" lines a minute later): the flood the rate limiter exists for."""

from conftest import raw_hello
from kvstore import protocol


def _info_daemon(make_daemon):
    d = make_daemon(size="8MiB", start=False)
    d.args = lambda: [a for a in type(d).args(d) if a not in ("--log-level", "DEBUG")] + [
        "--log-level", "INFO"]
    return d.start()


def test_hello_then_drop_flood_is_rate_limited(make_daemon):
    d = _info_daemon(make_daemon)
    before = len(d.read_log().splitlines())
    for _ in range(300):
        s, _ = raw_hello(d.socket)
        s.close()
    with d.client() as c:                          # the daemon still serves
        assert c.put("k", b"v")
    d.stop()                                       # the limiter's summary line, at the latest
    lines = d.read_log().splitlines()[before:]
    kept = [l for l in lines if "lost its connection" in l]
    assert len(kept) <= 10, f"{len(kept)} lines for 300 dropped connections"
    assert any("suppressed" in l and "kept" in l for l in lines), lines[-5:]


def test_requests_then_hang_up_and_bye_floods_are_rate_limited(make_daemon):
    d = _info_daemon(make_daemon)
    before = len(d.read_log().splitlines())
    for i in range(300):
        s, _ = raw_hello(d.socket)
        if i % 2:
            s.sendall(protocol.encode(protocol.STATS, {}) * 50)   # replies it never reads
        else:
            s.sendall(protocol.bye())
        s.close()
    with d.client() as c:
        assert c.put("k", b"v")
    d.stop()
    lines = d.read_log().splitlines()[before:]
    per_conn = [l for l in lines if "reclaimed" in l]
    assert len(per_conn) <= 30, f"{len(per_conn)} lines for 300 connections: {per_conn[-3:]}"
    assert any("suppressed" in l for l in lines), lines[-5:]
