"""Group access end to end: a daemon started with ``--group G`` admits the members of G,
and only them, with real users and a real daemon.

As root, each test creates a group and two users (a member of the group and an outsider)
with groupadd/useradd and removes them at teardown, even when the test fails. Clients
run as those users in child processes: the child imports everything it needs as root
(the interpreter and the test environment live under /root, which other users cannot
read), then drops to the user with setgroups/setgid/setuid, so every check the kernel
makes on the socket and the store's files is the one a real user of that account gets.
Daemons run under a strict umask (077), so modes the daemon sets through the umask would
come out wrong. Without root the tests skip.
"""

import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, DaemonProc, wait_for
from kvstore.config import Config, check_group, load_config
from kvstore.errors import ConfigError

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating users and groups needs root")

#: What every child imports as root before it becomes another user.
PRELUDE = """
import json, os, pwd, sys, traceback
import concurrent.futures, resource
import numpy as np
import kvstore.client, kvstore.errors, kvstore.protocol, kvstore.segment, kvstore.slots, kvstore.table
from kvstore.client import Client
from kvstore.errors import KVStoreError, StoreUnavailable, SegmentGone
try:
    import torch
except ImportError:
    torch = None
import daemon.__main__, daemon.server, daemon.startup
try:
    import lmdb._envid, lmdb.verify   # imported lazily by lmdb; the user cannot read them later
except ImportError:
    pass

def become(name):
    pw = pwd.getpwnam(name)
    os.setgroups(os.getgrouplist(name, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    assert (os.getuid(), os.geteuid()) == (pw.pw_uid, pw.pw_uid)

become(sys.argv[1])
"""


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"


@pytest.fixture(autouse=True)
def _no_kvstore_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("KVSTORE_"):
            monkeypatch.delenv(k)


@pytest.fixture
def accounts():
    """A fresh group with a member, and an outsider; all removed afterwards."""
    for tool in ("groupadd", "useradd", "userdel", "groupdel"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    tag = uuid.uuid4().hex[:8]
    names = {"group": f"kvg{tag}", "member": f"kvm{tag}", "outsider": f"kvo{tag}"}
    made_users, made_group = [], False
    try:
        _run(["groupadd", names["group"]])
        made_group = True
        for who, extra in (("member", ["-G", names["group"]]), ("outsider", [])):
            _run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *extra, names[who]])
            made_users.append(names[who])
        names["gid"] = grp.getgrnam(names["group"]).gr_gid
        yield names
    finally:
        for u in made_users:
            subprocess.run(["userdel", u], capture_output=True, timeout=60)
        if made_group:
            subprocess.run(["groupdel", names["group"]], capture_output=True, timeout=60)


@pytest.fixture
def shared_dir():
    """A directory other users can pass through (tmp_path is 0700): the socket lives here."""
    d = tempfile.mkdtemp(prefix="kvgroup-", dir="/tmp")
    os.chmod(d, 0o711)
    made = []
    yield Path(d), made
    for dp in made:
        dp.destroy()
    shutil.rmtree(d, ignore_errors=True)


def start_daemon(shared, *extra, umask=0o077, size="32MiB", name="d"):
    base, made = shared
    d = DaemonProc(base, size, ["--hugepages", "off", *extra], name)
    made.append(d)
    os.chmod(d.dir, 0o711)
    old = os.umask(umask)
    try:
        d.start()
    finally:
        os.umask(old)
    return d


def run_as(user, code, *args, timeout=120):
    """Run code in a child that becomes ``user``; returns the JSON it printed last."""
    env = dict(os.environ, HOME="/tmp")
    r = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), user, *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert r.returncode == 0, f"child as {user} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def mode_group(path):
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


MEMBER_WORK = """
sock = sys.argv[2]
out = {"uid": os.getuid()}
with Client(sock) as c:
    out["put"] = c.put("member-key", b"m" * 5000)
    out["get"] = bytes(c.get("member-key")) == b"m" * 5000
    c.release("member-key")
    out["read"] = c.read("root-key") == b"r" * 3000
    out["contains"] = c.contains("root-key")
    if torch is not None:
        t = torch.arange(1000, dtype=torch.float32)
        out["put_tensor"] = c.put("member-tensor", t)
        got = c.get_tensor("member-tensor", dtype=torch.float32)
        out["get_tensor"] = bool(torch.equal(got, t))
        del got
        c.release("member-tensor")
    keys = [f"many-{i}" for i in range(3000)]
    out["put_many"] = all(c.put_many(keys, [bytes([i % 251]) * 200 for i in range(3000)]))
    out["get_many"] = all(bytes(v) == bytes([i % 251]) * 200
                          for i, v in enumerate(c.get_many(keys)))
    c.release_many(keys)
    out["table"] = c.stats()["table_buckets"]
    out["delete"] = c.delete("many-0")
print(json.dumps(out))
"""

OUTSIDER_WORK = """
sock = sys.argv[2]
out = {"uid": os.getuid()}
try:
    Client(sock, reconnect_timeout=1)
    out["error"] = None
except KVStoreError as e:
    out["error"], out["message"] = type(e).__name__, str(e)
    out["unavailable"] = isinstance(e, StoreUnavailable)
print(json.dumps(out))
"""


def test_member_uses_the_store_and_outsider_gets_a_typed_refusal(accounts, shared_dir):
    g, gid = accounts["group"], accounts["gid"]
    d = start_daemon(shared_dir, "--group", g)
    # every file a client is handed, and the socket, carry the group and its bits
    from kvstore.client import Client
    with Client(d.socket) as c:
        assert c.put("root-key", b"r" * 3000)
        st = c.stats()
    assert mode_group(d.socket) == (0o660, gid)
    assert mode_group(st["segment_path"]) == (0o660, gid)
    name = os.path.basename(st["segment_path"])
    slots = f"/dev/shm/{name}-slots"
    tables = [f for f in os.listdir("/dev/shm") if f.startswith(name + "-table-")]
    assert mode_group(slots) == (0o660, gid)
    assert len(tables) == 1 and mode_group("/dev/shm/" + tables[0]) == (0o660, gid)
    # what no client needs stays the daemon's alone
    assert mode_group(d.data_dir)[0] == 0o700
    assert mode_group(os.path.join(d.data_dir, "index"))[0] == 0o700
    for f in ("data.mdb", "lock.mdb"):
        assert mode_group(os.path.join(d.data_dir, "index", f))[0] == 0o600

    got = run_as(accounts["member"], MEMBER_WORK, d.socket)
    assert got["uid"] != 0
    expect = {"put", "get", "read", "contains", "put_many", "get_many", "delete"}
    if "put_tensor" in got:
        expect |= {"put_tensor", "get_tensor"}
    assert {k for k in expect if got[k] is True} == expect, got
    # 3000 objects grew the published table: the republished file has the group too
    assert got["table"] > 4096
    tables = [f for f in os.listdir("/dev/shm") if f.startswith(name + "-table-")]
    assert len(tables) == 1 and mode_group("/dev/shm/" + tables[0]) == (0o660, gid), tables
    with Client(d.socket) as c:             # the member's puts are everyone's
        assert c.read("member-key") == b"m" * 5000 and not c.contains("many-0")

    out = run_as(accounts["outsider"], OUTSIDER_WORK, d.socket)
    assert out["uid"] != 0 and out["error"] == "StoreUnavailable" and out["unavailable"], out
    assert "ermission denied" in out["message"], out
    assert d.proc.poll() is None            # nobody's refusal hurt the daemon


def test_without_group_access_everything_is_the_owners_only(shared_dir):
    # umask 0 would leave whatever mode a file was created with: 0600/0700 must be explicit
    d = start_daemon(shared_dir, umask=0)
    from kvstore.client import Client
    with Client(d.socket) as c:
        st = c.stats()
    assert mode_group(d.socket)[0] == 0o600
    assert mode_group(st["segment_path"])[0] == 0o600
    name = os.path.basename(st["segment_path"])
    assert mode_group(f"/dev/shm/{name}-slots")[0] == 0o600
    assert mode_group(d.data_dir)[0] == 0o700
    assert mode_group(os.path.join(d.data_dir, "index"))[0] == 0o700
    for f in ("data.mdb", "lock.mdb"):
        assert mode_group(os.path.join(d.data_dir, "index", f))[0] == 0o600


def test_an_existing_data_dir_keeps_its_mode_and_missing_parents_are_0700(shared_dir):
    base, _ = shared_dir
    mine = base / "operators-dir"
    mine.mkdir()
    os.chmod(mine, 0o755)
    d = start_daemon(shared_dir, "--data-dir", str(mine / "a" / "b"), umask=0)
    d.data_dir = str(mine / "a" / "b")                  # so destroy() removes this store
    assert mode_group(mine)[0] == 0o755                 # not ours: left alone
    for p in (mine / "a", mine / "a" / "b", mine / "a" / "b" / "index"):
        assert mode_group(p)[0] == 0o700, p
    d.destroy()


def test_a_group_member_reconnects_after_a_restart_with_a_new_group_mode(accounts, shared_dir):
    """An adopted segment (restart) gets this run's group and mode, not the last run's."""
    g, gid = accounts["group"], accounts["gid"]
    d = start_daemon(shared_dir)                        # no group: 0600
    from kvstore.client import Client
    with Client(d.socket) as c:
        c.put("root-key", b"r" * 3000)
        seg = c.stats()["segment_path"]
    assert mode_group(seg)[0] == 0o600
    d.stop()
    d.extra += ["--group", g]
    old = os.umask(0o077)
    try:
        n = d.read_log().count("ready: serving")
        d.start(wait=False)
        wait_for(lambda: d.read_log().count("ready: serving") > n or d.proc.poll() is not None,
                 timeout=30, what="restart")
    finally:
        os.umask(old)
    assert d.proc.poll() is None, d.read_log()
    assert "recovered 1 objects" in d.read_log()
    assert mode_group(seg) == (0o660, gid)
    got = run_as(accounts["member"], """
        with Client(sys.argv[2]) as c:
            print(json.dumps({"read": c.read("root-key") == b"r" * 3000}))
        """, d.socket)
    assert got == {"read": True}


def test_hugetlbfs_segment_gets_the_group(accounts, shared_dir, tmp_path):
    with open("/proc/filesystems") as f:
        if "hugetlbfs" not in f.read():
            pytest.skip("the kernel has no hugetlbfs")
    with open("/proc/sys/vm/nr_hugepages") as f:
        nr_before = int(f.read())
    mnt = tmp_path / "hugetlbfs"
    g, gid = accounts["group"], accounts["gid"]
    base, made = shared_dir
    d = DaemonProc(base, "32MiB", ["--hugepages", "require", "--reserve-hugepages",
                                   "--hugetlbfs-dir", str(mnt), "--group", g], "huge")
    made.append(d)
    os.chmod(d.dir, 0o711)
    try:
        try:
            d.start()
        except RuntimeError:
            pytest.skip(f"the kernel refused huge pages: {d.read_log()[-300:]}")
        from kvstore.client import Client
        with Client(d.socket) as c:
            c.put("root-key", b"r" * 3000)
            st = c.stats()
        assert st["backing"] == "hugetlbfs"
        assert mode_group(st["segment_path"]) == (0o660, gid)
        got = run_as(accounts["member"], """
            with Client(sys.argv[2]) as c:
                ok = c.put("m", b"m" * 4096) and bytes(c.get("m")) == b"m" * 4096
                c.release("m")
                print(json.dumps({"ok": ok, "read": c.read("root-key") == b"r" * 3000}))
            """, d.socket)
        assert got == {"ok": True, "read": True}
    finally:
        d.destroy()
        if os.path.ismount(mnt):
            subprocess.run(["umount", str(mnt)], timeout=30)
        with open("/proc/sys/vm/nr_hugepages") as f:
            changed = int(f.read()) != nr_before
        if changed:
            with open("/proc/sys/vm/nr_hugepages", "w") as f:
                f.write(str(nr_before))


# ---- configuration ----------------------------------------------------------------------

def test_unknown_group_is_a_config_error_naming_the_field(tmp_path):
    for how in ({"overrides": {"group": "no-such-group-kv9"}},
                {"env": {"KVSTORE_GROUP": "no-such-group-kv9"}}):
        with pytest.raises(ConfigError) as e:
            load_config(**how)
        assert str(e.value).startswith("group: ") and "no-such-group-kv9" in str(e.value)
        assert "groupadd" in str(e.value)
    f = tmp_path / "kv.toml"
    f.write_text('group = "no-such-group-kv9"\n')
    r = subprocess.run([sys.executable, "-m", "kvstore.daemon", "--config", str(f),
                        "--data-dir", str(tmp_path / "data")],
                       capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "group: " in r.stderr
    assert not (tmp_path / "data").exists()


def test_group_sets_the_default_mode_and_refuses_a_mode_without_group_bits():
    root = grp.getgrgid(0).gr_name
    assert load_config(env={}, overrides={"group": root}).socket_mode == "0660"
    assert load_config(env={}, overrides={"group": "0", "socket_mode": "0666"}).socket_mode == "0666"
    assert load_config(env={}).socket_mode == "0600"
    with pytest.raises(ConfigError) as e:
        load_config(env={}, overrides={"group": root, "socket_mode": "0600"})
    assert str(e.value).startswith("socket_mode: ") and "0660" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(env={}, overrides={"group": "a b"})
    assert str(e.value).startswith("group: ")


def test_a_daemon_that_is_not_a_member_refuses_in_one_line(accounts, shared_dir):
    """Run the daemon's own main() as the outsider with the member's group: one line, exit
    1, nothing created."""
    base, _ = shared_dir
    data = base / "outsiders-data"
    got = run_as(accounts["outsider"], """
        import io, contextlib
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = daemon.__main__.main(["--socket", sys.argv[2] + "/s.sock", "--data-dir", sys.argv[2]
                                       + "/outsiders-data", "--group", sys.argv[3],
                                       "--hugepages", "off", "--size", "8MiB"])
        print(json.dumps({"rc": rc, "err": err.getvalue()}))
        """, base, accounts["group"])
    assert got["rc"] == 1, got
    lines = got["err"].strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in got["err"], got
    assert "group: " in lines[0] and "neither root nor a member" in lines[0], lines[0]
    assert "usermod -aG " + accounts["group"] in lines[0]
    assert not data.exists()


def test_a_member_that_is_not_root_runs_the_daemon_for_the_group(accounts, shared_dir):
    """The daemon needs no root for group access: a member of the group may give the
    store's files to it (chown to one's own group)."""
    import pwd
    import signal
    base, _ = shared_dir
    pw = pwd.getpwnam(accounts["member"])
    home = base / "member-home"
    home.mkdir()
    os.chown(home, pw.pw_uid, -1)
    os.chmod(home, 0o711)
    sock, data, log_path = home / "kv.sock", home / "data", base / "member-daemon.log"
    code = """
        import logging
        sys.exit(daemon.__main__.main(["--socket", sys.argv[2], "--data-dir", sys.argv[3],
                                       "--group", sys.argv[4], "--hugepages", "off", "--size",
                                       "16MiB", "--discard-on-exit"]))
        """
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), pw.pw_name,
                                 str(sock), str(data), accounts["group"]],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(os.environ, HOME="/tmp"))
    try:
        wait_for(lambda: "ready: serving" in log_path.read_text() or proc.poll() is not None,
                 timeout=30, what="the member's daemon")
        assert proc.poll() is None, log_path.read_text()
        from kvstore.client import Client
        with Client(str(sock)) as c:
            assert c.put("k", b"v" * 100) and c.read("k") == b"v" * 100
            seg = c.stats()["segment_path"]
        gid = accounts["gid"]
        for p in (sock, seg, f"/dev/shm/{os.path.basename(seg)}-slots"):
            st = os.stat(p)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (pw.pw_uid, gid, 0o660), p
        st = os.stat(data)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pw.pw_uid, 0o700)
        out = run_as(accounts["outsider"], OUTSIDER_WORK, sock)
        assert out["error"] == "StoreUnavailable" and "ermission denied" in out["message"], out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        subprocess.run([sys.executable, "-m", "kvstore.daemon", "--data-dir", str(data), "--destroy"],
                       capture_output=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, log_path.read_text()


def test_check_group_accepts_root_and_members():
    check_group(Config())                               # no group: nothing to check
    check_group(Config(group=str(os.getegid())))        # our own group


def test_a_socket_the_group_cannot_reach_is_warned_about(accounts, make_daemon, tmp_path):
    from kvstore.access import searchable_by
    blocked = searchable_by(str(tmp_path / "d0" / "kv.sock"), accounts["gid"])
    assert blocked is not None                          # pytest's tmp dirs are 0700
    d = make_daemon(extra=["--hugepages", "off", "--group", accounts["group"]])
    line = next(l for l in d.read_log().splitlines() if "cannot reach the socket" in l)
    assert f"members of group {accounts['group']}" in line and "WARNING" in line
    top = tempfile.mkdtemp(prefix="kvreach-", dir="/tmp")    # /tmp itself: 1777
    try:
        sock = os.path.join(top, "kv.sock")
        os.chmod(top, 0o711)
        assert searchable_by(sock, accounts["gid"]) is None
        os.chmod(top, 0o700)
        assert searchable_by(sock, accounts["gid"]) == top
        os.chown(top, -1, accounts["gid"])
        os.chmod(top, 0o750)                            # the group may pass, others not
        assert searchable_by(sock, accounts["gid"]) is None
    finally:
        os.rmdir(top)
