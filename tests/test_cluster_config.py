"""The cluster's settings (issue 10, item 1): parsed from file, environment and flags,
refused with one line naming the field when they disagree, and the host checks that
run at start (a real bind to the advertised address, a real port held by a real
process, named from /proc)."""

import subprocess
import sys

import pytest

from conftest import ROOT
from kvstore import netcheck
from kvstore.cluster.auth import MIN_SECRET, load_secret
from kvstore.config import load_config
from kvstore.errors import ConfigError, DaemonStartError


def cfg(**kw):
    return load_config(env={}, overrides=kw)


def test_single_host_needs_none_of_it():
    c = cfg()
    assert not c.clustered and c.peers == [] and c.replicas == 1 and c.transfer_timeout == 2.0


def test_etcd_and_static_clusters_parse():
    c = cfg(cluster="etcd://127.0.0.1:2379, 10.0.0.9:2379", advertise="10.0.0.1", cluster_secret_file="/s")
    assert c.cluster == "etcd://127.0.0.1:2379,10.0.0.9:2379" and c.clustered and c.peer_port == 0
    c = cfg(peers="10.0.0.2:7700,[fd00::3]:7700", advertise="10.0.0.1", peer_port="7700",
            cluster_secret_file="/s")
    assert c.peers == ["10.0.0.2:7700", "fd00::3:7700"]


@pytest.mark.parametrize("kw, field", [
    (dict(cluster="http://x:1"), "cluster"),
    (dict(cluster="etcd://"), "cluster"),
    (dict(cluster="etcd://host"), "cluster"),
    (dict(cluster="etcd://h:99999"), "cluster"),
    (dict(peers="a:1,a:1", advertise="b", peer_port=1, cluster_secret_file="/s"), "peers"),
    (dict(peers="nohostport", advertise="b", peer_port=1, cluster_secret_file="/s"), "peers"),
    (dict(peers="a:1", cluster="etcd://h:1", advertise="b", cluster_secret_file="/s"), "peers"),
    (dict(peers="a:1", cluster_secret_file="/s", peer_port=1), "advertise"),
    (dict(peers="a:1", advertise="b", peer_port=1), "cluster_secret_file"),
    (dict(peers="a:1", advertise="b", cluster_secret_file="/s"), "peer_port"),
    (dict(peers="b:1", advertise="b", peer_port=1, cluster_secret_file="/s"), "peers"),
    (dict(advertise="10.0.0.1"), "advertise"),
    (dict(peer_port=7), "peer_port"),
    (dict(replicas=2), "replicas"),
    (dict(peer_port=70000), "peer_port"),
    (dict(peer_port="x"), "peer_port"),
    (dict(transfer_timeout=0), "transfer_timeout"),
    (dict(member_ttl="soon"), "member_ttl"),
    (dict(advertise="10.0.0.1:7700", cluster="etcd://h:1", cluster_secret_file="/s"), "advertise"),
])
def test_bad_cluster_settings_name_their_field(kw, field):
    with pytest.raises(ConfigError) as e:
        cfg(**kw)
    assert str(e.value).startswith(field + ":"), str(e.value)


def test_secret_file_checks(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_secret(str(tmp_path / "none"))
    short = tmp_path / "short"
    short.write_bytes(b"x" * (MIN_SECRET - 1) + b"\n")
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret(str(short))
    good = tmp_path / "good"
    good.write_bytes(b"s" * 32 + b"\n")
    assert load_secret(str(good)) == b"s" * 32
    with pytest.raises(ConfigError, match="cannot read"):        # (root reads any file)
        load_secret(str(tmp_path))


def test_advertise_must_be_a_local_address():
    assert netcheck.check_advertise("127.0.0.1") == "127.0.0.1"
    for bad in ("192.0.2.77", "0.0.0.0"):            # TEST-NET-1: on no interface here
        with pytest.raises(DaemonStartError, match="advertise"):
            netcheck.check_advertise(bad)
    with pytest.raises(DaemonStartError, match="does not resolve"):
        netcheck.check_advertise("no-such-host.invalid")


def test_a_taken_peer_port_names_the_process_holding_it(tmp_path):
    script = tmp_path / "port_squatter.py"
    script.write_text("import socket, time\n"
                      "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
                      "print(s.getsockname()[1], flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(holder.stdout.readline())
        with pytest.raises(DaemonStartError) as e:
            netcheck.bind_peer_port("127.0.0.1", port)
        msg = str(e.value)
        assert f"(pid {holder.pid})" in msg and "port_squatter.py" in msg and "--peer-port" in msg, msg
    finally:
        holder.kill()
        holder.wait()
    s = netcheck.bind_peer_port("127.0.0.1", 0)      # 0: a free one
    try:
        assert s.getsockname()[1] > 0
    finally:
        s.close()
