"""Review 3: a live process that opens connections, says HELLO and drops them in a
loop must not write one log line per connection at the default level. Each such
client is kept for its resume grace, and "lost its connection; kept 60 s" was logged
at INFO for every one of them (300 connections: 300 lines in 2 s, and as many "did
not come back" lines a minute later): the flood the rate limiter exists for."""

from conftest import raw_hello


def test_hello_then_drop_flood_is_rate_limited(make_daemon):
    d = make_daemon(size="8MiB", start=False)
    d.args = lambda: [a for a in type(d).args(d) if a not in ("--log-level", "DEBUG")] + [
        "--log-level", "INFO"]
    d.start()
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
