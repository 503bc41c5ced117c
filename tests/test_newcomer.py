"""A newcomer's path (issue 9, item 8): the sample config, the LICENSE, the demo script
(its own paths, its arguments, one clear line when it fails, back to back by two users),
the scripts' virtual environments on a python3 that cannot make one, and the hugetlbfs
mount that --reserve-hugepages makes, taken down again with the segment.

Everything runs for real: scripts/run_demo.sh starts a real daemon (with this test's
python, through KVSTORE_DEMO_PYTHON, so no .venv is built), the second user is a real
account (nobody) through runuser, the mount is a real hugetlbfs mount.
"""

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT
from kvstore.config import FIELDS, Config, load_config

SAMPLE = os.path.join(ROOT, "examples", "kvstore.toml")
DEMO = os.path.join(ROOT, "scripts", "run_demo.sh")


# ---- the sample config and the licence ---------------------------------------------------

def test_sample_config_sets_every_field_to_its_default():
    cfg = load_config(SAMPLE, env={})
    assert cfg == Config()
    with open(SAMPLE) as f:
        lines = [line.split("=")[0].strip() for line in f if "=" in line and not line.lstrip().startswith("#")]
    missing = [k for k in FIELDS if k not in lines]
    assert not missing, f"examples/kvstore.toml lacks {missing}: add each with its default and a comment"


def test_daemon_starts_from_the_sample_config(make_daemon):
    d = make_daemon(extra=["--config", SAMPLE, "--hugepages", "off"])   # flags win over the file
    with d.client() as c:
        assert c.put("from-sample", b"ok") and bytes(c.get("from-sample")) == b"ok"
        c.release("from-sample")


def test_license_is_apache_2():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "kvstore authors" in text.splitlines()[0]
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text          # the full text, not a pointer to it


# ---- scripts/run_demo.sh ------------------------------------------------------------------

def _demo_leftovers():
    return {f for f in os.listdir("/dev/shm") if f.startswith("kvstore-demo.")} | \
           {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("kvstore-demo.")}


def run_demo(*args, user=None, timeout=120):
    """scripts/run_demo.sh with args, as root (user None) or as ``user``, a tuple
    (name, python, pythonpath) from the ``nobody`` fixture."""
    env = dict(os.environ, KVSTORE_DEMO_PYTHON=sys.executable)
    env.pop("KVSTORE_SOCKET", None)
    cmd = [DEMO, *map(str, args)]
    if user:
        name, python, path = user
        cmd = ["runuser", "-u", name, "--", "env", f"KVSTORE_DEMO_PYTHON={python}", f"PYTHONPATH={path}",
               f"PATH={os.environ['PATH']}", "HOME=/", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def test_demo_uses_its_own_paths_and_leaves_nothing(tmp_path):
    before = _demo_leftovers()
    r = run_demo("--size", "64MiB", "--hugepages", "off")
    assert r.returncode == 0, r.stderr
    assert "read-only equal" in r.stdout and "hello from kvstore" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert _demo_leftovers() <= before


def test_demo_socket_and_data_dir_arguments_are_used(tmp_path):
    sock, data = tmp_path / "my.sock", tmp_path / "my-data"
    r = run_demo("--socket", sock, f"--data-dir={data}", "--size", "64MiB", "--hugepages", "off")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"socket {sock}, data dir {data}" in r.stdout
    assert "read-only equal" in r.stdout
    assert not sock.exists(), r.stdout + r.stderr
    assert not data.exists(), r.stdout + r.stderr         # the daemon made data: removed again


def test_demo_keeps_a_data_dir_it_did_not_make(tmp_path):
    data = tmp_path / "mine"
    data.mkdir()
    (data / "note").write_text("mine")
    r = run_demo("--data-dir", data, "--size", "64MiB", "--hugepages", "off")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (data / "note").read_text() == "mine"
    assert not os.path.exists(data / "index")             # discard_on_exit: its store is gone


@pytest.mark.parametrize("args, says", [
    (("--size", "bogus"), "run_demo.sh: the daemon did not start (exit 2): kvstore-daemon: bad configuration: size:"),
    (("--socket",), "run_demo.sh: --socket needs a path"),
    (("--destroy",), "run_demo.sh: --destroy is not for the demo"),
])
def test_demo_failure_is_one_line(args, says):
    before = _demo_leftovers()
    r = run_demo(*args)
    assert r.returncode == 1
    assert r.stderr.strip().startswith(says), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert _demo_leftovers() <= before


def _runs_as(user, *cmd):
    return subprocess.run(["runuser", "-u", user, "--", *cmd], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def nobody():
    """(user, python, pythonpath) for running the demo as the user nobody: a python of
    this version that nobody may run, and a world-readable copy of the packages the
    daemon and the demo import (this test's environment may be private: tox makes .tox/
    0700)."""
    if os.geteuid() != 0:
        pytest.skip("running the demo as a second user needs root (runuser)")
    if not shutil.which("runuser"):
        pytest.skip("runuser (util-linux) is not installed")
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this host")
    if not _runs_as("nobody", "test", "-r", os.path.join(ROOT, "scripts", "demo.py")):
        pytest.skip(f"user nobody cannot read this checkout ({ROOT})")
    version = "%d.%d" % sys.version_info[:2]
    python = next((p for p in (sys._base_executable, f"/usr/bin/python{version}", shutil.which(f"python{version}"))
                   if p and _runs_as("nobody", p, "-c", f"import sys; assert sys.version.startswith('{version}.')")),
                  None)
    if python is None:
        pytest.skip(f"no python{version} that user nobody may run (pyenv's lives in /root)")
    import importlib
    lib = tempfile.mkdtemp(prefix="kvstore-nobody-lib.")
    try:
        for mod in ("numpy", "lmdb", "posix_ipc", "xxhash"):
            f = importlib.import_module(mod).__file__
            site = os.path.dirname(os.path.dirname(f)) if f.endswith("__init__.py") else os.path.dirname(f)
            for entry in os.listdir(site):
                if entry == mod or entry.startswith(mod + ".") and not entry.endswith(".dist-info"):
                    src = os.path.join(site, entry)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(lib, entry))
        subprocess.run(["chmod", "-R", "a+rX", lib], check=True)
        if not _runs_as("nobody", "env", f"PYTHONPATH={lib}", python, "-c", "import numpy, lmdb, posix_ipc, xxhash"):
            pytest.skip(f"{python} cannot import this environment's numpy, lmdb, posix_ipc, xxhash")
        yield "nobody", python, f"{lib}:{ROOT}"     # kvstore itself from this checkout
    finally:
        shutil.rmtree(lib, ignore_errors=True)


@pytest.mark.parametrize("order", ["root-then-nobody", "nobody-then-root"])
def test_demo_back_to_back_by_two_users(order, nobody):
    """The old demo left a root-owned /dev/shm/kvstore-data behind, and the next user's
    demo then failed; each run now has its own paths and removes them."""
    before = _demo_leftovers()
    users = [None, nobody] if order == "root-then-nobody" else [nobody, None]
    for user in users:
        r = run_demo("--size", "64MiB", "--hugepages", "off", user=user)
        assert r.returncode == 0, f"as {user[0] if user else 'root'}: {r.stdout}{r.stderr}"
        assert "read-only equal" in r.stdout
    assert _demo_leftovers() <= before


# ---- the scripts' virtual environments ----------------------------------------------------

def _shimmed_checkout(tmp_path, uid):
    """A copy of the scripts, and a PATH whose python3 lacks ensurepip (Debian without
    python3-venv), whose id says uid, and whose apt-get fails."""
    repo = tmp_path / "repo"
    shutil.copytree(os.path.join(ROOT, "scripts"), repo / "scripts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shims = tmp_path / "shims"
    shims.mkdir()
    real = shutil.which("python3") or sys.executable
    (shims / "python3").write_text(
        "#!/bin/sh\n"
        "case \"$*\" in *ensurepip*) exit 1 ;; esac\n"
        f"exec {real} \"$@\"\n")
    (shims / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (shims / "apt-get").write_text("#!/bin/sh\nexit 100\n")
    for f in shims.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = dict(os.environ, PATH=f"{shims}:{os.environ['PATH']}")
    env.pop("KVSTORE_DEMO_PYTHON", None)
    return repo, env


@pytest.mark.parametrize("script", ["test.sh", "run_demo.sh"])
def test_no_venv_module_as_a_user_is_one_line_with_the_fix(tmp_path, script):
    repo, env = _shimmed_checkout(tmp_path, 1000)
    r = subprocess.run([str(repo / "scripts" / script)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1, r.stderr
    assert line.startswith(f"{script}: python3 cannot create virtual environments; ask root to run: "
                           f"apt-get install python3.") and line.endswith("-venv (then rerun)"), line
    assert not (repo / ".venv").exists() and not (repo / ".venv-tox").exists()


def test_no_venv_module_as_root_tries_apt_get(tmp_path):
    repo, env = _shimmed_checkout(tmp_path, 0)
    r = subprocess.run([str(repo / "scripts" / "test.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("test.sh: installing python3.") and "-venv" in lines[0], r.stderr
    assert lines[-1].startswith("test.sh: cannot install python3.") and \
        lines[-1].endswith("with apt-get; install it by hand and rerun"), r.stderr


# ---- the hugetlbfs mount of --reserve-hugepages -------------------------------------------

def _is_mounted(path):
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def _huge_pages_or_skip():
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages and mounting hugetlbfs needs root")
    with open("/proc/filesystems") as f:
        if "hugetlbfs" not in f.read():
            pytest.skip("the kernel has no hugetlbfs")
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def _undo(d, mnt, nr_before):
    d.destroy()
    if _is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], timeout=30)
    with open("/proc/sys/vm/nr_hugepages") as f:
        changed = int(f.read()) != nr_before
    if changed:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(nr_before))


def _start_or_skip(d):
    try:
        d.start()
    except RuntimeError:
        pytest.skip(f"the kernel refused huge pages: {d.read_log()[-300:]}")


def test_reserve_hugepages_unmounts_its_mount_when_the_segment_is_discarded(make_daemon, tmp_path):
    nr_before = _huge_pages_or_skip()
    mnt = tmp_path / "hugetlbfs"
    d = make_daemon(extra=["--hugepages", "require", "--reserve-hugepages", "--hugetlbfs-dir", str(mnt),
                           "--discard-on-exit"], start=False)
    try:
        _start_or_skip(d)
        assert _is_mounted(mnt)
        with d.client() as c:
            assert c.stats()["backing"] == "hugetlbfs"
        assert d.stop() == 0
        assert not _is_mounted(mnt), d.read_log()[-600:]
        assert "unmounted hugetlbfs from " + str(mnt) in d.read_log()
    finally:
        _undo(d, mnt, nr_before)


def test_reserve_hugepages_mount_stays_with_a_kept_segment_until_destroy(make_daemon, tmp_path):
    """A clean stop keeps the segment (the next start recovers it), so its mount stays:
    unmounting would free every object. A restart reuses it; --destroy takes it down."""
    nr_before = _huge_pages_or_skip()
    mnt = tmp_path / "hugetlbfs"
    d = make_daemon(extra=["--hugepages", "require", "--reserve-hugepages", "--hugetlbfs-dir", str(mnt)],
                    start=False)
    try:
        _start_or_skip(d)
        with d.client() as c:
            assert c.put("kept", b"on huge pages")
        assert d.stop() == 0
        assert _is_mounted(mnt)
        d.start()
        with d.client() as c:
            assert bytes(c.get("kept")) == b"on huge pages"
            c.release("kept")
        assert d.stop() == 0
        r = subprocess.run([sys.executable, "-m", "kvstore.daemon", "--data-dir", d.data_dir,
                            "--hugetlbfs-dir", str(mnt), "--destroy"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not _is_mounted(mnt), r.stderr
    finally:
        _undo(d, mnt, nr_before)


# ---- scripts/test.sh's arguments ------------------------------------------------------------

def test_test_sh_arguments_select_core_tests_only():
    """`./scripts/test.sh -k name` once collected the engine suites in the core environment
    (they cannot import their engines there). The arguments go to the py env's pytest,
    whose command keeps --ignore=tests/engines and names no path of its own, so a test
    file given as an argument runs alone. The pytest command line tox builds is run here
    with --collect-only."""
    import configparser
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(os.path.join(ROOT, "tox.ini"))
    cmd = ini["testenv"]["commands"].split()
    assert cmd[0] == "pytest" and "--ignore=tests/engines" in cmd and cmd[-1] == "{posargs}"
    with open(os.path.join(ROOT, "scripts", "test.sh")) as f:
        assert 'tox -e py -- "$@"' in f.read()
    for posargs, want, unwanted in ((["-k", "test_sizes"], "test_sizes", "tests/engines"),
                                     (["tests/test_newcomer.py"], "test_license_is_apache_2", "tests/test_config.py")):
        argv = [sys.executable, "-m", *cmd[:-1], "--collect-only", *posargs]
        r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert want in r.stdout and unwanted not in r.stdout, r.stdout[-2000:]
