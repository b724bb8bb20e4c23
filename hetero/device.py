"""The one device abstraction: where tensors live and what crosses the host-device link.

Every KV copy between host and device goes through :class:`Device`, which counts the bytes.
On a CPU-only machine the "device" is CPU memory too, but the counters still tell what would
cross PCIe on a GPU, so the same code and tests hold. CUDA-only details (the copy stream,
its events, pinned host memory, non-blocking copies) stay in this module.
"""

from __future__ import annotations

import re

import psutil
import torch
from torch import Tensor

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``64MiB``, ``2GiB``, ``1.5GB`` or a plain integer."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.match(str(size))
        if m is None:
            raise ValueError(f"cannot read size {size!r}: use bytes or a unit, e.g. 64MiB, 2GiB")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available: use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use 'auto', 'cpu' or 'cuda'")
    return dev


def default_kv_budget(device: torch.device) -> int:
    """Device KV budget when none is given: 80% of free GPU memory, or 25% of host RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    return psutil.virtual_memory().total // 4


def check_kv_budget(budget: int, device: torch.device) -> None:
    """Raise ValueError if the device (a GPU's memory, or the host RAM for the CPU) could
    never hold ``budget`` bytes of KV."""
    if device.type == "cuda":
        total, where = torch.cuda.get_device_properties(device).total_memory, f"{device} has"
    else:
        total, where = psutil.virtual_memory().total, "this machine has"
    if budget > total:
        raise ValueError(f"device_kv_budget {format_size(budget)} is more than the "
                         f"{format_size(total)} of memory {where}: give a smaller budget, e.g. "
                         f"{format_size(total // 4)}, or leave it unset for a default share")


class Counter:
    """A cumulative count that work on the device can add to without the host waiting: a
    count known only on the device (0-dim tensor) is summed there and read back when the
    total is read (at a request's end, never inside a decode step)."""

    __slots__ = ("_host", "_device")

    def __init__(self):
        self._host, self._device = 0, None

    def add(self, n: int | Tensor) -> None:
        if isinstance(n, Tensor):
            self._device = n.to(torch.int64) if self._device is None else self._device + n
        else:
            self._host += n

    @property
    def value(self) -> int:
        return self._host + (0 if self._device is None else int(self._device))


class Traffic:
    """Bytes moved between host and device (cumulative)."""

    __slots__ = ("h2d", "d2h")

    def __init__(self):
        self.h2d, self.d2h = Counter(), Counter()

    @property
    def h2d_bytes(self) -> int:
        return self.h2d.value

    @property
    def d2h_bytes(self) -> int:
        return self.d2h.value


class Device:
    """A compute device and its host: allocation and counted copies between the two.

    On CUDA every copy between the tiers runs on one copy stream owned here, so copies
    overlap the compute stream's kernels:

    - device→host (:meth:`to_host`) lands in pinned host memory asynchronously; the copy
      stream first waits for the compute stream (the source is written there) and an event
      is recorded after it. A CPU reader of the destination calls :meth:`host_sync` first
      (:meth:`host_gather` does), never reading a copy that has not landed.
    - host→device (:meth:`to_device`) copies from pinned memory (:meth:`host_gather`
      gathers into it) on the copy stream, and the compute stream waits for the copy
      before anything reads the destination.

    On the CPU both are plain copies. Either way the byte counters say what crosses the
    link.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.traffic = Traffic()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._landed: torch.cuda.Event | None = None  # after the last device→host copy

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Host memory; pinned when a GPU is present so copies can be asynchronous."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.is_cuda)

    def tensor(self, data, dtype: torch.dtype) -> Tensor:
        """A device tensor of host ``data`` (nested lists of numbers, or a CPU tensor) whose
        copy the host does not wait for: on CUDA it is staged in pinned memory and copied
        without blocking on the compute stream (``torch.tensor(data, device="cuda")`` would
        synchronise with the stream). Small metadata (page tables, slots, positions), not
        counted as KV traffic."""
        t = data.to(dtype) if isinstance(data, Tensor) else torch.tensor(data, dtype=dtype)
        if self._stream is None:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def to_host(self, dst: Tensor, src: Tensor, index: Tensor | None = None) -> None:
        """Copy device ``src`` into host ``dst`` (at indices ``index`` of dim 1) and count it.

        On CUDA ``dst`` must be pinned and the copy is asynchronous: call :meth:`host_sync`
        before the CPU reads ``dst``.
        """
        self.traffic.d2h.add(src.numel() * src.element_size())
        if self._stream is None:
            _put(dst, src, index)
            return
        assert dst.is_pinned(), "asynchronous device→host copies need pinned host memory"
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)  # src is written on the compute stream
        src.record_stream(self._stream)  # and must outlive the copy
        with torch.cuda.stream(self._stream):
            # One copy per contiguous run of dst: a non-contiguous destination would go
            # through a pageable temporary that the CPU reads before the copy lands.
            for d, s in _contiguous_pairs(dst, src, index):
                d.copy_(s, non_blocking=True)
            self._landed = torch.cuda.Event()
            self._landed.record(self._stream)

    def host_sync(self) -> None:
        """Wait until every device→host copy issued so far has landed (no-op on the CPU)."""
        if self._landed is not None:
            self._landed.synchronize()

    def copy_event(self) -> CopyEvent:
        """The device→host copies issued so far, for a CPU reader on another thread (or a
        sender about to ship the data) to wait for with ``wait()``: the caller does not wait
        as with :meth:`host_sync`. A no-op on the CPU."""
        return CopyEvent(self._landed)

    def wait_host_copies(self) -> None:
        """Make the compute stream wait (on the device, the host does not) for the
        device→host copies issued so far, before a kernel reads host memory directly."""
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def host_gather(self, src: Tensor, dim: int, index: Tensor) -> Tensor:
        """``src.index_select(dim, index)`` of a host tensor (by the CPU), into pinned memory
        on CUDA, after the device→host copies into ``src`` have landed."""
        if self._stream is None:
            return src.index_select(dim, index)
        self.host_sync()
        shape = list(src.shape)
        shape[dim] = index.numel()
        out = torch.empty(shape, dtype=src.dtype, pin_memory=True)
        return torch.index_select(src, dim, index, out=out)

    def to_device(self, dst: Tensor, src: Tensor, index: Tensor | None = None) -> None:
        """Copy host ``src`` into device ``dst`` (at indices ``index`` of dim 1) and count it.

        On CUDA the copy runs on the copy stream from pinned memory (``src`` is staged into
        pinned memory first if it is not) and the compute stream waits for it: work queued
        on the compute stream afterwards sees ``dst`` written.
        """
        self.traffic.h2d.add(src.numel() * src.element_size())
        if self._stream is None:
            _put(dst, src, index)
            return
        if not (src.is_pinned() and src.is_contiguous()):
            self.host_sync()
            src = torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
        compute = torch.cuda.current_stream(self.device)
        # staged on the compute stream: the copy stream waits for what is queued there, so
        # no kernel still reads the memory it reuses
        staged = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            staged.copy_(src, non_blocking=True)  # the pinned block is held until it lands
        compute.wait_stream(self._stream)
        _put(dst, staged, index)


class CopyEvent:
    """:meth:`Device.copy_event`: ``wait()`` blocks until the copies it stands for have
    landed (a CUDA event's ``synchronize``; nothing to wait for on the CPU)."""

    __slots__ = ("_event",)

    def __init__(self, event: torch.cuda.Event | None):
        self._event = event

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


def _put(dst: Tensor, src: Tensor, index: Tensor | None) -> None:
    """``dst = src``, or ``dst[:, index] = src``, on ``dst``'s device (and stream)."""
    if index is None:
        dst.copy_(src)
    else:
        if dst.is_cuda and not index.is_cuda:
            index = index.pin_memory()  # a copy from pageable memory would wait for the stream
        dst.index_copy_(1, index.to(dst.device, non_blocking=True), src)


def _contiguous_pairs(dst: Tensor, src: Tensor, index: Tensor | None) -> list[tuple[Tensor, Tensor]]:
    """``(dst part, src part)`` pairs covering ``dst[:, index] = src`` (or ``dst = src``),
    each part of ``dst`` contiguous: per leading row and per run of consecutive indices."""
    if index is None:
        if dst.is_contiguous():
            return [(dst, src)]
        return [(d, s) for i in range(dst.shape[0]) for d, s in _contiguous_pairs(dst[i], src[i], None)]
    ids = index.tolist()  # a host tensor: no synchronisation
    runs, first = [], 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or ids[j] != ids[j - 1] + 1:
            runs.append((ids[first], first, j - first))
            first = j
    return [(dst[i, a : a + n], src[i, s : s + n]) for i in range(dst.shape[0]) for a, s, n in runs]
