"""Start-up under trouble (issue 9, items 6 and 8): a full file system under the data
dir, ``--destroy`` after refused starts and of directories that do not exist, and an
index map that is too small. Real daemon processes, a real tmpfs mount where one is
needed (as root), a real LMDB index.
"""

import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, DaemonProc, run_py
from kvstore import segment
from kvstore.errors import IndexFull

SHM = ("--hugepages", "off")


def daemon_cmd(*args):
    return [sys.executable, "-m", "kvstore.daemon", *map(str, args)]


def run(*args, timeout=60):
    return subprocess.run(daemon_cmd(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def one_line(r, code, *words):
    assert r.returncode == code, f"exit {r.returncode}:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def shm_files(data_dir):
    name = segment.segment_name(data_dir)
    return [f for f in os.listdir("/dev/shm") if f.startswith(name)]


# ---- a full file system -------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MiB tmpfs mounted in the test's temp dir (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path):
    """Write a filler file until the file system is full (no byte left)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (64 << 10, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    st = os.statvfs(path)
    assert st.f_bavail == 0, st


def test_restart_after_sigkill_on_a_full_file_system(small_tmpfs, tmp_path):
    d = DaemonProc(tmp_path, size="16MiB", extra=SHM + ("--index-map-size", "2MiB"), name="full")
    d.data_dir = str(small_tmpfs / "data")
    try:
        d.start()
        with d.client() as c:
            for i in range(50):
                assert c.put(f"k{i}", bytes([i]) * 3000)
        fill(small_tmpfs / "filler")
        d.stop(signal.SIGKILL)
        d.start()                              # adopts the index in place: no new space
        log = d.read_log()
        assert "No space left" not in log, log
        with d.client() as c:
            assert c.stats()["objects"] == 50
            for i in range(50):
                assert bytes(c.read(f"k{i}")) == bytes([i]) * 3000
    finally:
        d.destroy()
    assert shm_files(d.data_dir) == []


def test_damaged_index_on_a_full_file_system_refuses_with_the_command_then_destroy_works(
        small_tmpfs, tmp_path):
    """Rebuilding a damaged index needs new space. Without it the daemon refuses in one
    line naming the exact command, and that command works on what the refusal left."""
    d = DaemonProc(tmp_path, size="16MiB", extra=SHM + ("--index-map-size", "2MiB"), name="dmg")
    d.data_dir = str(small_tmpfs / "data")
    try:
        d.start()
        with d.client() as c:
            for i in range(50):
                assert c.put(f"k{i}", b"v" * 2000)
        assert d.stop() == 0
        fill(small_tmpfs / "filler")
        data = os.path.join(d.data_dir, "index", "data.mdb")
        with open(data, "r+b") as f:           # in place: both meta pages garbage
            f.write(os.urandom(8192))
        r = subprocess.run(d.args(), capture_output=True, text=True, cwd=ROOT, timeout=60)
        line = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        cmd = f"kvstore-daemon --destroy --data-dir {d.data_dir}"
        assert "damaged" in line and cmd in line, line
        assert shm_files(d.data_dir), "the refusal must leave the store for the operator"
        r = run("--data-dir", d.data_dir, "--destroy")
        one_line(r, 0, "removed the store")
        assert shm_files(d.data_dir) == []
        os.unlink(small_tmpfs / "filler")
        d.start()
        with d.client() as c:
            assert c.stats()["objects"] == 0
    finally:
        d.destroy()


# ---- --destroy -----------------------------------------------------------------------------

def test_destroy_of_a_directory_that_does_not_exist_says_nothing_to_remove(tmp_path):
    missing = tmp_path / "no-such-data-dir"
    r = run("--data-dir", missing, "--destroy")
    line = one_line(r, 0, "nothing to remove", str(missing), "does not exist")
    assert "removed" not in line
    assert not missing.exists()


def test_destroy_of_an_empty_directory_says_nothing_to_remove(tmp_path):
    r = run("--data-dir", tmp_path, "--destroy")
    one_line(r, 0, "nothing to remove", "no store")


def test_destroy_after_a_start_refused_half_way(tmp_path):
    """A start refused after the index was created but before its tables were (what a
    too-small map used to leave): the next start and --destroy both cope."""
    data = tmp_path / "data"
    index = data / "index"
    index.mkdir(parents=True)
    run_py("""
        import sys, lmdb
        lmdb.open(sys.argv[1], map_size=1 << 20).close()
    """, index)
    assert (index / "data.mdb").exists()
    r = run("--data-dir", data, "--destroy")
    one_line(r, 0, "removed the store")
    assert not index.exists()


def test_destroy_after_a_refused_map_size(tmp_path):
    data = tmp_path / "data"
    r = run("--socket", tmp_path / "s.sock", "--size", "16MiB", *SHM, "--data-dir", data,
            "--index-map-size", "16KiB")
    one_line(r, 1, "--index-map-size")
    r = run("--data-dir", data, "--destroy")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert shm_files(str(data)) == []


# ---- the index map size --------------------------------------------------------------------

@pytest.mark.parametrize("size", ["16KiB", "64KiB", "512KiB"])
def test_index_map_size_too_small_names_the_flag(tmp_path, size):
    data = tmp_path / "data"
    r = run("--socket", tmp_path / "s.sock", "--size", "16MiB", *SHM, "--data-dir", data,
            "--index-map-size", size)
    line = one_line(r, 1, "too small", "--index-map-size")
    assert "index is full" not in line
    assert not (tmp_path / "s.sock").exists()
    run("--data-dir", data, "--destroy")


def test_index_full_at_run_time_names_the_flag(make_daemon):
    d = make_daemon(size="64MiB", extra=SHM + ("--index-map-size", "1MiB"))
    with d.client() as c:
        with pytest.raises(IndexFull, match="--index-map-size"):
            for n in range(100000):
                c.put(b"%0250d" % n, b"v")
