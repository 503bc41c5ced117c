"""Released typed-view mappings kept for reuse, and the check that makes reuse safe.

Owns: ``MapCache``, one per Attachment (client/views.py makes it, Attachment.close
empties it): the private copy-on-write mappings of typed views whose last user was
freed, keyed by the page range they map, so that the next view of the same pages
(the same object again, or another object in the same extent: KV blocks are uniform)
takes the mapping as it is instead of a new one. A new mapping costs an mmap, a
munmap and one page fault per page on first touch (some 110 ns a 4 KiB page: 0.5 ms
for 16 MiB read whole); a reused one has its page-table entries already. And
``revert_private``: before a mapping enters the cache, /proc/self/pagemap tells which
of its pages are this process's private copies (written past the guard: present and
not a file page, or swapped out) and MADV_DONTNEED drops them, so they read the file's
pages again and the memory they held is freed at once. Pages that are not private are
the segment's own pages (shared with every other mapping of the file): they always show
the file's current bytes, a later object in the same extent included. A mapping that
cannot be checked or reverted (no /proc, an old kernel refusing MADV_DONTNEED on huge
pages) is unmapped, never cached.
Bounds: at most ``MAX_MAPPINGS`` mappings and ``MAX_BYTES`` of mapped range per cache
(oldest unmapped first); page tables are the only memory a cached mapping holds.
Threads: the weakref callbacks that release mappings run in whatever thread frees the
last user, possibly inside the garbage collector while this very thread is in the
cache, so they never wait for the lock: they queue the mapping and whoever holds the
lock settles the queue before letting go. In a forked child every cache closes (its
clients are orphaned; nothing is reused there).
Must never: hand out a mapping with a private page in it, a mapping of another range or
of a closed attachment's segment, or keep a mapping after close().
"""

import ctypes
import mmap
import os
import threading
import weakref
from collections import OrderedDict

import numpy as np

PAGE = mmap.PAGESIZE
MAX_MAPPINGS = 256                      # far below vm.max_map_count (65530 by default)
MAX_BYTES = 1 << 30                     # of mapped range; a bigger view is never cached

_libc = ctypes.CDLL(None, use_errno=True)
mmap_ = _libc.mmap
mmap_.restype = ctypes.c_void_p
mmap_.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
munmap = _libc.munmap
munmap.restype = ctypes.c_int
munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_madvise = _libc.madvise
_madvise.restype = ctypes.c_int
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)

# /proc/self/pagemap: 8 bytes per base page, flags in the top byte: bit 7 (63) present,
# bit 6 (62) swapped, bit 5 (61) file page or shared anonymous. Top bytes of pages that
# read the file: not mapped at all, or present file pages.
_CLEAN = bytes(b for b in range(256) if not b & 0x40 and b & 0xA0 != 0x80)
_PM = [-1, 0]                           # the pagemap fd and the pid that opened it


_CACHES = weakref.WeakSet()


def _after_fork_in_child():
    # The child's clients are orphaned (client/connection.py): nothing is reused there.
    # Its caches close, on fresh locks (the fork may have caught another thread holding
    # one); the child unmaps its copies of the cached mappings, and of views when freed.
    fd, _PM[:] = _PM[0], [-1, 0]
    if fd >= 0:
        os.close(fd)
    for cache in list(_CACHES):
        cache._lock = threading.Lock()
        try:
            cache.close()
        except Exception:                   # caught mid-update by the fork: leave it
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pagemap():
    fd, pid = _PM
    if pid != os.getpid():              # an fd inherited over fork reads the parent's
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        _PM[:] = [fd, os.getpid()]
    return fd


def private_pages(addr, length):
    """Indices of the base pages of [addr, addr+length) that hold private copies (a
    numpy array, empty when there are none); None if pagemap cannot be read."""
    fd = _pagemap()
    if fd < 0:
        return None
    n = length // PAGE
    try:
        b = os.pread(fd, 8 * n, addr // PAGE * 8)
    except OSError:
        return None
    if len(b) != 8 * n:
        return None
    top = b[7::8]
    if not top.translate(None, _CLEAN):
        return np.empty(0, np.intp)
    t = np.frombuffer(top, np.uint8)
    return np.flatnonzero(((t & 0x40) != 0) | ((t & 0xA0) == 0x80))


def revert_private(addr, length, page):
    """Drop the private copies in the mapping [addr, addr+length) (page: its page size);
    True when every page reads the file again, False if that cannot be made sure."""
    bad = private_pages(addr, length)
    if bad is None:
        return False
    if not len(bad):
        return True
    lo = int(bad[0]) * PAGE // page * page
    hi = min(length, -(-(int(bad[-1]) + 1) * PAGE // page) * page)
    if _madvise(addr + lo, hi - lo, _MADV_DONTNEED) != 0:
        return False
    bad = private_pages(addr, length)
    return bad is not None and not len(bad)


class MapCache:
    """Released view mappings of one attachment's segment, by (start, length) in the
    segment (see the module docstring)."""

    def __init__(self, max_mappings=None, max_bytes=None):
        self.max_mappings = MAX_MAPPINGS if max_mappings is None else max_mappings
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self._lock = threading.Lock()
        self._free = {}                 # (start, length) -> [addr, ...], newest last
        self._lru = OrderedDict()       # addr -> (start, length), oldest first
        self._bytes = 0
        self._queue = []                # (addr, start, length) released, not yet filed
        self.closed = False
        _CACHES.add(self)

    def take(self, start, length):
        """The address of a cached mapping of exactly [start, start+length), or None."""
        if self.closed:
            return None
        with self._lock:
            addrs = self._free.get((start, length))
            addr = None
            if addrs and not self.closed:
                addr = addrs.pop()
                if not addrs:
                    del self._free[(start, length)]
                del self._lru[addr]
                self._bytes -= length
        self._settle()
        return addr

    def give(self, addr, start, length, page):
        """File a mapping whose last user is gone (called from its weakref callback).
        True if the cache took it; False: the caller unmaps it."""
        if self.closed or length > self.max_bytes or self.max_mappings <= 0:
            return False
        if not revert_private(addr, length, page):
            return False
        self._queue.append((addr, start, length))
        self._settle()
        return True

    def clear(self):
        """Unmap every cached mapping (to make room for a new one)."""
        with self._lock:
            out = self._drain(everything=True)
        _unmap_all(out)
        self._settle()

    def close(self):
        """Unmap every cached mapping, now and whenever one is given back later."""
        self.closed = True
        self._settle()

    def stats(self):
        """(mappings, bytes) cached now."""
        return len(self._lru), self._bytes

    def _settle(self):
        # Whoever gets the lock files the queue; a holder calls this after letting go,
        # so nothing queued while it held the lock is left behind.
        while (self._queue or (self.closed and self._lru)) and self._lock.acquire(False):
            try:
                out = self._drain(everything=self.closed)
            finally:
                self._lock.release()
            _unmap_all(out)

    def _drain(self, everything):
        out = []
        while self._queue:
            addr, start, length = self._queue.pop()
            if self.closed:
                out.append((addr, length))
                continue
            self._free.setdefault((start, length), []).append(addr)
            self._lru[addr] = (start, length)
            self._bytes += length
        while self._lru and (everything or len(self._lru) > self.max_mappings
                             or self._bytes > self.max_bytes):
            addr, key = self._lru.popitem(last=False)
            addrs = self._free[key]
            addrs.remove(addr)
            if not addrs:
                del self._free[key]
            self._bytes -= key[1]
            out.append((addr, key[1]))
        return out


def _unmap_all(out):
    for addr, length in out:
        munmap(addr, length)
