"""Daemon start-up, refusals, restarts and stops, on real ``python -m kvstore.daemon``
processes with a real segment in /dev/shm (or hugetlbfs) and a real LMDB index.

Every daemon started here is stopped and its store destroyed (``--destroy``) at teardown,
so no test leaks shared memory. Tests that do not look at huge pages pass
``--hugepages off`` so the backing does not depend on the host's huge-page setup.
"""

import os
import signal
import socket
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, DaemonProc, wait_for
from kvstore.client import Client

MiB = 1 << 20
SHM = ("--hugepages", "off")


# ---- helpers ----------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _no_kvstore_env(monkeypatch):
    """The daemon reads KVSTORE_* from its environment: keep the runner's out of it."""
    for k in list(os.environ):
        if k.startswith("KVSTORE_"):
            monkeypatch.delenv(k)


def daemon_cmd(*args):
    return [sys.executable, "-m", "kvstore.daemon", *map(str, args)]


def destroy(data_dir):
    return subprocess.run(daemon_cmd("--data-dir", data_dir, "--destroy"),
                          capture_output=True, text=True, cwd=ROOT, timeout=30)


@pytest.fixture
def run_refused():
    """Run a daemon command that should exit on its own; its data dir is destroyed at teardown
    in case it started (and was killed by the timeout) instead."""
    data_dirs = []

    def run(*args, data_dir, env=None, timeout=20):
        data_dirs.append(str(data_dir))
        try:
            return subprocess.run(daemon_cmd(*args, "--data-dir", data_dir), capture_output=True,
                                  text=True, cwd=ROOT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon {args} did not exit within {timeout} s (it should have refused)")
    yield run
    for d in data_dirs:
        destroy(d)


def assert_one_line_refusal(r, code, *words):
    assert r.returncode == code, f"exit {r.returncode}, stderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


def stats(d):
    with Client(d.socket) as c:
        return c.stats()


def restart(d):
    """Start a stopped DaemonProc again and wait for its next 'ready' line (the log is appended
    to, so DaemonProc.start(wait=True) would see the first run's line)."""
    n = d.read_log().count("ready: serving")
    d.start(wait=False)
    wait_for(lambda: d.read_log().count("ready: serving") > n or d.proc.poll() is not None,
             timeout=30, what="daemon restart")
    assert d.proc.poll() is None, f"daemon exited {d.proc.returncode}:\n{d.read_log()}"
    return d


class RawDaemon(DaemonProc):
    """A DaemonProc whose command line is given whole (for --config tests)."""

    def __init__(self, tmp_path, argv, name, data_dir, socket_path):
        super().__init__(tmp_path, name=name)
        self.argv, self.data_dir, self.socket = list(argv), str(data_dir), str(socket_path)

    def args(self):
        return daemon_cmd(*self.argv)


@pytest.fixture
def raw_daemon(tmp_path):
    made = []

    def make(argv, name, data_dir, socket_path):
        d = RawDaemon(tmp_path, argv, name, data_dir, socket_path)
        made.append(d)
        return d.start()
    yield make
    for d in made:
        d.destroy()


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def is_mounted(path):
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == real for line in f)


# ---- a normal start ---------------------------------------------------------------------

def test_starts_ready_socket_0600_and_logs_backing_with_reason(make_daemon, tmp_path):
    plain = tmp_path / "not-hugetlbfs"
    plain.mkdir()
    d = make_daemon(extra=["--hugepages", "auto", "--hugetlbfs-dir", str(plain)])
    log = d.read_log()
    assert "ready: serving on " + d.socket in log
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    s = stats(d)
    assert s["backing"] == "shm" and s["size"] == 64 * MiB
    assert "shm segment of 67108864 bytes" in log
    # which backing, and why not the other one
    assert "POSIX shared memory in " + s["segment_path"] in log
    assert "no huge pages because " + str(plain) + " is not a hugetlbfs mount" in log


def test_hugepages_off_logs_the_reason(make_daemon):
    d = make_daemon(extra=SHM)
    assert stats(d)["backing"] == "shm"
    assert "no huge pages because hugepages = off" in d.read_log()


def test_socket_mode_flag(make_daemon):
    d = make_daemon(extra=[*SHM, "--socket-mode", "0660"])
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660


def test_segment_is_prefaulted_before_any_put(make_daemon):
    d = make_daemon(extra=SHM)
    s = stats(d)
    assert s["backing"] == "shm" and s["used"] == 0 and s["objects"] == 0
    path = s["segment_path"]
    assert path.startswith("/dev/shm/")
    st = os.stat(path)
    assert st.st_size == 64 * MiB
    assert st.st_blocks * 512 >= 64 * MiB, f"only {st.st_blocks * 512} of {64 * MiB} bytes allocated"
    assert stat.S_IMODE(st.st_mode) == 0o600


# ---- refusals: exit 1, one line ---------------------------------------------------------

def test_refuses_socket_of_a_live_daemon(make_daemon, run_refused, tmp_path):
    d = make_daemon(extra=SHM)
    r = run_refused("--socket", d.socket, "--size", "64MiB", *SHM, data_dir=tmp_path / "other-data")
    assert_one_line_refusal(r, 1, d.socket, "live daemon")
    # the live daemon is untouched and still serves
    assert d.proc.poll() is None
    assert os.path.exists(d.socket)
    assert stats(d)["size"] == 64 * MiB


def test_refuses_data_dir_in_use(make_daemon, run_refused, tmp_path):
    d = make_daemon(extra=SHM)
    r = run_refused("--socket", tmp_path / "other.sock", "--size", "64MiB", *SHM, data_dir=d.data_dir)
    line = assert_one_line_refusal(r, 1, d.data_dir, "in use by another daemon")
    assert f"pid {d.proc.pid}" in line
    assert not os.path.exists(tmp_path / "other.sock")
    assert d.proc.poll() is None and stats(d)["objects"] == 0


def test_refuses_size_beyond_available_memory(run_refused, tmp_path):
    # --index-map-size keeps the index small: the default (size / 8 = 512 GiB) would be
    # fallocated on disk before the memory check (see test_huge_size_refused_for_memory...).
    r = run_refused("--socket", tmp_path / "s.sock", "--size", "4TiB", "--index-map-size", "64MiB",
                    *SHM, data_dir=tmp_path / "data")
    assert_one_line_refusal(r, 1, "exceeds available memory")
    assert not os.path.exists(tmp_path / "s.sock")


def test_huge_size_refused_for_memory_not_disk(run_refused, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs so the index cannot fill a real disk")
    small = tmp_path / "small"
    small.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "none", str(small)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the data dir: {m.stderr.strip()}")
    try:
        r = run_refused("--socket", tmp_path / "s.sock", "--size", "4TiB", *SHM, data_dir=small / "data")
        assert_one_line_refusal(r, 1, "memory")
    finally:
        destroy(small / "data")
        subprocess.run(["umount", str(small)], capture_output=True)


def test_refuses_unwritable_data_dir(run_refused, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    data_dir = afile / "data"
    r = run_refused("--socket", tmp_path / "s.sock", "--size", "64MiB", *SHM, data_dir=data_dir)
    assert_one_line_refusal(r, 1, str(data_dir), "not writable")
    assert not os.path.exists(tmp_path / "s.sock")


def test_refuses_missing_socket_directory(run_refused, tmp_path):
    r = run_refused("--socket", tmp_path / "no-such-dir" / "s.sock", "--size", "64MiB", *SHM,
                    data_dir=tmp_path / "data")
    assert_one_line_refusal(r, 1, str(tmp_path / "no-such-dir"), "does not exist")


def test_refuses_socket_path_that_is_not_a_socket(run_refused, tmp_path):
    f = tmp_path / "regular"
    f.write_text("keep me")
    r = run_refused("--socket", f, "--size", "64MiB", *SHM, data_dir=tmp_path / "data")
    assert_one_line_refusal(r, 1, str(f), "not a socket")
    assert f.read_text() == "keep me"


# ---- stale sockets ----------------------------------------------------------------------

def test_stale_socket_of_a_killed_daemon_is_replaced(make_daemon):
    d = make_daemon(extra=SHM)
    with Client(d.socket) as c:
        assert c.put("survivor", b"sealed before the crash")
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode), "SIGKILL should leave the socket file"
    restart(d)
    log = d.read_log()
    assert "removed stale socket " + d.socket in log
    with Client(d.socket) as c:
        assert bytes(c.get("survivor")) == b"sealed before the crash"
        c.release("survivor")
    assert "recovered 1 objects" in log


def test_stale_socket_bound_and_closed_is_removed(make_daemon):
    d = make_daemon(extra=SHM, start=False)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(d.socket)
    s.close()
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
    d.start()
    assert "stale" in d.read_log()
    assert stats(d)["size"] == 64 * MiB


# ---- bad configuration: exit 2, one line naming the field --------------------------------

def test_bad_size_flag(run_refused, tmp_path):
    r = run_refused("--socket", tmp_path / "s.sock", "--size", "2XB", data_dir=tmp_path / "data")
    line = assert_one_line_refusal(r, 2, "bad configuration", "size:", "2XB")
    assert line.startswith("kvstore-daemon: ")
    assert not os.path.exists(tmp_path / "data"), "nothing may be created from a bad config"


def test_unknown_field_in_config_file(run_refused, tmp_path):
    cfg = tmp_path / "kv.toml"
    cfg.write_text('[kvstore]\nsize = "64MiB"\nsegment_size = "1GiB"\n')
    r = run_refused("--config", cfg, "--socket", tmp_path / "s.sock", data_dir=tmp_path / "data")
    assert_one_line_refusal(r, 2, "segment_size", "unknown field")
    assert not os.path.exists(tmp_path / "data")


def test_bad_hugepages_from_environment(run_refused, tmp_path):
    env = dict(os.environ, KVSTORE_HUGEPAGES="sometimes")
    r = run_refused("--socket", tmp_path / "s.sock", "--size", "64MiB", data_dir=tmp_path / "data",
                    env=env)
    assert_one_line_refusal(r, 2, "hugepages:", "sometimes")
    assert not os.path.exists(tmp_path / "data")


def test_missing_config_file(run_refused, tmp_path):
    r = run_refused("--config", tmp_path / "nope.toml", "--socket", tmp_path / "s.sock",
                    data_dir=tmp_path / "data")
    assert_one_line_refusal(r, 2, "config:", "nope.toml")


def test_config_path_that_is_a_directory(run_refused, tmp_path):
    r = run_refused("--config", tmp_path, "--socket", tmp_path / "s.sock", data_dir=tmp_path / "data")
    assert_one_line_refusal(r, 2, "config:", str(tmp_path))


# ---- --config -----------------------------------------------------------------------------

def test_config_file_is_honoured_and_flags_win(raw_daemon, tmp_path):
    sock, data = tmp_path / "f.sock", tmp_path / "fdata"
    cfg = tmp_path / "kv.toml"
    cfg.write_text(f'[kvstore]\nsocket = "{sock}"\ndata_dir = "{data}"\nsize = "24MiB"\n'
                   f'hugepages = "off"\nsocket_mode = "0640"\n')
    d = raw_daemon(["--config", cfg], "from-file", data, sock)
    assert stats(d)["size"] == 24 * MiB
    assert f"shm segment of {24 * MiB} bytes, data dir {data}" in d.read_log()
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o640
    assert d.stop() == 0

    sock2 = tmp_path / "flag.sock"
    d2 = raw_daemon(["--config", cfg, "--size", "40MiB", "--socket", sock2, "--socket-mode", "0600"],
                    "flags-win", data, sock2)
    s = stats(d2)
    assert s["size"] == 40 * MiB and s["backing"] == "shm"
    assert stat.S_IMODE(os.stat(sock2).st_mode) == 0o600
    assert not os.path.exists(sock)
    assert "size changed from %d to %d bytes" % (24 * MiB, 40 * MiB) in d2.read_log()


# ---- stopping -----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_removes_socket(make_daemon, sig):
    d = make_daemon(extra=SHM)
    stats(d)   # a round trip: the serve loop (and its signal handlers) is running
    pid = d.proc.pid
    assert d.stop(sig) == 0
    assert not os.path.exists(d.socket)
    log = d.read_log()
    assert f"received {signal.Signals(sig).name}; stopping" in log
    assert "Traceback" not in log
    assert f"pid {pid}" in log


def test_clean_stop_keeps_data_for_a_restart(make_daemon):
    d = make_daemon(extra=SHM)
    values = {"a": b"alpha", b"\x00bin": bytes(range(256)) * 3, "big": os.urandom(3 * MiB + 17)}
    with Client(d.socket) as c:
        for k, v in values.items():
            assert c.put(k, v) is True
        seg = c.stats()["segment_path"]
    assert d.stop() == 0
    assert os.path.exists(seg), "a clean stop without discard_on_exit keeps the segment"
    assert os.path.isdir(os.path.join(d.data_dir, "index"))
    restart(d)
    assert "recovered 3 objects" in d.read_log()
    with Client(d.socket) as c:
        s = c.stats()
        assert s["objects"] == 3 and s["segment_path"] == seg
        for k, v in values.items():
            got = c.get(k)
            assert got is not None and bytes(got) == v
            del got
            c.release(k)


def test_discard_on_exit_removes_segment(make_daemon):
    d = make_daemon(extra=[*SHM, "--discard-on-exit"])
    with Client(d.socket) as c:
        assert c.put("k", b"v" * 1000)
        seg = c.stats()["segment_path"]
    assert os.path.exists(seg)
    assert d.stop() == 0
    assert not os.path.exists(seg)
    assert not os.path.exists(os.path.join(d.data_dir, "index"))
    assert "discarded" in d.read_log()


# ---- --destroy ----------------------------------------------------------------------------

def test_destroy_refused_while_running_then_removes_stopped_store(make_daemon):
    d = make_daemon(extra=SHM)
    with Client(d.socket) as c:
        assert c.put("k", b"value")
        seg = c.stats()["segment_path"]
    index_dir = os.path.join(d.data_dir, "index")

    r = destroy(d.data_dir)
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr and "running" in r.stderr
    assert os.path.exists(seg) and os.path.isdir(index_dir)
    with Client(d.socket) as c:            # the running daemon is unharmed
        assert bytes(c.get("k")) == b"value"
        c.release("k")

    assert d.stop() == 0
    assert os.path.exists(seg)
    r = destroy(d.data_dir)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(seg)
    assert not os.path.exists(index_dir)


# ---- huge pages ---------------------------------------------------------------------------

def _undo_huge_pages(d, mnt, nr_before):
    """What a huge-page test leaves behind, removed even when it fails: the daemon's store,
    the hugetlbfs mount, and vm.nr_hugepages as it was."""
    d.destroy()
    if is_mounted(mnt):
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    with open("/proc/sys/vm/nr_hugepages") as f:
        changed = int(f.read()) != nr_before
    if changed:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(nr_before))


def test_hugepages_require_with_reserve(make_daemon, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages and mounting hugetlbfs needs root")
    with open("/proc/filesystems") as f:
        if "hugetlbfs" not in f.read():
            pytest.skip("the kernel has no hugetlbfs")
    info = meminfo()
    if info.get("Hugepagesize") != 2048:
        pytest.skip(f"default huge page size is {info.get('Hugepagesize')} kB, not 2 MiB")
    with open("/proc/sys/vm/nr_hugepages") as f:
        nr_before = int(f.read())
    used_before = info["HugePages_Total"] - info["HugePages_Free"]
    mnt = tmp_path / "hugetlbfs"
    d = make_daemon(extra=["--hugepages", "require", "--reserve-hugepages", "--hugetlbfs-dir", str(mnt)],
                    start=False)
    try:
        try:
            d.start()
        except RuntimeError:
            log = d.read_log()
            refusals = ("cannot raise vm.nr_hugepages", "only", "cannot mount hugetlbfs",
                        "cannot allocate")
            line = next((l for l in log.splitlines() if "huge pages are required" in l), "")
            if any(r in line for r in refusals):
                pytest.skip(f"the kernel refused huge pages: {line}")
            raise
        s = stats(d)
        assert s["backing"] == "hugetlbfs"
        assert s["segment_path"].startswith(str(mnt) + "/")
        assert s["size"] == 64 * MiB
        assert is_mounted(mnt)
        after = meminfo()
        pages = 64 * MiB // (2 * MiB)
        used_after = after["HugePages_Total"] - after["HugePages_Free"]
        assert used_after - used_before == pages, (used_before, used_after, after)
        log = d.read_log()
        assert "mounted hugetlbfs on " + str(mnt) in log
        assert "huge pages in " + s["segment_path"] + " (pre-faulted)" in log
        assert "hugetlbfs segment of 67108864 bytes" in log
    finally:
        _undo_huge_pages(d, mnt, nr_before)
    assert not os.path.exists(s["segment_path"])


def test_hugepages_require_without_huge_pages_refuses(run_refused, tmp_path):
    plain = tmp_path / "plain-dir"
    plain.mkdir()
    r = run_refused("--socket", tmp_path / "s.sock", "--size", "64MiB", "--hugepages", "require",
                    "--hugetlbfs-dir", plain, data_dir=tmp_path / "data")
    assert_one_line_refusal(r, 1, "huge pages", str(plain))
    assert not os.path.exists(tmp_path / "s.sock")
    assert os.listdir(plain) == []


def test_huge_pages_reserved_by_the_daemon_are_given_back_on_discard(make_daemon, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages and mounting hugetlbfs needs root")
    with open("/proc/sys/vm/nr_hugepages") as f:
        nr_before = int(f.read())
    free_before = meminfo()["HugePages_Free"]
    mnt = tmp_path / "hugetlbfs"
    d = make_daemon(extra=["--hugepages", "require", "--reserve-hugepages", "--hugetlbfs-dir", str(mnt),
                           "--discard-on-exit"], start=False)
    try:
        try:
            d.start()
        except RuntimeError:
            pytest.skip(f"the kernel refused huge pages: {d.read_log()[-300:]}")
        if free_before < 32:      # the daemon had to reserve them itself
            assert "reserved huge pages" in d.read_log()
            with open("/proc/sys/vm/nr_hugepages") as f:
                assert int(f.read()) > nr_before
        assert stats(d)["backing"] == "hugetlbfs"
        assert d.stop() == 0
        with open("/proc/sys/vm/nr_hugepages") as f:
            assert int(f.read()) == nr_before
        assert "gave back" in d.read_log()
    finally:
        _undo_huge_pages(d, mnt, nr_before)


def test_busy_live_daemon_socket_is_not_taken_for_stale(make_daemon, tmp_path):
    """A live daemon whose accept backlog is full answers EAGAIN, not ECONNREFUSED: a
    second daemon must refuse, not unlink the socket."""
    import signal as _signal
    import socket as _socket
    d = make_daemon()
    d.proc.send_signal(_signal.SIGSTOP)
    conns = []
    try:
        while True:
            s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(d.socket)
            except BlockingIOError:
                s.close()
                break
            conns.append(s)
            if len(conns) > 5000:
                pytest.skip("could not fill the accept backlog")
        r = subprocess.run([sys.executable, "-m", "kvstore.daemon", "--socket", d.socket,
                            "--data-dir", str(tmp_path / "other"), "--size", "16MiB"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert os.path.exists(d.socket)
    finally:
        d.proc.send_signal(_signal.SIGCONT)
        for s in conns:
            s.close()
    assert stats(d)["size"] == 64 * MiB


def test_garbage_index_is_a_one_line_refusal_and_destroy_clears_it(make_daemon, tmp_path):
    d = make_daemon(start=False)
    os.makedirs(os.path.join(d.data_dir, "index"))
    with open(os.path.join(d.data_dir, "index", "data.mdb"), "wb") as f:
        f.write(os.urandom(64 << 10))
    r = subprocess.run(d.args(), capture_output=True, text=True, timeout=30)
    assert_one_line_refusal(r, 1, "cannot open the index", "--destroy")
    r = subprocess.run([sys.executable, "-m", "kvstore.daemon", "--data-dir", d.data_dir, "--destroy"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    d.start()
    assert stats(d)["objects"] == 0


def test_destroy_finds_the_segment_on_the_configured_hugetlbfs_mount_with_a_garbage_index(make_daemon, tmp_path):
    """--destroy of a store whose index is unreadable looks for the segment at its default
    names on /dev/shm and on the CONFIGURED hugetlbfs mount (it looked only in
    /dev/hugepages), so the huge pages come back."""
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages and mounting hugetlbfs needs root")
    with open("/proc/sys/vm/nr_hugepages") as f:
        nr_before = int(f.read())
    mnt = tmp_path / "hugetlbfs"
    d = make_daemon(extra=["--hugepages", "require", "--reserve-hugepages", "--hugetlbfs-dir", str(mnt)],
                    start=False)
    try:
        try:
            d.start()
        except RuntimeError:
            pytest.skip(f"the kernel refused huge pages: {d.read_log()[-300:]}")
        seg = stats(d)["segment_path"]
        assert seg.startswith(str(mnt)) and os.path.exists(seg)
        d.stop(signal.SIGKILL)
        with open(os.path.join(d.data_dir, "index", "data.mdb"), "r+b") as f:
            f.write(os.urandom(64 << 10))               # the index is garbage now
        r = subprocess.run([sys.executable, "-m", "kvstore.daemon", "--data-dir", d.data_dir,
                            "--hugetlbfs-dir", str(mnt), "--destroy"],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(seg), "the segment on the configured mount was left behind"
        assert os.listdir(mnt) == []
    finally:
        _undo_huge_pages(d, mnt, nr_before)
