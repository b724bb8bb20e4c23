"""The one device abstraction: where tensors live and what crosses the host-device link.

Every KV copy between host and device goes through :class:`Device`, which counts the bytes.
On a CPU-only machine the "device" is CPU memory too, but the counters still tell what would
cross PCIe on a GPU, so the same code and tests hold. CUDA-only details (pinned host memory,
non-blocking copies) stay in this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


@dataclass(slots=True)
class Traffic:
    """Bytes moved between host and device (cumulative)."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0


class Device:
    """A compute device and its host: allocation and counted copies between the two."""

    def __init__(self, device: torch.device):
        self.device = device
        self.traffic = Traffic()

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Host memory; pinned when a GPU is present so copies can be asynchronous."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.is_cuda)

    def to_device(self, dst: Tensor, src: Tensor, index: Tensor | None = None) -> None:
        """Copy host ``src`` into device ``dst`` (at slots ``index`` of dim 1) and count it."""
        self._copy(dst, src, index)
        self.traffic.h2d_bytes += src.numel() * src.element_size()

    def to_host(self, dst: Tensor, src: Tensor, index: Tensor | None = None) -> None:
        """Copy device ``src`` into host ``dst`` (at slots ``index`` of dim 1) and count it."""
        self._copy(dst, src, index)
        self.traffic.d2h_bytes += src.numel() * src.element_size()

    def _copy(self, dst: Tensor, src: Tensor, index: Tensor | None) -> None:
        if index is None:
            dst.copy_(src, non_blocking=self.is_cuda)
        else:
            dst.index_copy_(1, index.to(dst.device), src.to(dst.device, non_blocking=self.is_cuda))
