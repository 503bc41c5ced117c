"""Typed views of held objects: numpy arrays, torch tensors, pyarrow Buffers.

Owns: converting a held read-only view into the caller's type (client/buffers.py does
the conversions), releasing the hold when a conversion fails, and the memory tensors
view.

Tensors. torch has no read-only tensors, and ReadOnlyTensor cannot see every write:
``torch.ops.aten.add_.Tensor(t, 1)``, ``t.as_subclass(torch.Tensor)``, ``u.set_(t)``,
``torch._C.DisableTorchFunctionSubclass`` and ``np.from_dlpack(t)`` (writeable) all get
past it. So on /dev/shm segments every tensor view gets a private copy-on-write mapping
of its own (MAP_PRIVATE of the pages its extent covers, made by ``tensor_memory``),
unmapped when the last tensor or array using that memory is freed. A write that gets
past the guard copies the page into that one mapping: it is seen only through the
tensor that was written and the tensors and arrays derived from it (slices,
``np.from_dlpack``), for as long as they live. It never reaches the segment, another
process, another view of the same object (a second get_tensor, a get, a read), nor any
later view of the same extent after the object is deleted and its space reused. A
write never faults. Cost: one mmap (and one munmap when the tensor dies), about 5 us,
and the first touch of each page faults it in (about 0.1 us per 4 KiB page, some
0.45 ms per 16 MiB, a third of a memcpy of the same size). Unwritten pages share the
segment's page cache pages: no copy, no extra memory.
(A single process-wide private mapping, as before, kept a written page for the
process's whole life: a later tensor of another object put in the same extent showed
the old bytes. Scrubbing written pages with /proc/self/pagemap + MADV_DONTNEED before
each get_tensor would fix later gets but not views already live in the process.)

On hugetlbfs tensors view the read-only shared mapping (PROT_READ) behind the
ReadOnlyTensor guard, and a write that gets past the guard kills the process with
SIGSEGV. That is a choice: a private mapping of hugetlbfs is made of huge pages too,
and Linux reserves huge pages from the pool for the whole of a private mapping when it
is made (or, with MAP_NORESERVE, raises SIGBUS at the write when the pool is empty).
The daemon's pool holds exactly the segment, so each live tensor view would need its
size again in spare huge pages, or crash anyway. The remaining choices are a copy on
every get_tensor (no longer a zero-copy view) or wrong bytes; a crash at the faulty
write shows no wrong bytes anywhere, so we keep it.

numpy arrays (get_array), pyarrow Buffers (get_buffer) and get()'s memoryviews view
the PROT_READ shared mapping on both backings: numpy's and pyarrow's read-only flags
refuse writes and cannot be turned off, so only code that ignores them (ctypes, torch
conversions that warn about non-writable arrays) reaches the page, and then faults
instead of writing.
Must never: hand out a writable view of the segment's shared mapping, or map a tensor
view of anything but the pages of its own extent.
"""

import ctypes
import errno
import mmap
import os
import weakref

import numpy as np

from kvstore.errors import ClientClosed, KVStoreError, SegmentGone, StoreUnavailable, TooManyHolds

from . import buffers

PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_PRIVATE_RW = (mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE)

# Python's mmap.mmap would dup() the fd for each mapping (one fd per live tensor);
# libc's mmap takes none. Each mapping is owned by a ctypes array over it, unmapped by
# a weakref callback when that array is freed (the memoryviews, tensors and numpy
# arrays using the memory all keep it alive). The weakrefs live here until then.
_LIVE = {}


def _unmapper(addr, length):
    def unmap(ref):
        _LIVE.pop(addr, None)
        buffers.unregister_view_range(addr, ref)
        _munmap(addr, length)
    return unmap


def tensor(view, conn, lock, dtype=None, shape=None):
    """A ReadOnlyTensor of the held view (the hold is the caller's)."""
    return buffers.to_tensor(tensor_memory(conn, view, lock), dtype, shape)


def tensor_memory(conn, v, lock):
    """The memory a tensor of view v (a get() view) should use: see the module docstring."""
    n = v.nbytes
    if n == 0:
        return v
    addr = np.frombuffer(v, dtype=np.uint8).ctypes.data
    with lock:                    # the attachment does not change or close meanwhile
        att = conn.att
        lo, hi = att.ro_range
        if not lo <= addr < hi:
            raise StoreUnavailable("the daemon switched to a fresh store during get_tensor; "
                                   "the object is gone from this client's view, get it again")
        if att.backing != "shm":
            return v              # hugetlbfs: the read-only mapping (module docstring)
        if att.cow_fd < 0:
            raise ClientClosed("get_tensor: the client was closed meanwhile; open a new Client")
        off = addr - lo
        start = off - off % PAGE
        length = min(att.size, -(-(off + n) // PAGE) * PAGE) - start
        base = _mmap(None, length, *_PRIVATE_RW, att.cow_fd, start)
    if base is None or base == _MAP_FAILED:
        raise _map_error(ctypes.get_errno(), length)
    try:
        mem = (ctypes.c_char * length).from_address(base)
        ref = weakref.ref(mem, _unmapper(base, length))
        _LIVE[base] = ref
    except BaseException:
        _munmap(base, length)
        raise
    buffers.register_view_range(base, base + length, ref)
    a = off - start
    return memoryview(mem).cast("B")[a:a + n]


def _map_error(err, length):
    if err == errno.ENOMEM:
        return TooManyHolds(f"get_tensor: cannot map another {length}-byte tensor view: this process "
                            f"has too many mappings (vm.max_map_count) or too little memory; free "
                            f"tensors you no longer use")
    if err in (errno.EBADF, errno.EACCES, errno.ENODEV, errno.EINVAL, errno.ENXIO, errno.EOVERFLOW):
        return SegmentGone(f"get_tensor: cannot map the segment ({os.strerror(err)}); it was "
                           f"removed or changed behind the store's back: restart the daemon")
    return KVStoreError(f"get_tensor: cannot map the tensor's pages ({os.strerror(err)})")


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
