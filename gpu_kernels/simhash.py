"""SimHash codes for MagicPIG's hash tables: K sign bits per table, L tables, packed in uint16.

``h = (x - center) @ R`` with ``R`` of shape ``[D, K*L]``; table ``j``'s code of a row is
``sum(b in 0..K-1) [h[j*K + b] > 0] << b`` (a projection of exactly 0 gives bit 0). This is
the packing of ``cpu_kernels.lsh``, whose tables the codes index: the device hashes the
queries (and, at prefill, the keys) and a CPU worker probes with the codes.

On CUDA one Triton program hashes a block of rows for a group of tables; on CPU the
projection is a chunked torch matmul.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["simhash_codes"]

MAX_K = 16  # codes are uint16
_ROWS_PER_CHUNK = 4096  # rows per matmul on the CPU path (bounds the [rows, K*L] buffer)


@triton.jit
def _simhash_kernel(
    x_ptr, r_ptr, c_ptr, codes_ptr,
    N, D, L, TABLES_PER_PROGRAM,
    stride_xn, stride_xd, stride_rd, stride_rc, stride_cn, stride_cl,
    K: tl.constexpr, HAS_CENTER: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (i, t): rows [i*BLOCK_N, (i+1)*BLOCK_N) of x, tables [t*T, (t+1)*T) (T = TABLES_PER_PROGRAM).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = rows < N
    mask_d = offs_d < D
    mask_k = offs_k < K
    x = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if HAS_CENTER:
        x -= tl.load(c_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    bit = tl.where(mask_k, 1 << offs_k, 0)
    first = tl.program_id(1) * TABLES_PER_PROGRAM
    for j in range(first, tl.minimum(first + TABLES_PER_PROGRAM, L)):
        r = tl.load(r_ptr + offs_d[:, None] * stride_rd + (j * K + offs_k)[None, :] * stride_rc,
                    mask=mask_d[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        h = tl.dot(x, r, input_precision="ieee")  # [BLOCK_N, BLOCK_K]
        code = tl.sum(tl.where(h > 0.0, bit[None, :], 0), axis=1)
        tl.store(codes_ptr + rows * stride_cn + j * stride_cl, code.to(tl.uint16), mask=mask_n)


def _simhash_triton(
    x: Tensor, r: Tensor, k: int, l: int, center: Tensor | None, tables_per_program: int = 8
) -> Tensor:
    """Triton path of ``simhash_codes`` for x [N, D] on any device the kernel runs on.

    Programs split rows into blocks and the L tables into groups of ``tables_per_program``,
    so that a handful of query rows still spreads over many programs.
    """
    n, d = x.shape
    codes = torch.empty((n, l), dtype=torch.uint16, device=x.device)
    block_n = 64 if n >= 64 else 16
    if n > 0:
        _simhash_kernel[(triton.cdiv(n, block_n), triton.cdiv(l, tables_per_program))](
            x, r, x if center is None else center, codes, n, d, l, tables_per_program,
            *x.stride(), *r.stride(), *codes.stride(),
            K=k, HAS_CENTER=center is not None, BLOCK_N=block_n,
            BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_K=max(16, triton.next_power_of_2(k)),
        )
    return codes


def _simhash_torch(x: Tensor, r: Tensor, k: int, l: int, center: Tensor | None) -> Tensor:
    """CPU path of ``simhash_codes`` for x [N, D]: chunked matmul, then the sign bits packed."""
    n = x.shape[0]
    # Packing as a matmul with the bit weights: sums of distinct powers of two below 2**16
    # are exact in float32, and this is far faster than an integer multiply-and-sum.
    bit = (1 << torch.arange(k, device=x.device)).float()
    codes = torch.empty((n, l), dtype=torch.uint16, device=x.device)
    for s in range(0, n, _ROWS_PER_CHUNK):
        rows = x[s:s + _ROWS_PER_CHUNK].float()
        if center is not None:
            rows = rows - center.float()
        h = (rows @ r.float()).view(-1, l, k)
        codes[s:s + _ROWS_PER_CHUNK] = ((h > 0).float() @ bit).to(torch.int32).to(torch.uint16)
    return codes


def simhash_codes(x: Tensor, r: Tensor, k: int, l: int, center: Tensor | None = None) -> Tensor:
    """SimHash codes of the rows of ``x - center``: K sign bits for each of L tables.

    Parameters
    ----------
    x : [..., N, D] float (queries ``[Hq, D]`` give one code row per head; keys ``[Hkv, n, D]``).
    r : [D, K*L] float, the random Gaussian projection (the same one the CPU tables used).
    k : bits per table, 0..16; l : number of tables, >= 1.
    center : [..., D] float or None; subtracted from the rows of ``x`` before projecting (the
        mean of the offloaded keys, per KV head, when hashing keys; None for queries).

    Returns
    -------
    codes : [..., N, L] torch.uint16; bit ``b`` of ``codes[..., j]`` is ``h[..., j*K + b] > 0``.
    """
    if not 0 <= k <= MAX_K:
        raise ValueError(f"k (bits per table) must be in [0, {MAX_K}] for uint16 codes, got {k}")
    if l < 1:
        raise ValueError(f"l (tables) must be >= 1, got {l}")
    if x.dim() < 1 or r.shape != (x.shape[-1], k * l):
        raise ValueError(f"x must be [..., D] and r [D, K*L] = [{x.shape[-1] if x.dim() else '?'}, {k * l}]; "
                         f"got {tuple(x.shape)}, {tuple(r.shape)}")
    if not (x.is_floating_point() and r.is_floating_point()):
        raise TypeError(f"x and r must be floating point, got {x.dtype}, {r.dtype}")
    if r.device != x.device:
        raise ValueError(f"x is on {x.device}, r on {r.device}")
    lead, d = x.shape[:-1], x.shape[-1]
    if center is not None:
        if x.dim() < 2 or tuple(center.shape) != (*x.shape[:-2], d):
            raise ValueError(f"center must be [..., D] matching x [..., N, D]; got {tuple(center.shape)} "
                             f"for x {tuple(x.shape)}")
        if center.device != x.device:
            raise ValueError(f"center is on {center.device}, x on {x.device}")
    if k == 0:
        return torch.zeros((*lead, l), dtype=torch.uint16, device=x.device)
    path = _simhash_triton if x.is_cuda else _simhash_torch
    if center is None:
        return path(x.reshape(-1, d), r, k, l, None).view(*lead, l)
    # One centre per leading index (per KV head): one call each.
    groups = math.prod(x.shape[:-2])
    xg, cg = x.reshape(groups, x.shape[-2], d), center.reshape(groups, d)
    codes = torch.empty((groups, x.shape[-2], l), dtype=torch.uint16, device=x.device)
    for i in range(groups):
        codes[i] = path(xg[i], r, k, l, cg[i].contiguous())
    return codes.view(*lead, l)
