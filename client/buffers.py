"""Conversions between caller values and segment memory.

Owns: turning what put() accepts (bytes, bytearray, memoryview, numpy arrays, torch
tensors, pyarrow Buffers, anything with the buffer protocol) into one flat byte view,
and turning a read-only segment view into numpy arrays, torch tensors and pyarrow
Buffers without copying. numpy and pyarrow views of sealed objects are read-only by
their own flags. torch has no read-only tensors, so views come back as
ReadOnlyTensor, a subclass that raises ReadOnlyView on every in-place operation and
hands out numpy arrays of the same memory read-only; it knows segment memory by
address (the read-only mappings of the segment and the private mappings of tensor
views that client/views.py registers here). A view type whose package is missing
raises MissingExtra naming the pip extra (``require``).
Must never: import torch or pyarrow unless the caller used them, or return a view
through which a write reaches a sealed object's bytes (a tensor view's memory is a
private copy-on-write mapping, client/views.py).
"""

import bisect
import sys
import warnings

import numpy as np

from kvstore.errors import InvalidValue, MissingExtra, ReadOnlyView

# [lo, hi) address ranges of read-only segment mappings, for ReadOnlyTensor (a few: one
# per store this process attached to; kept after close, views may outlive the client)
_READONLY_RANGES = []
# the private mappings of tensor views (client/views.py): sorted start addresses, and
# start -> (end, token); registered at the mapping, removed when it is unmapped
_VIEW_STARTS = []
_VIEW_RANGES = {}

#: package -> the pip extra that installs it (setup.py's extras_require)
_EXTRAS = {"torch": "torch", "pyarrow": "arrow"}


def register_readonly_range(lo, hi):
    _READONLY_RANGES.append((lo, hi))


def unregister_readonly_range(lo, hi):
    try:
        _READONLY_RANGES.remove((lo, hi))
    except ValueError:
        pass


def register_view_range(lo, hi, token):
    _VIEW_RANGES[lo] = (hi, token)
    bisect.insort(_VIEW_STARTS, lo)


def unregister_view_range(lo, token):
    got = _VIEW_RANGES.get(lo)
    if got is None or got[1] is not token:
        return                               # already replaced by a newer mapping there
    del _VIEW_RANGES[lo]
    i = bisect.bisect_left(_VIEW_STARTS, lo)
    if i < len(_VIEW_STARTS) and _VIEW_STARTS[i] == lo:
        del _VIEW_STARTS[i]


def _in_readonly(ptr):
    for lo, hi in _READONLY_RANGES:
        if lo <= ptr < hi:
            return True
    i = bisect.bisect_right(_VIEW_STARTS, ptr) - 1
    if i < 0:
        return False
    got = _VIEW_RANGES.get(_VIEW_STARTS[i])
    return got is not None and ptr < got[0]


def require(package, what):
    """Import package for the call ``what``; MissingExtra naming the pip extra if it is
    not installed."""
    try:
        return __import__(package)
    except ImportError as e:
        extra = _EXTRAS[package]
        raise MissingExtra(f"{what} needs {package}, which is not installed ({e}); "
                           f"pip install 'kvstore[{extra}]'") from None


def as_bytes_view(data):
    """A flat, C-contiguous, format 'B' memoryview of data (copying only if data is not contiguous)."""
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data)
        return memoryview(arr.reshape(-1).view(np.uint8))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        if t.numel() == 0:
            return memoryview(b"")
        return memoryview(t.view(torch.uint8).numpy())
    try:
        mv = memoryview(data)
    except TypeError:
        raise InvalidValue(f"cannot store a {type(data).__name__}; pass bytes, bytearray, memoryview, "
                           f"a numpy array, a torch tensor or a pyarrow Buffer") from None
    if mv.format == "B" and mv.ndim == 1 and mv.c_contiguous:
        return mv
    if not mv.c_contiguous:
        return memoryview(np.ascontiguousarray(np.asarray(mv)).reshape(-1).view(np.uint8))
    return mv.cast("B")


def _shape_of(n_items, shape, what):
    if shape is None:
        return (n_items,)
    shape = tuple(int(s) for s in shape)
    want = 1
    for s in shape:
        want *= s
    if want != n_items:
        raise InvalidValue(f"{what}: shape {shape} holds {want} items, the object holds {n_items}")
    return shape


def to_numpy(view, dtype=np.uint8, shape=None):
    dtype = np.dtype(dtype)
    if view.nbytes % dtype.itemsize:
        raise InvalidValue(f"object of {view.nbytes} bytes is not a whole number of {dtype} items")
    arr = np.frombuffer(view, dtype=dtype)
    return arr.reshape(_shape_of(arr.size, shape, "get_array"))


def to_arrow(view):
    pyarrow = require("pyarrow", "get_buffer")
    return pyarrow.py_buffer(view)


def to_tensor(view, dtype=None, shape=None):
    torch = require("torch", "get_tensor")
    dtype = torch.uint8 if dtype is None else dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    if view.nbytes % itemsize:
        raise InvalidValue(f"object of {view.nbytes} bytes is not a whole number of {dtype} items")
    n = view.nbytes // itemsize
    shape = _shape_of(n, shape, "get_tensor")
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "non-writable buffer": ReadOnlyTensor guards writes
        t = torch.frombuffer(view, dtype=dtype).reshape(shape)
    return t.as_subclass(_readonly_tensor_class())


_RO_CLASS = None
_ALLOWED_UNDERSCORE = {"requires_grad_", "retain_grad"}
_BLOCKED = {"__setitem__", "set_", "untyped_storage", "storage", "_typed_storage", "share_memory_"}


def _readonly_tensor_class():
    global _RO_CLASS
    if _RO_CLASS is not None:
        return _RO_CLASS
    import torch

    class ReadOnlyTensor(torch.Tensor):
        """A tensor viewing a sealed object. In-place operations raise ReadOnlyView;
        results that own new memory are plain tensors, views of the segment stay read-only."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "") or ""
            target = args[0] if args else None
            inplace = (name in _BLOCKED
                       or (name.endswith("_") and not name.endswith("__") and name not in _ALLOWED_UNDERSCORE)
                       or (name.startswith("__i") and name.endswith("__") and name not in ("__init__", "__index__", "__int__", "__invert__", "__iter__")))
            if inplace and isinstance(target, ReadOnlyTensor):
                raise ReadOnlyView(f"{name} would write into a sealed object, which is immutable; "
                                   f"copy it first (t.clone()) and write to the copy")
            out = kwargs.get("out")
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(o, ReadOnlyTensor) for o in outs):
                raise ReadOnlyView("out= names a view of a sealed object, which is immutable; "
                                   "give a tensor of your own as out")
            with torch._C.DisableTorchFunctionSubclass():
                ret = func(*args, **kwargs)
            return _wrap(ret)

    def _wrap(ret):
        if isinstance(ret, torch.Tensor):
            if type(ret) is torch.Tensor and ret.device.type == "cpu" and _in_readonly(ret.data_ptr()):
                return ret.as_subclass(ReadOnlyTensor)
            return ret
        if isinstance(ret, np.ndarray):
            if _in_readonly(ret.ctypes.data):
                ret.flags.writeable = False
            return ret
        if type(ret) in (tuple, list):
            return type(ret)(_wrap(r) for r in ret)
        return ret

    _RO_CLASS = ReadOnlyTensor
    return ReadOnlyTensor
