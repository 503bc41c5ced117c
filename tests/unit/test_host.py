"""kvstore.host: /proc/mounts parsing, fs_type by the longest mount prefix, meminfo."""

import os

from kvstore import host
from kvstore import segment

MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
/dev/sda1 / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0
none /mnt/huge\\040pages hugetlbfs rw,mode=1770 0 0
tmpfs /mnt tmpfs rw 0 0
overlay /mnt overlay rw 0 0
garbage-line
"""


def test_mounts_parses_the_text():
    table = host.mounts(MOUNTS)
    assert table[0] == ("sysfs", "/sys", "sysfs", "rw,nosuid,nodev,noexec,relatime")
    assert ("hugetlbfs", "/dev/hugepages", "hugetlbfs", "rw,relatime,pagesize=2M") in table
    assert ("none", "/mnt/huge pages", "hugetlbfs", "rw,mode=1770") in table     # \040 is a space
    assert len(table) == 7                                                       # the short line is skipped


def test_fs_type_takes_the_longest_mount_prefix():
    table = host.mounts(MOUNTS)
    assert host.fs_type("/dev/hugepages/kvstore-1.seg", table) == "hugetlbfs"
    assert host.fs_type("/dev/hugepages", table) == "hugetlbfs"
    assert host.fs_type("/dev/shm/kvstore-1", table) == "tmpfs"
    assert host.fs_type("/dev/hugepagesX/f", table) == "ext4"        # a name prefix is not a parent
    assert host.fs_type("/srv/data", table) == "ext4"
    assert host.fs_type("/mnt/huge pages/x.seg", table) == "hugetlbfs"
    assert host.fs_type("/mnt/other", table) == "overlay"           # stacked: the last mount is visible
    assert host.fs_type("/x", []) == "unknown"


def test_is_hugetlbfs_needs_the_path_to_exist(tmp_path):
    table = host.mounts(f"hugetlbfs {tmp_path} hugetlbfs rw 0 0\n")
    assert host.is_hugetlbfs(str(tmp_path), table)
    assert not host.is_hugetlbfs(str(tmp_path / "missing"), table)
    assert not host.is_hugetlbfs(str(tmp_path), host.mounts("tmpfs / tmpfs rw 0 0\n"))


def test_live_host_facts():
    assert host.fs_type("/") != "unknown"
    assert all(len(m) == 4 for m in host.mounts())
    info = host.meminfo()
    assert info["MemTotal"] > 0 and info["MemAvailable"] <= info["MemTotal"]
    assert host.huge_page_size() >= 4096 and host.huge_page_size() & (host.huge_page_size() - 1) == 0
    assert 0 <= host.free_huge_pages() <= host.total_huge_pages()


def test_segment_backing_comes_from_the_file_system(tmp_path):
    """The backing is recorded or read from the mount table, never from a path prefix."""
    f = tmp_path / "seg"
    f.write_bytes(bytes(4096))
    seg = segment.reopen(str(f), 4096)
    assert seg.backing == "shm" and seg.reused          # a file on tmpfs/ext4: not hugetlbfs
    seg.close()
    seg = segment.reopen(str(f), 4096, backing="hugetlbfs")
    assert seg.backing == "hugetlbfs"                   # the recorded backing is believed
    seg.close()
    assert segment.reopen(str(f), 8192) is None         # the wrong size
    segment.remove(str(f), "shm")
    assert not f.exists()
    segment.remove(str(f))                              # gone already: not an error


def test_default_paths_use_the_configured_hugetlbfs_dir():
    from kvstore.config import load_config
    cfg = load_config(env={}, overrides={"hugetlbfs_dir": "/mnt/huge"})
    want = [("/mnt/huge/kv-1.seg", "hugetlbfs"), (os.path.join(host.SHM_DIR, "kv-1"), "shm")]
    assert segment.default_paths(cfg, "kv-1") == want
    assert segment.default_paths("/mnt/huge", "kv-1") == want
