"""Review 3: a client that resumes after the daemon restarted with quotas switched on
must learn it. The WELCOME's ``quotas`` flag was read only when the client first
attached; a resumed client kept the old value and sent put(pin=True) as a pinned seal,
which a daemon with quotas quietly stores unpinned when the pin is over the limit: the
put returned True, no QuotaExceeded, and the object was evictable."""

import signal

import pytest

from conftest import wait_for
from kvstore.errors import QuotaExceeded

MiB = 1 << 20


def test_pin_refused_after_a_restart_that_enabled_quotas(make_daemon):
    d = make_daemon(size="16MiB")
    with d.client(namespace="a", reconnect_timeout=30) as c:
        c.put("warm", b"w")
        d.stop(signal.SIGTERM)
        d.extra += ["--namespace-quotas", "a=1MiB"]
        d.start()
        wait_for(lambda: c.stats() is not None and "namespaces" in c.stats(), what="resume")
        with pytest.raises(QuotaExceeded):
            c.put("big", b"x" * (2 * MiB), pin=True)     # over a's 1 MiB pin bound
        assert c.contains("big")                          # stored, unpinned, as documented
        assert c.stats()["namespaces"]["a"]["pinned"] == 0
