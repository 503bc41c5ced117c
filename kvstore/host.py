"""Facts about this host that kvstore decides by: memory, huge pages and mounts.

Owns: reading /proc/meminfo (``meminfo``, ``huge_page_size``, ``free_huge_pages``,
``total_huge_pages``) and /proc/mounts (``mounts``, ``fs_type``, ``is_hugetlbfs``), and
where POSIX shared memory lives (``SHM_DIR``). The segment, the daemon and the tests
ask here rather than parse /proc themselves, so every part reads a fact the same way.
Must never: change the host (reserving huge pages or mounting is segment.py's job),
cache a fact (memory and mounts change under a running daemon), or raise because
/proc is unreadable: a missing file reads as "nothing known" (empty, or "unknown").
"""

import os
import re

#: Where glibc keeps POSIX shared-memory objects (shm_open("/name") is SHM_DIR/name).
SHM_DIR = "/dev/shm"

#: Used when /proc/meminfo does not say (x86-64's and most arm64 kernels' default).
_DEFAULT_HUGE_PAGE = 2 << 20

_ESCAPE = re.compile(r"\\([0-7]{3})")


def meminfo():
    """/proc/meminfo as {field: value in bytes (or a plain count for HugePages_*)}."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, rest = line.split(":", 1)
                parts = rest.split()
                n = int(parts[0])
                out[name] = n * 1024 if len(parts) > 1 and parts[1] == "kB" else n
    except OSError:
        pass
    return out


def huge_page_size():
    """Bytes in one default-size huge page."""
    return meminfo().get("Hugepagesize", _DEFAULT_HUGE_PAGE)


def total_huge_pages():
    """Huge pages reserved in the kernel's pool (vm.nr_hugepages)."""
    return meminfo().get("HugePages_Total", 0)


def free_huge_pages():
    """Huge pages of the pool that nothing has taken yet."""
    return meminfo().get("HugePages_Free", 0)


def _unescape(field):
    # /proc/mounts writes space, tab, newline and backslash as octal escapes (\040 ...)
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts(text=None):
    """The mount table as [(device, mountpoint, fstype, options)], in /proc/mounts order.

    ``text`` is a /proc/mounts-format text to parse instead of the live table (tests)."""
    if text is None:
        try:
            with open("/proc/mounts") as f:
                text = f.read()
        except OSError:
            return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            out.append((_unescape(parts[0]), _unescape(parts[1]), parts[2], parts[3]))
    return out


def fs_type(path, table=None):
    """File system type of the mount holding path: the longest mount point that is
    path or a parent of it ("unknown" if none is). Symlinks are resolved first; of
    mounts stacked on one mount point the last (the visible one) wins."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for _dev, mnt, fstype, _opts in (mounts() if table is None else table):
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, fstype
    return kind


def is_hugetlbfs(path, table=None):
    """True if path exists and lies on a hugetlbfs mount (files there are huge pages)."""
    return os.path.exists(path) and fs_type(path, table) == "hugetlbfs"
