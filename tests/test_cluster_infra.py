"""The test hosts themselves (tests/clusterlib.py, scripts/cluster.sh): namespaces reach
each other over real TCP, a cut host is unreachable until healed, etcd answers from every
host, and nothing is left after teardown, also after a test that raised or a run that was
killed."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from clusterlib import ROOT, Cluster, _zombie, cluster, leftovers, make_cluster  # noqa: F401

ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 7000)); s.listen(4)
    print("listening", flush=True)
    while True:
        c, peer = s.accept()
        data = b""
        while not data.endswith(b"\\n"):
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        c.sendall(b"echo from " + sys.argv[1].encode() + b": " + data)
        c.close()
""")

ECHO_CLIENT = textwrap.dedent("""
    import socket, sys
    try:
        c = socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2]))
        payload = sys.stdin.read() if sys.argv[3] == "-" else sys.argv[3]
        c.sendall(payload.encode() + b"\\n")
        out = b""
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            out += chunk
        print(out.decode().strip())
    except OSError as e:
        print("ERROR", type(e).__name__, e)
        sys.exit(3)
""")


HTTP = textwrap.dedent("""
    import sys, urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = sys.argv[2].encode() if len(sys.argv) > 2 else None
    try:
        print(opener.open(urllib.request.Request(sys.argv[1], data=data), timeout=2).read().decode())
    except OSError as e:
        print("ERROR", e)
        sys.exit(3)
""")


def _http(url, body=None):
    """argv for an HTTP request from inside a namespace (python, no curl needed)."""
    return [sys.executable, "-c", HTTP, url] + ([body] if body is not None else [])


def _echo(cluster, src, dst, payload="hello", timeout=3.0):
    return cluster.run(src, [sys.executable, "-c", ECHO_CLIENT, cluster.addr(dst), timeout, "-"],
                       input=payload, timeout=30)


def _start_echo(cluster, host):
    p = cluster.py(host, ECHO_SERVER, cluster.addr(host))
    assert p.stdout.readline().strip() == "listening"
    return p


def _gone(run_id):
    left = leftovers(run_id)
    left["processes"] = [p for p in left["processes"] if not _zombie(p)]
    return left


def _assert_nothing_left(run_id, root_link=None):
    left = _gone(run_id)
    assert left == {"namespaces": [], "processes": [], "state": False, "tmpdirs": []}, left
    if root_link:
        r = subprocess.run(["ip", "link", "show", root_link], capture_output=True)
        assert r.returncode != 0, f"root link {root_link} still exists"


def test_tcp_echo_between_namespaces(cluster):
    _start_echo(cluster, "b")
    r = _echo(cluster, "a", "b", "ping-a")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f"echo from {cluster.addr('b')}: ping-a"
    # a large payload crosses the 65535-MTU links intact
    big = "x" * 300_000
    r = _echo(cluster, "c", "b", big)
    assert r.stdout.strip() == f"echo from {cluster.addr('b')}: {big}"
    mtu = cluster.run("a", "cat /sys/class/net/eth0/mtu").stdout.strip()
    assert mtu == "65535"
    # the hosts are separate network stacks: b's server is not on a's loopback
    r = cluster.run("a", [sys.executable, "-c", ECHO_CLIENT, "127.0.0.1", 1, "x"])
    assert r.returncode == 3 and "ConnectionRefused" in r.stdout


def test_cut_host_is_unreachable_and_heals(cluster):
    _start_echo(cluster, "b")
    assert _echo(cluster, "a", "b").returncode == 0
    cluster.cut("b")
    t0 = time.monotonic()
    r = _echo(cluster, "a", "b", timeout=1.0)
    assert r.returncode == 3, r.stdout
    assert time.monotonic() - t0 < 10
    r = _echo(cluster, "c", "b", timeout=1.0)
    assert r.returncode == 3, r.stdout
    # from the cut host, nothing is reachable either (etcd included)
    r = cluster.run("b", _http(f"{cluster.etcd_url}/health"))
    assert r.returncode != 0
    cluster.heal("b")
    deadline = time.monotonic() + 10
    while True:
        r = _echo(cluster, "a", "b", "back")
        if r.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.stdout.strip() == f"echo from {cluster.addr('b')}: back"


def test_etcd_answers_from_every_host_and_restarts(cluster):
    key = "a2V5"   # base64("key")
    for h in ("a", "b", "c"):
        r = cluster.run(h, _http(f"{cluster.etcd_url}/health"))
        assert json.loads(r.stdout)["health"] == "true", (h, r.stdout, r.stderr)
        r = cluster.run(h, _http(f"{cluster.etcd_url}/v3/kv/put",
                                 json.dumps({"key": key, "value": "dmFsdWU=" if h == "a" else "eA=="})))
        assert r.returncode == 0, r.stderr
    assert cluster.etcd_healthy()          # and from the root namespace (the test process)
    cluster.stop_etcd()
    assert not cluster.etcd_healthy()
    t0 = time.monotonic()
    cluster.start_etcd()                   # same data dir: the key survived
    assert time.monotonic() - t0 < 10
    r = cluster.run("b", _http(f"{cluster.etcd_url}/v3/kv/range", json.dumps({"key": key})))
    assert json.loads(r.stdout)["kvs"][0]["value"] == "eA=="
    cluster.kill_etcd()
    assert not cluster.etcd_healthy()
    cluster.start_etcd()
    assert cluster.etcd_healthy()


def test_nothing_left_after_teardown():
    c = Cluster(3)
    c.up()
    run_id, link = c.id, c.state["root_link"]
    _start_echo(c, "a")
    c.popen("c", ["sleep", "300"])
    assert _gone(run_id)["namespaces"]
    c.down()
    _assert_nothing_left(run_id, link)


def test_nothing_left_after_a_test_raises(tmp_path):
    """A real pytest run whose test fails inside the fixture: its finalizer tears all down."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent("""
        import os, sys
        from clusterlib import cluster
        def test_boom(cluster):
            with open(os.environ["RUN_ID_FILE"], "w") as f:
                f.write(cluster.id + " " + cluster.state["root_link"])
            cluster.py("b", "import time; time.sleep(300)")
            raise RuntimeError("boom")
    """))
    out = tmp_path / "id"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"), RUN_ID_FILE=str(out))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        str(tmp_path / "test_inner.py")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "RuntimeError: boom" in r.stdout, r.stdout + r.stderr
    run_id, link = out.read_text().split()
    _assert_nothing_left(run_id, link)


def test_killed_run_is_removed_by_cluster_sh_down(tmp_path):
    """A process holding a cluster is SIGKILLed: nothing of it goes away by itself, and
    `scripts/cluster.sh down --stale` removes it all."""
    code = textwrap.dedent("""
        import sys, time
        sys.path.insert(0, "tests")
        from clusterlib import Cluster
        c = Cluster(2).up()
        c.py("a", "import time; time.sleep(300)")
        print(c.id, c.state["root_link"], flush=True)
        time.sleep(300)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        run_id, link = p.stdout.readline().split()
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
    assert _gone(run_id)["namespaces"] and _gone(run_id)["state"]   # left behind
    st = subprocess.run([os.path.join(ROOT, "scripts/cluster.sh"), "status"],
                        capture_output=True, text=True)
    assert f"{run_id}:" in st.stdout and "DEAD (stale)" in st.stdout, st.stdout
    r = subprocess.run([os.path.join(ROOT, "scripts/cluster.sh"), "down", "--stale"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and run_id in r.stdout, r.stdout + r.stderr
    _assert_nothing_left(run_id, link)


def test_cluster_sh_up_status_down():
    r = subprocess.run([os.path.join(ROOT, "scripts/cluster.sh"), "up", "-n", "2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.split(":", 1)[0]
    try:
        assert "host b:" in r.stdout and "host c:" not in r.stdout
        # etcd keeps running after `up` returned; reachable from host a
        ep = r.stdout.split("etcd running at ")[1].split()[0]
        h = subprocess.run(["ip", "netns", "exec", f"kvs-{run_id}-a", *_http(f"http://{ep}/health")],
                           capture_output=True, text=True)
        assert '"health":"true"' in h.stdout, h
    finally:
        d = subprocess.run([os.path.join(ROOT, "scripts/cluster.sh"), "down", run_id],
                           capture_output=True, text=True, timeout=60)
    assert d.returncode == 0 and run_id in d.stdout
    _assert_nothing_left(run_id)


def test_two_clusters_do_not_overlap(make_cluster):
    c1, c2 = make_cluster(2), make_cluster(2)
    assert c1.id != c2.id and c1.subnet != c2.subnet
    assert not set(map(c1.ns, "ab")) & set(map(c2.ns, "ab"))
    assert c1.etcd_healthy() and c2.etcd_healthy()
