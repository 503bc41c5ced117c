"""Test hosts on one machine: network namespaces joined by a bridge, and a real etcd.

A cluster run ``<id>`` (``<pid>`` of its creator, ``<pid>.<n>`` for later ones) is:

  namespace kvs-<id>-a, -b, -c ...   the hosts: eth0 = 10.250.X.1, .2, .3 ... /24, lo up
  namespace kvs-<id>-hub             the switch: bridge br0 = 10.250.X.254 (etcd listens
                                     there, port 2379), one veth port per host
  root namespace                     kvs<X> = 10.250.X.253, a port on the same bridge, so
                                     the test process itself reaches every host and etcd

X (1-254) is chosen under a lock so two runs never share a subnet; every link has MTU
65535. etcd (Debian's etcd-server) runs in the hub namespace with its data dir in the
run's temp dir; ``stop_etcd``/``start_etcd`` keep that dir and port.

Owns: creating and destroying runs; recording each run's state in
/run/kvs-cluster/<id>/state.json before anything is created, so a run whose creator was
killed is removed by ``scripts/cluster.sh down --stale`` (or by the next fixture start,
once it is a minute old); the pytest fixtures ``cluster`` (3 hosts) and ``make_cluster(n)``;
the command line behind ``scripts/cluster.sh up|down|status``.
Must never: touch a namespace, link or process that is not its run's (teardown kills
only processes inside the run's own namespaces and its recorded etcd pid); send traffic
anywhere but loopback and the run's own subnet; leave a namespace, link, process or
temp dir behind after ``down``. Standard library only (cluster.sh runs it with the
system python3).
"""

import fcntl
import json
import os
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import urllib.request

STATE_ROOT = "/run/kvs-cluster"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETCD_PORT = 2379
INSTALL_HINT = "apt-get install -y etcd-server etcd-client"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_seq = 0


class ClusterSetupError(RuntimeError):
    """The hosts or etcd could not be set up; the message says what failed."""


def _ip(*args, check=True):
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise ClusterSetupError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _start_time(pid):
    """The kernel's start time of pid (field 22 of /proc/pid/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid, start):
    return pid is not None and start is not None and _start_time(pid) == start


def _wait_gone(pids, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if os.path.exists(f"/proc/{p}") and not _zombie(p)]
        if not left:
            return True
        time.sleep(0.02)
    return False


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def find_etcd():
    """Path of the etcd binary, installing Debian's etcd-server once if it is missing
    and we are root; None when it cannot be had."""
    path = shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "install", "-y", "etcd-server", "etcd-client"],
                           capture_output=True, timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd") or None


def unavailable_reason():
    """Why clusters cannot be made here (a sentence), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the cluster tests as root)"
    if not shutil.which("ip"):
        return "the ip command is missing: apt-get install -y iproute2"
    probe = f"kvs-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create network namespaces here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if not find_etcd():
        return f"etcd is not installed and could not be installed: {INSTALL_HINT}"
    return None


# ---- state files ------------------------------------------------------------------------
class _Lock:
    def __enter__(self):
        os.makedirs(STATE_ROOT, exist_ok=True)
        self.fd = os.open(os.path.join(STATE_ROOT, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def list_states():
    out = []
    if not os.path.isdir(STATE_ROOT):
        return out
    for name in sorted(os.listdir(STATE_ROOT)):
        p = os.path.join(STATE_ROOT, name, "state.json")
        try:
            with open(p) as f:
                out.append(json.load(f))
        except (OSError, ValueError):
            if not name.startswith(".") and os.path.isdir(os.path.join(STATE_ROOT, name)):
                out.append({"id": name, "broken": True})
    return out


def _write_state(st):
    d = os.path.join(STATE_ROOT, st["id"])
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(st, f, indent=1)
    os.replace(tmp, os.path.join(d, "state.json"))


def _owner_alive(st):
    return _alive(st.get("owner_pid"), st.get("owner_start"))


def teardown_state(st):
    """Remove everything a run recorded, whatever state it was left in. Idempotent."""
    nss = list(st.get("hosts", [])) + ([st["hub"]] if st.get("hub") else [])
    existing = set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
                   .stdout.split())
    pids = []
    for ns in nss:
        if ns not in existing:
            continue
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids += [int(p) for p in r.stdout.split() if p.isdigit()]
    ep = st.get("etcd_pid")
    if ep and _alive(ep, st.get("etcd_start")):
        pids.append(ep)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_gone(pids)
    for ns in nss:
        if ns in existing:
            _ip("netns", "del", ns, check=False)
    if st.get("root_link"):
        if _ip("link", "show", st["root_link"], check=False).returncode == 0:
            _ip("link", "del", st["root_link"], check=False)
    if st.get("tmpdir", "").startswith(tempfile.gettempdir()):
        shutil.rmtree(st["tmpdir"], ignore_errors=True)
    shutil.rmtree(os.path.join(STATE_ROOT, st["id"]), ignore_errors=True)


def reap_stale(min_age=0.0):
    """Tear down runs whose creating process is dead (a killed pytest) and that are at
    least min_age seconds old; runs made by ``cluster.sh up`` (no owner) are left alone.
    Returns the ids removed."""
    gone = []
    with _Lock():
        for st in list_states():
            if time.time() - st.get("created", 0) < min_age:
                continue
            if st.get("broken") or (st.get("owner_pid") and not _owner_alive(st)):
                teardown_state(st)
                gone.append(st["id"])
    return gone


# ---- a run ------------------------------------------------------------------------------
class Cluster:
    """N hosts in network namespaces plus etcd. ``up()`` builds, ``down()`` removes;
    hosts are named "a", "b", ... (an int index works too)."""

    def __init__(self, n=3, owned=True):
        global _seq
        if not 1 <= n <= 26:
            raise ValueError("a cluster has 1 to 26 hosts")
        self.n = n
        self.owned = owned
        base = str(os.getpid()) if _seq == 0 else f"{os.getpid()}.{_seq}"
        _seq += 1
        self.id = base
        self.names = list(string.ascii_lowercase[:n])
        self.etcd_proc = None
        self._procs = []
        self.state = None

    # -- naming ---------------------------------------------------------------------------
    def _name(self, host):
        if isinstance(host, int):
            return self.names[host]
        if host not in self.names:
            raise KeyError(f"no host {host!r} (hosts: {', '.join(self.names)})")
        return host

    def ns(self, host):
        """The network namespace of host."""
        return f"kvs-{self.id}-{self._name(host)}"

    def addr(self, host):
        """The host's address (10.250.X.i)."""
        return f"10.250.{self.subnet}.{self.names.index(self._name(host)) + 1}"

    @property
    def hub(self):
        return f"kvs-{self.id}-hub"

    @property
    def etcd_addr(self):
        return f"10.250.{self.subnet}.254"

    @property
    def etcd_endpoint(self):
        """host:port of etcd, reachable from every host and from the root namespace."""
        return f"{self.etcd_addr}:{ETCD_PORT}"

    @property
    def etcd_url(self):
        return f"http://{self.etcd_endpoint}"

    @property
    def root_addr(self):
        return f"10.250.{self.subnet}.253"

    # -- build ------------------------------------------------------------------------------
    def _pick_subnet(self):
        used = {s.get("subnet") for s in list_states()}
        addrs = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show").stdout
        start = os.getpid() % 254
        for i in range(254):
            x = (start + i) % 254 + 1
            if x not in used and f"10.250.{x}." not in addrs:
                return x
        raise ClusterSetupError("no free 10.250.X.0/24 subnet (run scripts/cluster.sh down)")

    def up(self):
        reap_stale(min_age=60)      # a grace period: `cluster.sh down --stale` has none
        with _Lock():
            while os.path.exists(os.path.join(STATE_ROOT, self.id)):
                self.id = f"{self.id.split('.')[0]}.{int(time.monotonic_ns() % 100000)}"
            self.subnet = self._pick_subnet()
            self.tmpdir = tempfile.mkdtemp(prefix=f"kvs-cluster-{self.id}-")
            self.state = {
                "id": self.id, "subnet": self.subnet, "hosts": [self.ns(h) for h in self.names],
                "hub": self.hub, "root_link": f"kvs{self.subnet}", "tmpdir": self.tmpdir,
                "owner_pid": os.getpid() if self.owned else None,
                "owner_start": _start_time(os.getpid()) if self.owned else None,
                "etcd_pid": None, "etcd_start": None, "created": time.time(),
                "etcd_endpoint": self.etcd_endpoint,
                "addrs": {h: self.addr(h) for h in self.names},
            }
            _write_state(self.state)
        try:
            t0 = time.monotonic()
            self._build_net()
            self.start_etcd()
            self.up_s = time.monotonic() - t0
        except BaseException:
            self.down()
            raise
        return self

    def _build_net(self):
        x, hub = self.subnet, self.hub
        _ip("netns", "add", hub)
        _ip("-n", hub, "link", "set", "lo", "up")
        _ip("-n", hub, "link", "add", "br0", "mtu", "65535", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.etcd_addr}/24", "dev", "br0")
        for h in self.names:
            ns = self.ns(h)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", hub, "link", "add", f"p{h}", "mtu", "65535", "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            _ip("-n", hub, "link", "set", f"p{h}", "master", "br0", "up")
            _ip("-n", ns, "link", "set", "eth0", "mtu", "65535")
            _ip("-n", ns, "addr", "add", f"{self.addr(h)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        root = self.state["root_link"]
        _ip("link", "add", root, "mtu", "65535", "type", "veth", "peer", "name", "proot",
            "netns", hub)
        _ip("-n", hub, "link", "set", "proot", "master", "br0", "up")
        _ip("addr", "add", f"{self.root_addr}/24", "dev", root)
        _ip("link", "set", root, "up")
        _ip("-n", hub, "link", "set", "br0", "up")

    # -- etcd -------------------------------------------------------------------------------
    def start_etcd(self, wait=True):
        """Start etcd (again) in the hub namespace, same data dir and port."""
        if self.etcd_proc is not None and self.etcd_proc.poll() is None:
            raise ClusterSetupError("etcd is already running")
        etcd = find_etcd()
        if not etcd:
            raise ClusterSetupError(f"etcd is not installed: {INSTALL_HINT}")
        data = os.path.join(self.tmpdir, "etcd")
        peer = "http://127.0.0.1:2380"
        cmd = ["ip", "netns", "exec", self.hub, etcd, "--name", "n1", "--data-dir", data,
               "--listen-client-urls", f"http://{self.etcd_endpoint},http://127.0.0.1:{ETCD_PORT}",
               "--advertise-client-urls", self.etcd_url, "--listen-peer-urls", peer,
               "--initial-advertise-peer-urls", peer, "--initial-cluster", f"n1={peer}",
               "--initial-cluster-token", f"kvs-{self.id}"]
        log = open(os.path.join(self.tmpdir, "etcd.log"), "ab")
        self.etcd_proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        with _Lock():
            self.state.update(etcd_pid=self.etcd_proc.pid, etcd_start=_start_time(self.etcd_proc.pid))
            _write_state(self.state)
        if wait:
            self.wait_etcd()

    def etcd_healthy(self, timeout=0.5):
        try:
            with _NO_PROXY.open(f"{self.etcd_url}/health", timeout=timeout) as r:
                return json.loads(r.read()).get("health") in ("true", True)
        except (OSError, ValueError):
            return False

    def wait_etcd(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.etcd_healthy():
                return
            if self.etcd_proc is not None and self.etcd_proc.poll() is not None:
                raise ClusterSetupError(f"etcd exited {self.etcd_proc.returncode}:\n{self.etcd_log()[-3000:]}")
            time.sleep(0.05)
        raise ClusterSetupError(f"etcd not healthy after {timeout:.0f} s:\n{self.etcd_log()[-3000:]}")

    def etcd_log(self):
        try:
            with open(os.path.join(self.tmpdir, "etcd.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop_etcd(self, sig=signal.SIGTERM):
        """Stop etcd (SIGTERM: a clean stop; its data dir stays)."""
        p = self.etcd_proc
        if p is not None and p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.etcd_proc = None

    def kill_etcd(self):
        """SIGKILL etcd (a crash; its data dir stays)."""
        self.stop_etcd(signal.SIGKILL)

    # -- hosts ------------------------------------------------------------------------------
    def _cmd(self, host, cmd):
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        return ["ip", "netns", "exec", self.ns(host), *map(str, cmd)]

    def run(self, host, cmd, timeout=60, check=False, **kw):
        """Run cmd (a list, or a string for sh -c) on host; CompletedProcess with text."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", ROOT)
        r = subprocess.run(self._cmd(host, cmd), timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"on {host}: {cmd} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def popen(self, host, cmd, **kw):
        """Start cmd on host in the background; the Popen is killed at teardown."""
        kw.setdefault("cwd", ROOT)
        p = subprocess.Popen(self._cmd(host, cmd), **kw)
        self._procs.append(p)
        return p

    def py(self, host, code, *args, **kw):
        """Start ``python -c code args`` (this interpreter) on host, stdout/stderr piped
        as text; the Popen is killed at teardown."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        return self.popen(host, [sys.executable, "-c", code, *args], **kw)

    def cut(self, host):
        """Cut host off the network (its link goes down)."""
        _ip("-n", self.ns(host), "link", "set", "eth0", "down")

    def heal(self, host):
        _ip("-n", self.ns(host), "link", "set", "eth0", "up")

    # -- teardown ---------------------------------------------------------------------------
    def down(self):
        t0 = time.monotonic()
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr, p.stdin):
                if f:
                    f.close()
        self._procs = []
        if self.etcd_proc is not None and self.etcd_proc.poll() is None:
            self.etcd_proc.kill()
        if self.etcd_proc is not None:
            self.etcd_proc.wait()
        self.etcd_proc = None
        if self.state is not None:
            with _Lock():
                teardown_state(self.state)
        self.down_s = time.monotonic() - t0

    def __enter__(self):
        return self.up()

    def __exit__(self, *exc):
        self.down()


def leftovers(run_id):
    """What of run_id still exists: namespaces, root links, processes, state dir."""
    prefix = f"kvs-{run_id}-"
    nss = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
           .stdout.split() if n.startswith(prefix)]
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cl = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"kvs-cluster-{run_id}-" in cl or prefix in cl:
            procs.append(int(pid))
    left = {"namespaces": nss, "processes": procs,
            "state": os.path.exists(os.path.join(STATE_ROOT, run_id)),
            "tmpdirs": [d for d in os.listdir(tempfile.gettempdir())
                        if d.startswith(f"kvs-cluster-{run_id}-")]}
    return left


# ---- pytest fixtures -------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the command line (system python3) needs no pytest
    pytest = None

if pytest is not None:
    def _made():
        """Yield a maker of clusters; every cluster made is torn down afterwards."""
        reason = unavailable_reason()
        if reason:
            pytest.skip(reason)
        made = []

        def make(n=3):
            c = Cluster(n)
            made.append(c)
            return c.up()
        try:
            yield make
        finally:
            for c in made:
                c.down()

    @pytest.fixture
    def make_cluster():
        """make_cluster(n=3) -> a Cluster that is up; all are torn down after the test,
        passed or failed."""
        yield from _made()

    @pytest.fixture
    def cluster():
        """Three hosts (a, b, c) and etcd, torn down after the test, passed or failed.
        Needs only ``from clusterlib import cluster``."""
        for make in _made():
            yield make(3)


# ---- command line (scripts/cluster.sh) ----------------------------------------------------
def _describe(st):
    owner = st.get("owner_pid")
    who = "made by cluster.sh up" if not owner else (
        f"owner pid {owner} {'alive' if _owner_alive(st) else 'DEAD (stale)'}")
    etcd = "running" if _alive(st.get("etcd_pid"), st.get("etcd_start")) else "not running"
    lines = [f"{st['id']}: subnet 10.250.{st.get('subnet')}.0/24, {who}, etcd {etcd} at "
             f"{st.get('etcd_endpoint')}"]
    for h, a in (st.get("addrs") or {}).items():
        lines.append(f"  host {h}: ip netns exec kvs-{st['id']}-{h} ...   address {a}")
    return "\n".join(lines)


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="scripts/cluster.sh",
                                 description="test hosts (network namespaces) and etcd")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create a cluster and leave it running")
    u.add_argument("-n", "--hosts", type=int, default=3)
    d = sub.add_parser("down", help="remove a cluster (default: every one made by up, and "
                                    "every one whose creator died)")
    d.add_argument("id", nargs="?")
    d.add_argument("--all", action="store_true", help="also runs of live test processes")
    d.add_argument("--stale", action="store_true", help="only runs whose creator died")
    sub.add_parser("status", help="list clusters")
    a = ap.parse_args(argv)
    if a.cmd == "up":
        reason = unavailable_reason()
        if reason:
            print(f"cluster.sh: {reason}", file=sys.stderr)
            return 2
        c = Cluster(a.hosts, owned=False).up()
        c.etcd_proc = None      # keep it running after we exit
        print(_describe(c.state))
        print(f"  etcd: {c.etcd_url} (up in {c.up_s:.2f} s)   remove with: scripts/cluster.sh down {c.id}")
        return 0
    if a.cmd == "status":
        sts = list_states()
        print("\n".join(_describe(s) for s in sts if not s.get("broken")) or "no clusters")
        return 0
    removed = []
    for st in list_states():
        if a.id and st["id"] != a.id:
            continue
        live_owner = st.get("owner_pid") and _owner_alive(st)
        if live_owner and not (a.all or a.id):
            continue
        if a.stale and not a.id and not (st.get("owner_pid") and not live_owner):
            continue
        with _Lock():
            teardown_state(st)
        removed.append(st["id"])
    if a.id and not removed:
        print(f"cluster.sh: no cluster {a.id}", file=sys.stderr)
        return 1
    print("removed: " + (", ".join(removed) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
