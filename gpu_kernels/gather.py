"""Copy chosen pages of single KV heads from the host tier into the device pool, where the
choice is a device tensor the host never reads.

``gather_head_pages`` copies, for every entry ``(h, j)`` with ``valid[h, j]``, K and V of KV
head ``h`` of host page ``src[h, j]`` into that head of pool page ``dst[h, j]``. On CUDA a
Triton kernel reads the host tier directly through its pinned, device-mapped memory
(zero-copy over PCIe; every pinned allocation is mapped into the device's address space
under unified virtual addressing), one program per entry, and programs of invalid entries
return at once: the launch has a fixed size and nothing is synchronised. On the CPU the
valid entries are copied with index ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _gather_kernel(
    host_ptr, pool_ptr, src_ptr, dst_ptr, valid_ptr,
    K, s_hkv, s_hh, s_hslot, s_pkv, s_ph, s_pslot,
    PS: tl.constexpr, D: tl.constexpr,
):
    e = tl.program_id(0)  # entry: head h = e // K
    kv = tl.program_id(1)  # 0: K, 1: V
    if tl.load(valid_ptr + e) != 0:
        h = e // K
        src = tl.load(src_ptr + e).to(tl.int64)
        dst = tl.load(dst_ptr + e).to(tl.int64)
        t = tl.arange(0, PS)[:, None]
        d = tl.arange(0, D)[None, :]
        rows = host_ptr + kv * s_hkv + h * s_hh + (src * PS + t) * s_hslot + d
        tl.store(pool_ptr + kv * s_pkv + h * s_ph + (dst * PS + t) * s_pslot + d, tl.load(rows))


def _check(host: Tensor, pool: Tensor, src: Tensor, dst: Tensor, valid: Tensor, page_size: int) -> None:
    name = "gather_head_pages"
    if host.dim() != 4 or pool.dim() != 4 or host.shape[:2] != pool.shape[:2] or host.shape[3] != pool.shape[3]:
        raise ValueError(f"{name}: host and pool must be [2, Hkv, slots, D] alike, got "
                         f"{tuple(host.shape)}, {tuple(pool.shape)}")
    if host.dtype != pool.dtype:
        raise ValueError(f"{name}: host {host.dtype} and pool {pool.dtype} differ")
    if not (src.shape == dst.shape == valid.shape) or src.dim() != 2 or src.shape[0] != host.shape[1]:
        raise ValueError(f"{name}: src, dst, valid must be [Hkv, k], got {tuple(src.shape)}, "
                         f"{tuple(dst.shape)}, {tuple(valid.shape)}")
    if host.shape[2] % page_size or pool.shape[2] % page_size:
        raise ValueError(f"{name}: slots must be whole pages of {page_size}")


def _gather_triton(host: Tensor, pool: Tensor, src: Tensor, dst: Tensor, valid: Tensor, page_size: int) -> None:
    hkv, k = src.shape
    if host.stride(3) != 1 or pool.stride(3) != 1:
        raise ValueError("gather_head_pages: host and pool rows must be contiguous")
    _gather_kernel[(hkv * k, 2)](
        host, pool, src.contiguous(), dst.contiguous(), valid.contiguous().to(torch.int8),
        k, host.stride(0), host.stride(1), host.stride(2), pool.stride(0), pool.stride(1), pool.stride(2),
        PS=page_size, D=host.shape[3],
    )


def gather_head_pages(host: Tensor, pool: Tensor, src: Tensor, dst: Tensor, valid: Tensor,
                      page_size: int) -> None:
    """Copy host pages into pool pages, one KV head at a time.

    Parameters
    ----------
    host : [2, Hkv, n_host_slots, D] one layer's host tier (K, V); on CUDA pinned memory.
    pool : [2, Hkv, n_pool_slots, D] the device pool, same dtype.
    src, dst : int64 [Hkv, k] page indices into ``host`` and ``pool``; entry ``(h, j)`` copies
        page ``src[h, j]`` of head ``h`` to page ``dst[h, j]`` of head ``h``.
    valid : bool [Hkv, k]: which entries to copy. All three on ``pool``'s device.
    page_size : slots per page.
    """
    _check(host, pool, src, dst, valid, page_size)
    if pool.is_cuda:
        _gather_triton(host, pool, src, dst, valid, page_size)
        return
    heads, j = valid.nonzero(as_tuple=True)  # CPU tensors: nothing to synchronise
    t = torch.arange(page_size)
    src_slots = (src[heads, j][:, None] * page_size + t).flatten()
    dst_slots = (dst[heads, j][:, None] * page_size + t).flatten()
    rows = heads.repeat_interleave(page_size)
    pool[:, rows, dst_slots] = host[:, rows, src_slots]

