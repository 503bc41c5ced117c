"""Copies between torch tensors on an accelerator and the shared segment.

Owns: recognising device (CUDA) tensors among put()/read() arguments, registering the
segment's mappings with CUDA as pinned host memory (``cudaHostRegister``, once per
mapping, on the first device copy), and issuing the copies non-blocking so that a
batch of blocks overlaps on the copy engine and costs one synchronisation. A
registered mapping lets the GPU DMA straight into or out of the segment: one copy, no
bounce buffer. If registration is refused (old driver, locked-memory limit) the same
copies still run, through CUDA's own staging, and the log says so once.
CPU tensors take the same code: ``Tensor.copy_`` between the tensor and a tensor view
of the segment is a plain memcpy, so the engines' adapters have one path for both.
Must never: import torch unless the caller passed a tensor, return before the copies
it issued have completed (the caller seals or releases right after), or let a copy
into the segment happen for an object its caller has not created.
"""

import logging
import sys
import threading
import warnings

log = logging.getLogger("kvstore.client")

#: cudaHostRegister flags: the read-only mapping of sealed objects needs ReadOnly.
_REGISTER_DEFAULT, _REGISTER_READ_ONLY = 0, 8

_registered = {}        # (address, size) -> True (pinned) / False (refused)
_lock = threading.Lock()


def is_tensor(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_device_tensor(x):
    """A torch tensor that lives off the CPU (the copy must go through the device)."""
    return is_tensor(x) and x.device.type != "cpu"


def flat_bytes(t):
    """The tensor's bytes as a flat uint8 tensor (no copy); it must be contiguous."""
    import torch
    from kvstore.errors import InvalidValue
    if t.device.type == "meta":
        raise InvalidValue("a meta tensor has no data to copy")
    if not t.is_contiguous():
        raise InvalidValue("the tensor is not contiguous; pass t.contiguous()")
    try:
        return t.detach().reshape(-1).view(torch.uint8)
    except RuntimeError as e:        # e.g. a tensor without storage
        raise InvalidValue(f"cannot copy this tensor ({e})") from None


def _segment_tensor(view):
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # read-only buffers: we only read from them
        return torch.frombuffer(view, dtype=torch.uint8)


def pin_mapping(address, size, read_only):
    """Register [address, address+size) with CUDA as pinned memory, once. Returns
    whether it is pinned. Does nothing (False) without CUDA."""
    key = (address, size)
    got = _registered.get(key)
    if got is not None:
        return got
    with _lock:
        if key in _registered:
            return _registered[key]
        import torch
        ok = False
        if torch.cuda.is_available():
            flags = _REGISTER_READ_ONLY if read_only else _REGISTER_DEFAULT
            try:
                err = torch.cuda.cudart().cudaHostRegister(address, size, flags)
                ok = int(getattr(err, "value", err)) == 0
            except Exception as e:    # a refused registration only costs speed
                log.warning("could not pin the segment for GPU copies (%s); copies go through "
                            "CUDA's staging buffers", e)
            else:
                if not ok:
                    log.warning("cudaHostRegister of the segment failed (error %s); GPU copies go "
                                "through CUDA's staging buffers", err)
        _registered[key] = ok
        return ok


class CopyBatch:
    """Copies between tensors and segment views, issued together and completed by
    ``wait()``. Device copies are non-blocking on the tensor's current stream; CPU
    copies run at once."""

    def __init__(self, mapping_of):
        self._mapping_of = mapping_of    # view -> (base address, size, read_only) of its mapping
        self._streams = []

    def _pin_for(self, view):
        pin_mapping(*self._mapping_of(view))

    def to_segment(self, dst_view, tensor):
        src = flat_bytes(tensor)
        if src.numel() == 0:
            return
        dst = _segment_tensor(dst_view)
        if src.device.type != "cpu":
            self._pin_for(dst_view)
            self._note_stream(src.device)
        dst.copy_(src, non_blocking=src.device.type != "cpu")

    def from_segment(self, tensor, src_view):
        dst = flat_bytes(tensor)
        if src_view.nbytes == 0:
            return
        if dst.numel() < src_view.nbytes:
            from kvstore.errors import InvalidSize
            raise InvalidSize(f"the tensor holds {dst.numel()} bytes; the object has {src_view.nbytes}")
        src = _segment_tensor(src_view)
        if dst.device.type != "cpu":
            self._pin_for(src_view)
            self._note_stream(dst.device)
        dst[:src_view.nbytes].copy_(src, non_blocking=dst.device.type != "cpu")

    def _note_stream(self, device):
        import torch
        s = torch.cuda.current_stream(device)
        if all(s is not t for t in self._streams):
            self._streams.append(s)

    def wait(self):
        for s in self._streams:
            s.synchronize()
        self._streams.clear()

    def wait_quietly(self):
        """wait(), on an error path: errors of the copies themselves are not raised again."""
        try:
            self.wait()
        except Exception as e:       # the caller is already failing; it only must not free early
            log.warning("a device copy failed: %s", e)
            self._streams.clear()
