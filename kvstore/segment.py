"""The shared-memory segment: where object bytes live.

Owns: choosing the backing (a file on hugetlbfs when huge pages can be had, else a
POSIX shared-memory object under /dev/shm), reserving huge pages and mounting
hugetlbfs when the config allows it, pre-faulting every page at start-up, and
reopening the same segment after a restart. Both backings are named files, so the
bytes outlive the daemon process (a crash loses no sealed object). A segment's
backing ("hugetlbfs" or "shm") is recorded where it is known (``Segment.backing``,
the ``backing`` arguments of ``reopen`` and ``remove``); where it is not, it is read
from the file system the path lies on (kvstore.host), never guessed from the path.
``watch`` tells the daemon, from fstat and stat alone, whether the segment's file was
truncated, unlinked or replaced while it runs; ``reopen_problem`` says why a segment
could not be adopted at start (a truncated one apart).
``default_paths`` names the two places a store's segment can be, for the configured
hugetlbfs mount. A hugetlbfs mount the daemon made itself carries an empty mark file
(MOUNT_MARK); removing the last segment from such a mount (a stop with
discard_on_exit, ``--destroy``, a start that fell back) unmounts it again. A mount
that holds a kept segment stays: unmounting would free the segment with every object.
Must never: fail silently. Every choice and fallback is logged with its reason;
``hugepages = "require"`` turns a fallback into a start-up error.
"""

import hashlib
import logging
import mmap
import os
import subprocess

import posix_ipc

from . import access, host
from .errors import DaemonStartError

log = logging.getLogger("kvstore.segment")

#: An empty file left in a hugetlbfs mount that kvstore mounted itself (reserve_hugepages),
#: so whichever process removes the last segment there also takes the mount down.
MOUNT_MARK = ".kvstore-mounted"


def segment_name(data_dir):
    """A stable name for a data dir's segment, the same across restarts."""
    return "kvstore-" + hashlib.sha1(os.path.realpath(data_dir).encode()).hexdigest()[:16]


def default_paths(cfg_or_hugetlbfs_dir, name):
    """[(path, backing)] of the two places the segment called name can be: a file on
    the configured hugetlbfs mount, and a POSIX shared-memory object. Takes a Config
    (its hugetlbfs_dir) or the hugetlbfs dir itself."""
    d = getattr(cfg_or_hugetlbfs_dir, "hugetlbfs_dir", cfg_or_hugetlbfs_dir)
    return [(os.path.join(d, name + ".seg"), "hugetlbfs"), (os.path.join(host.SHM_DIR, name), "shm")]


def backing_of(path):
    """The backing of an existing segment file, from its file system's type."""
    return "hugetlbfs" if host.fs_type(path) == "hugetlbfs" else "shm"


class Segment:
    """An open segment: ``fd``, ``size`` (bytes), ``backing`` and ``path``."""

    def __init__(self, fd, size, backing, path, reused, reserved_pages=0):
        self.fd, self.size, self.backing, self.path, self.reused = fd, size, backing, path, reused
        #: huge pages this process added to vm.nr_hugepages for the segment
        self.reserved_pages = reserved_pages

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def destroy(self):
        """Close and remove the backing file, giving its memory back (and the huge
        pages this process reserved for it back to the kernel)."""
        self.close()
        remove(self.path, self.backing)
        if self.reserved_pages:
            unreserve_huge_pages(self.reserved_pages)
            self.reserved_pages = 0

    def map(self, writable):
        """Map the whole segment, page tables populated up front (no faults on hot paths)."""
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(self.fd, self.size, flags=flags, prot=prot)


def remove(path, backing=None):
    """Remove a segment file, giving its memory back once nobody maps it; a missing
    file is not an error. Both backings are files, and shm_unlink(name) is
    unlink(SHM_DIR/name), so unlinking the recorded path is right for either; the
    backing (read from the file system when not given) only tells the log which."""
    backing = backing or backing_of(path)
    try:
        os.unlink(path)
        log.debug("removed the %s segment %s", backing, path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove the %s segment %s: %s", backing, path, e.strerror)
        return
    if backing == "hugetlbfs":
        release_mount(os.path.dirname(path))


def release_mount(d):
    """Unmount hugetlbfs from d if kvstore mounted it (MOUNT_MARK is there) and no other
    file is left in it. True if it was unmounted. A mount that still holds a file (a
    kept segment, anyone else's) is left alone. If a process still maps an unlinked
    segment there, the mount is detached lazily (the kernel frees it once unmapped)."""
    mark = os.path.join(d, MOUNT_MARK)
    try:
        if not (os.path.exists(mark) and host.is_hugetlbfs(d)) or os.listdir(d) != [MOUNT_MARK]:
            return False
        os.unlink(mark)
    except OSError:
        return False
    for cmd in (["umount", d], ["umount", "-l", d]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            r = None
            err = str(e)
        else:
            err = r.stderr.strip()
        if r is not None and r.returncode == 0:
            log.info("unmounted hugetlbfs from %s (mounted by reserve_hugepages)%s", d,
                     " lazily: a process still maps a segment there" if "-l" in cmd else "")
            return True
    log.warning("could not unmount hugetlbfs from %s: %s; umount %s by hand", d, err, d)
    return False


def unreserve_huge_pages(pages):
    try:
        total = host.total_huge_pages()
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(max(0, total - pages)))
        log.info("gave back %d huge pages: vm.nr_hugepages %d -> %d", pages, total, max(0, total - pages))
    except OSError as e:
        log.warning("could not give back %d huge pages: %s", pages, e.strerror)


def _reserve_huge_pages(cfg, pages_needed):
    """Make sure pages_needed free huge pages exist; reserve more if allowed.
    -> (reason or None, pages added to vm.nr_hugepages)"""
    info = host.meminfo()
    free = info.get("HugePages_Free", 0)
    if free >= pages_needed:
        return None, 0
    if not cfg.reserve_hugepages:
        return (f"{free} free huge pages, {pages_needed} needed, and reserve_hugepages is off "
                f"(set it, or echo N > /proc/sys/vm/nr_hugepages as root)"), 0
    if os.geteuid() != 0:
        return "reserve_hugepages is on but the daemon is not root", 0
    total = info.get("HugePages_Total", 0)
    want = total + pages_needed - free
    try:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write(str(want))
    except OSError as e:
        return f"cannot raise vm.nr_hugepages to {want}: {e.strerror}", 0
    after = host.meminfo()
    added = max(0, after.get("HugePages_Total", 0) - total)
    got = after.get("HugePages_Free", 0)
    if got < pages_needed:
        if added:
            unreserve_huge_pages(added)
        return f"asked the kernel for {want} huge pages, only {got} free (memory fragmented?)", 0
    log.info("reserved huge pages: vm.nr_hugepages %d -> %d", total, want)
    return None, added


def _ensure_hugetlbfs(cfg):
    d = cfg.hugetlbfs_dir
    if host.is_hugetlbfs(d):
        return None
    if not (cfg.reserve_hugepages and os.geteuid() == 0):
        return f"{d} is not a hugetlbfs mount (set reserve_hugepages as root to mount it)"
    try:
        os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "mode=1770", "none", d],
                       check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot mount hugetlbfs on {d}: {e}"
    try:
        open(os.path.join(d, MOUNT_MARK), "x").close()
    except OSError as e:
        log.warning("mounted hugetlbfs on %s but cannot mark it as kvstore's (%s): it will "
                    "not be unmounted on stop", d, e.strerror)
    log.info("mounted hugetlbfs on %s (unmounted again once its segment is removed: "
             "discard_on_exit or --destroy)", d)
    return None


def _prefault(fd, size, what):
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise DaemonStartError(f"cannot pre-fault {size} bytes of {what}: {e.strerror}") from None


def _open_huge(cfg, name, size, mode):
    """Create a hugetlbfs segment file; returns (Segment, None) or (None, reason)."""
    if cfg.hugepages == "off":
        return None, "hugepages = off"
    hp = host.huge_page_size()
    size = (size + hp - 1) // hp * hp
    reason = _ensure_hugetlbfs(cfg)
    if reason:
        return None, reason
    reason, added = _reserve_huge_pages(cfg, size // hp)
    if reason:
        release_mount(cfg.hugetlbfs_dir)
        return None, reason
    path = default_paths(cfg, name)[0][0]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        access.apply(fd, mode)           # group and mode set explicitly, not via the umask
    except OSError as e:
        if added:
            unreserve_huge_pages(added)
        release_mount(cfg.hugetlbfs_dir)
        return None, f"cannot create {path}: {e.strerror}"
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        if added:
            unreserve_huge_pages(added)
        release_mount(cfg.hugetlbfs_dir)
        return None, f"cannot allocate {size} bytes of huge pages in {path}: {e.strerror}"
    return Segment(fd, size, "hugetlbfs", path, reused=False, reserved_pages=added), None


def check_memory(cfg, name):
    """Refuse early (before anything is written) a size that memory cannot hold.

    An existing segment file of this store is reused, so it needs no new memory."""
    if any(os.path.exists(path) for path, _ in default_paths(cfg, name)):
        return
    info = host.meminfo()
    avail = info.get("MemAvailable", 0)
    if cfg.hugepages != "off":
        avail += info.get("HugePages_Free", 0) * info.get("Hugepagesize", 2 << 20)
    if cfg.size > avail:
        raise DaemonStartError(f"size {cfg.size} bytes exceeds available memory ({avail} bytes); "
                               f"start with a smaller --size")


def _open_shm(name, size, mode):
    avail = host.meminfo().get("MemAvailable", 0)
    if size > avail:
        raise DaemonStartError(
            f"size {size} bytes exceeds available memory ({avail} bytes); start with a smaller --size")
    path = os.path.join(host.SHM_DIR, name)      # where shm_open("/" + name) puts it
    try:
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=size)
        access.apply(shm.fd, mode)       # group and mode set explicitly, not via the umask
    except (posix_ipc.Error, OSError) as e:
        raise DaemonStartError(f"cannot create shared memory {path}: {e}") from None
    fd = shm.fd
    _prefault(fd, size, path)
    return Segment(fd, size, "shm", path, reused=False)


def reopen(path, size, backing=None):
    """Reopen a segment left by an earlier daemon; None if it is gone or the wrong size.

    ``backing`` is the one recorded when it was created; None reads it from the file
    system the path lies on."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    if os.fstat(fd).st_size != size:
        os.close(fd)
        return None
    backing = backing or backing_of(path)
    return Segment(fd, size, backing, path, reused=True)


def reopen_problem(path, size):
    """Why ``reopen(path, size)`` found no segment to adopt: (text, truncated). A file
    cut shorter than recorded (by another process) is ``truncated``: the objects in it
    are lost, which is an error, not the normal after-reboot case of a missing file."""
    try:
        got = os.stat(path).st_size
    except FileNotFoundError:
        return f"segment {path} of the previous daemon is gone (reboot?)", False
    except OSError as e:
        return f"segment {path} of the previous daemon cannot be opened ({e.strerror})", False
    if got < size:
        return (f"segment {path} of the previous daemon was truncated to {got} of its {size} "
                f"bytes by another process"), True
    return f"segment {path} of the previous daemon is {got} bytes, not the {size} recorded", False


def watch(seg):
    """What happened to an open segment's file behind the daemon's back: None (nothing),
    or (kind, text) with kind "truncated" (shorter than the segment: the cut-off bytes
    are gone and touching them raises SIGBUS), "unlinked" (no name left: the open file
    works, but a restart cannot find it) or "replaced" (its path names another file).
    Looks at the fd and the path only (fstat, stat): never at the segment's memory."""
    st = os.fstat(seg.fd)
    if st.st_size < seg.size:
        return "truncated", f"was truncated to {st.st_size} of its {seg.size} bytes"
    if st.st_nlink == 0:
        return "unlinked", "was removed (unlinked)"
    try:
        now = os.stat(seg.path)
    except FileNotFoundError:
        return "unlinked", "was moved away from its path"
    except OSError:
        return None
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        return "replaced", "was replaced: its path now names another file"
    return None


def create(cfg, name, mode=0o600):
    """A fresh, pre-faulted segment of at least cfg.size bytes, huge pages first."""
    for stale, backing in default_paths(cfg, name):
        remove(stale, backing)
    seg, reason = _open_huge(cfg, name, cfg.size, mode)
    if seg is not None:
        log.info("segment: %d bytes of huge pages in %s (pre-faulted)", seg.size, seg.path)
        return seg
    if cfg.hugepages == "require":
        raise DaemonStartError(f"huge pages are required but unavailable: {reason}")
    seg = _open_shm(name, cfg.size, mode)
    log.info("segment: %d bytes of POSIX shared memory in %s (pre-faulted); no huge pages because %s",
             seg.size, seg.path, reason)
    return seg
