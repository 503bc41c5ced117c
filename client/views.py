"""Typed views of held objects: numpy arrays, torch tensors, pyarrow Buffers.

Owns: converting a held read-only view into the caller's type (client/buffers.py does
the conversions), releasing the hold when a conversion fails, and the memory tensors
view. torch has no read-only tensors and ReadOnlyTensor cannot see every write (in-place
ops nested in others, DLPack), so on /dev/shm segments tensors view a private
copy-on-write mapping: a stray write changes only this process's copy of that page and
never faults. (A private mapping of hugetlbfs would need a spare huge page per written
page, so there tensors view the read-only mapping behind the ReadOnlyTensor guard.)
Must never: hand out a writable view of a sealed object.
"""

import mmap

import numpy as np

from . import buffers


def tensor_view(att, v, lock):
    """The memory a tensor of view v should use (see the module docstring)."""
    if att.cow_fd < 0 or v.nbytes == 0:
        return v
    with lock:
        if att.cow_view is None:
            cow = mmap.mmap(att.cow_fd, att.size, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
            base = np.frombuffer(cow, dtype=np.uint8).ctypes.data
            buffers.register_readonly_range(base, base + att.size)
            att.cow_view = memoryview(cow)
    off = np.frombuffer(v, dtype=np.uint8).ctypes.data - att.ro_range[0]
    return att.cow_view[off:off + v.nbytes]


def convert(release, key, fn, view, *args):
    """fn(view, *args); the hold is released if the conversion fails."""
    try:
        return fn(view, *args)
    except BaseException:
        release(key)
        raise
