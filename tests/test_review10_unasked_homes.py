"""Review of issue 10: when no home of a key could be asked (every home of the key
refuses or drops the peer port while still a member), contains_anywhere and
delete_everywhere must say so (a TransportError, as their docstrings promise), not
answer False. LOCATE and DELETE_ALL ignored the lookup's errors: the key counted as
"nowhere", and a delete_everywhere reported nothing deleted while the holder kept its
copy (and went on announcing it)."""

import subprocess
import time

import pytest

from clusterlib import make_cluster  # noqa: F401  (fixtures)
from kvcluster import PEER_PORT, make_kv  # noqa: F401
from kvstore.cluster.directory import homes
from kvstore.errors import TransportError


def _drop_peer_port(cl, host):
    """Drop what host's peer (control) port sends: still a member (etcd is on another
    port), but it answers no lookup."""
    ns = cl.ns(host)
    for cmd in (["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"],
                ["tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", "100gbit"],
                ["tc", "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:30", "htb", "rate", "100gbit"],
                ["tc", "qdisc", "add", "dev", "eth0", "parent", "1:30", "handle", "30:", "pfifo", "limit", "0"],
                ["tc", "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "u32",
                 "match", "ip", "sport", str(PEER_PORT), "0xffff", "flowid", "1:30"]):
        r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"tc cannot drop the peer port's packets here ({r.stderr.strip()})")


def test_no_home_answers_is_an_error_not_false(make_kv):
    kv = make_kv(4)
    a, b, c, d = kv["a"], kv["b"], kv["c"], kv["d"]
    ids = [x.id for x in (a, b, c, d)]
    with b.client() as cb:
        key = next(k for k in (f"uh{i}".encode() for i in range(5000))
                   if set(homes(cb._key(k), ids)) == {a.id, c.id})
    with d.client() as cd:
        assert cd.put(key, b"q" * 1000)
    deadline = time.monotonic() + 10
    with b.client() as cb:
        while not cb.contains_anywhere([key])[0]:
            assert time.monotonic() < deadline, "location records did not arrive"
            time.sleep(0.05)
    _drop_peer_port(kv.cl, "a")
    _drop_peer_port(kv.cl, "c")
    with b.client() as cb:
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            print(cb.contains_anywhere([key]))
        with pytest.raises(TransportError):
            print(cb.delete_everywhere([key]))
        assert time.monotonic() - t0 < 12
    with d.client() as cd:
        assert cd.contains(key)                      # it was not deleted: the error said so
