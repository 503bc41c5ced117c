"""kvstore daemons on the test hosts of tests/clusterlib.py: one real daemon process per
network namespace, joined through the real etcd (or a static peer list), each with its
own unix socket and data dir on the shared file system, so this test process is a
client of every host at once.

Owns: starting, killing, restarting and reading the logs of those daemons, and the
fixture ``kv`` (3 hosts, etcd, a daemon on each, all removed after the test).
Must never: leave a daemon, a socket or a segment behind (teardown destroys each store).
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from clusterlib import make_cluster  # noqa: F401  (pytest fixture, used through ``kv``)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PORT = 7700


class HostDaemon:
    """The kvstore daemon of one test host."""

    def __init__(self, cl, host, tmp, secret, extra=(), etcd=True, peers=None, size="64MiB"):
        self.cl, self.host, self.tmp = cl, host, tmp
        self.dir = os.path.join(tmp, f"host-{host}")
        os.makedirs(self.dir, exist_ok=True)
        self.socket = os.path.join(self.dir, "kv.sock")
        self.data_dir = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.secret, self.extra, self.etcd, self.peers, self.size = secret, list(extra), etcd, peers, size
        self.proc = None
        self.addr = cl.addr(host)
        self.id = f"{self.addr}:{PEER_PORT}"

    def args(self):
        a = [sys.executable, "-m", "kvstore.daemon", "--socket", self.socket, "--data-dir", self.data_dir,
             "--size", self.size, "--hugepages", "off", "--log-level", "DEBUG",
             "--advertise", self.addr, "--peer-port", str(PEER_PORT),
             "--cluster-secret-file", self.secret, "--member-ttl", "2"]
        if self.peers is not None:
            a += ["--peers", ",".join(self.peers)]
        elif self.etcd:
            a += ["--cluster", f"etcd://{self.cl.etcd_endpoint}"]
        return a + self.extra

    def start(self, wait=True, expect_fail=False):
        readies = self.read_log().count("ready: serving")
        log = open(self.log_path, "ab")
        self.proc = self.cl.popen(self.host, self.args(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if expect_fail:
            self.proc.wait(30)
            return self.proc.returncode
        deadline = time.monotonic() + 30
        while wait and self.read_log().count("ready: serving") <= readies:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon on {self.host} exited {self.proc.returncode}:\n{self.read_log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon on {self.host} not ready:\n{self.read_log()[-3000:]}")
            time.sleep(0.02)
        return self

    def read_log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()

    def client(self, **kw):
        from kvstore.client import Client
        kw.setdefault("timeout", 10.0)
        return Client(self.socket, **kw)

    def tcp_port(self):
        """The port of this daemon's peer transport server, as its last start logged it."""
        m = re.findall(r"tcp transport port (\d+)", self.read_log())
        assert m, f"the daemon on {self.host} did not log its transport port"
        return int(m[-1])

    def cluster_stats(self):
        with self.client() as c:
            return c.stats().get("cluster", {})

    def destroy(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.kill(signal.SIGTERM)
        subprocess.run([sys.executable, "-m", "kvstore.daemon", "--data-dir", self.data_dir, "--destroy"],
                       capture_output=True, cwd=ROOT, timeout=60)


def write_secret(path, secret=b"test-cluster-secret-0123456789abcdef"):
    with open(path, "wb") as f:
        f.write(secret + b"\n")
    os.chmod(path, 0o600)
    return str(path)


class KV:
    """A cluster of test hosts with a kvstore daemon on each (``d["a"]`` ...)."""

    def __init__(self, cl, tmp, n, **kw):
        self.cl, self.tmp = cl, tmp
        self.secret = write_secret(os.path.join(tmp, "secret"))
        self.d = {h: HostDaemon(cl, h, tmp, self.secret, **kw) for h in cl.names[:n]}

    def __getitem__(self, host):
        return self.d[host]

    def start(self):
        for d in self.d.values():
            d.start(wait=False)
        deadline = time.monotonic() + 30
        for d in self.d.values():
            while d.read_log().count("ready: serving") < 1:
                if d.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon on {d.host} did not start:\n{d.read_log()[-3000:]}")
                time.sleep(0.02)
        self.wait_members(len(self.d))
        return self

    def wait_members(self, n, timeout=15):
        """Until every running daemon sees n - 1 others."""
        deadline = time.monotonic() + timeout
        while True:
            ok = True
            for d in self.d.values():
                if d.proc is None or d.proc.poll() is not None:
                    continue
                if len(d.cluster_stats().get("members", [])) != n - 1:
                    ok = False
            if ok:
                return
            if time.monotonic() > deadline:
                raise AssertionError("membership did not settle: " +
                                     "; ".join(f"{h}: {d.cluster_stats().get('members')}"
                                               for h, d in self.d.items() if d.proc and d.proc.poll() is None))
            time.sleep(0.1)

    def destroy(self):
        for d in self.d.values():
            try:
                d.destroy()
            except Exception:                          # noqa: BLE001 (teardown goes on)
                pass


@pytest.fixture
def make_kv(make_cluster, tmp_path):
    made = []

    def make(n=3, hosts=None, start=True, **kw):
        cl = make_cluster(hosts or n)
        kv = KV(cl, str(tmp_path), n, **kw)
        made.append(kv)
        return kv.start() if start else kv
    try:
        yield make
    finally:
        for kv in made:
            kv.destroy()


@pytest.fixture
def kv(make_kv):
    return make_kv(3)
