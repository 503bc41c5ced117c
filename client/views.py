"""Typed views of held objects: numpy arrays, torch tensors, pyarrow Buffers.

Owns: converting a held read-only view into the caller's type (client/buffers.py does
the conversions), releasing the hold when a conversion fails, and the memory typed
views use: a private copy-on-write mapping per view (``private_memory``), new or
reused from the attachment's cache of released ones (``cache_of``, client/mapcache.py).

Tensors. torch has no read-only tensors, and ReadOnlyTensor cannot see every write:
``torch.ops.aten.add_.Tensor(t, 1)``, ``t.as_subclass(torch.Tensor)``, ``u.set_(t)``,
``torch._C.DisableTorchFunctionSubclass`` and ``np.from_dlpack(t)`` (writeable) all get
past it. So every tensor view gets a private copy-on-write mapping of its own
(MAP_PRIVATE of the pages its extent covers, made by ``tensor_memory``), unmapped when
the last tensor or array using that memory is freed. A write that gets past the guard
copies the page into that one mapping: it is seen only through the tensor that was
written and the tensors and arrays derived from it (slices, ``np.from_dlpack``), for as
long as they live. It never reaches the segment, another process, another view of the
same object (a second get_tensor, a get, a read), nor any later view of the same extent
after the object is deleted and its space reused. Unwritten pages are the segment's
own pages: no copy, no extra memory.
Cost on /dev/shm: a new mapping costs an mmap and a munmap (about 5-10 us; munmap also
flushes the TLBs of the process's other threads), and the first touch of its pages maps
them (about 110 ns a page: 5 us for a 4 KiB view, some 0.5 ms for a 16 MiB one read
whole, half a memcpy of the same size). So a released mapping is not unmapped but kept
in its attachment's MapCache (client/mapcache.py: at most 256 mappings and 1 GiB of
range, oldest out first), its written pages reverted to the file's (pagemap +
MADV_DONTNEED), and the next view of exactly the same pages (the same object again, or
the next object in the same extent: KV blocks are uniform) takes it with its page-table
entries already made: a 16 MiB get_tensor, read whole and released, went from about
660 us to 150 us (a new 16 MiB view costs about half a memcpy of it, a reused one an
eighth). Attachment.close (client close, a move to a fresh store) unmaps the
cache; a mapping that cannot be checked is unmapped, never cached. On hugetlbfs a few
page-table entries map 2 MiB each (nearly free); the cache works the same there
(pagemap reports a written huge page as private, and MADV_DONTNEED gives it back to
the pool at release). A process can have about 65,000 typed views alive at once
(vm.max_map_count counts each mapping, cached ones included); past that they raise
TooManyHolds (an mmap refused for room first unmaps the cached mappings and tries again).
(The single process-wide private mapping used before kept a written page for the
process's whole life: a later tensor of another object put in the same extent showed
the old bytes. Scrubbing written pages with /proc/self/pagemap + MADV_DONTNEED before
each get_tensor would fix later views but not views already alive in the process.)

On hugetlbfs the private mapping is of huge pages and is made with MAP_NORESERVE:
reading maps the segment's own huge pages (a few page-table entries: nearly free), and
a write past the guard takes a free huge page from the pool for each page written. If
the pool has no free huge page that is not reserved (the daemon reserves exactly the
segment's pages, so that is the usual case) the kernel kills the writing process with
SIGBUS. That crash is a choice: without MAP_NORESERVE Linux reserves huge pages for the
whole of a private mapping when it is made, so every live tensor view would take its
size out of the pool (get_tensor refused, or other users starved, when it is short);
what remains is a copy on every get_tensor (no longer a zero-copy view) or a view
through which the write reaches the shared bytes (wrong data for everyone). A crash at
the faulty write shows no wrong byte anywhere, so we keep it.

numpy arrays (get_array) and pyarrow Buffers (get_buffer, get_buffers) get a private
mapping of their own the same way, exposed read-only: their flags refuse writes and
cannot be turned off, and a conversion that ignores them (torch.from_dlpack or
torch.as_tensor of the array, or of numpy's view of the Buffer) writes into that
private copy instead of faulting. get()'s memoryviews are the raw zero-copy views of the
read-only shared mapping (PROT_READ): a write through one (only by ignoring its
read-only flag, e.g. torch.frombuffer, which warns) faults with SIGSEGV and never lands.
Must never: hand out a writable view of the segment's shared mapping, map a typed view
of anything but the pages of its own extent, or give a view a cached mapping of other
pages, of another attachment's segment, or with a private page in it.
"""

import ctypes
import errno
import mmap
import os
import weakref

import numpy as np

from kvstore.errors import ClientClosed, KVStoreError, SegmentGone, StoreUnavailable, TooManyHolds

from . import buffers
from .mapcache import PAGE, MapCache, mmap_ as _mmap, munmap as _munmap

_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)     # Linux's value

# Python's mmap.mmap would dup() the fd for each mapping (one fd per live tensor);
# libc's mmap takes none. Each mapping is owned by a ctypes array over it, released by
# a weakref callback when that array is freed (the memoryviews, tensors and numpy
# arrays using the memory all keep it alive): into its attachment's MapCache
# (client/mapcache.py), or unmapped. The weakrefs live here until then.
_LIVE = {}


def _releaser(addr, start, length, page, cache):
    def release(ref, munmap=_munmap):
        kept = False
        try:
            if _LIVE.get(addr) is ref:
                del _LIVE[addr]
            buffers.unregister_view_range(addr, ref)
            try:
                kept = cache is not None and cache.give(addr, start, length, page)
            except Exception:                # (at interpreter exit, say): unmap it
                kept = False
        finally:
            if not kept:
                munmap(addr, length)
    return release


def cache_of(att):
    """The attachment's MapCache of released view mappings (made at the first view);
    Attachment.close closes it. Called under the client lock."""
    cache = att.__dict__.get("view_cache")
    if cache is None:
        cache = att.view_cache = MapCache()
        if att.cow_fd < 0:                   # closed meanwhile: nothing may stay cached
            cache.close()
    return cache


def tensor(view, conn, lock, dtype=None, shape=None):
    """A ReadOnlyTensor of the held view (the hold is the caller's)."""
    return buffers.to_tensor(private_memory(conn, view, lock, "get_tensor"), dtype, shape)


def array(view, conn, lock, dtype=None, shape=None):
    """A read-only numpy array of the held view, on private memory (module docstring)."""
    return buffers.to_numpy(private_memory(conn, view, lock, "get_array").toreadonly(), dtype, shape)


def arrow(view, conn, lock):
    """An immutable pyarrow Buffer of the held view, on private memory (module docstring)."""
    return buffers.to_arrow(private_memory(conn, view, lock, "get_buffer").toreadonly())


def private_memory(conn, v, lock, what):
    """The memory a typed view of v (a get() view) should use: a private copy-on-write
    mapping of v's pages, as a writable flat memoryview (see the module docstring)."""
    n = v.nbytes
    if n == 0:
        return v
    addr = np.frombuffer(v, dtype=np.uint8).ctypes.data
    with lock:                    # the attachment does not change or close meanwhile
        att = conn.att
        lo, hi = att.ro_range
        if not lo <= addr < hi:
            raise StoreUnavailable(f"the daemon switched to a fresh store during {what}; "
                                   f"the object is gone from this client's view, get it again")
        fd = att.cow_fd
        if fd < 0:
            raise ClientClosed(f"{what}: the client was closed meanwhile; open a new Client")
        if att.backing == "shm":
            page, flags = PAGE, mmap.MAP_PRIVATE
        else:                     # hugetlbfs: its own page size, no reservation (docstring)
            page, flags = os.fstatvfs(fd).f_bsize, mmap.MAP_PRIVATE | _MAP_NORESERVE
        off = addr - lo
        start = off - off % page
        length = min(att.size, -(-(off + n) // page) * page) - start
        cache = cache_of(att)
        base = cache.take(start, length)      # a released mapping of these pages, as it is
        if base is None:
            base, err = _map(length, flags, fd, start)
            if err == errno.ENOMEM and cache.stats()[0]:
                cache.clear()                 # room taken by cached mappings: give it back
                base, err = _map(length, flags, fd, start)
    if base is None:
        raise _map_error(err, length, what)
    try:
        mem = (ctypes.c_char * length).from_address(base)
        ref = weakref.ref(mem, _releaser(base, start, length, page, cache))
        _LIVE[base] = ref
    except BaseException:
        _munmap(base, length)
        raise
    buffers.register_view_range(base, base + length, ref)
    a = off - start
    return memoryview(mem).cast("B")[a:a + n]


def _map(length, flags, fd, start):
    """(address, 0) of a new private mapping of the segment's [start, start+length), or
    (None, errno)."""
    base = _mmap(None, length, _PROT_RW, flags, fd, start)
    if base is None or base == _MAP_FAILED:
        return None, ctypes.get_errno()
    return base, 0


def _map_error(err, length, what):
    if err == errno.ENOMEM:
        return TooManyHolds(f"{what}: cannot map another {length}-byte view: this process has too "
                            f"many mappings (vm.max_map_count) or too little memory; free the "
                            f"tensors, arrays and buffers you no longer use")
    if err in (errno.EBADF, errno.EACCES, errno.ENODEV, errno.EINVAL, errno.ENXIO, errno.EOVERFLOW):
        return SegmentGone(f"{what}: cannot map the segment ({os.strerror(err)}); it was "
                           f"removed or changed behind the store's back: restart the daemon")
    return KVStoreError(f"{what}: cannot map the object's pages ({os.strerror(err)})")


def convert(release, key, fn, view, *args):
    """fn(view, *args); the hold is released if the conversion fails."""
    try:
        return fn(view, *args)
    except BaseException:
        try:
            release(key)
        except KVStoreError:      # the hold went with the store (fresh store, closed)
            pass
        raise


def convert_many(release, keys, fn, vs, *args):
    """[fn(v, *args) or None per view]; every hold is released if one conversion fails."""
    try:
        return [None if v is None else fn(v, *args) for v in vs]
    except BaseException:
        for k, v in zip(keys, vs):
            if v is not None:
                try:
                    release(k)
                except KVStoreError:
                    pass
        raise
