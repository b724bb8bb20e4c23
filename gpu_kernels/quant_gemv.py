"""``x @ W.T`` over block-quantised weights (``cpu_kernels.quant``'s layout) on the device.

``W`` is held as ``q`` int8 [rows, cols] (one code per weight) and ``d``, ``m`` float32
[rows, cols / 32] (scale and offset per block of 32 along a row): ``W = d * q + m``. At decode
the product is a GEMV over a few rows of ``x`` whose cost is reading the weight: the int8 codes
are 1 byte per weight (plus 8 bytes per block of 32) against fp32's 4 and bf16's 2.

On CUDA one Triton program computes a block of ``BLOCK_R`` output rows for up to 8 rows of
``x``: it loops over the columns in tiles of ``32 * KB``, dequantises the codes to fp32 in
registers once per tile and accumulates the fp32 dot products of every row of ``x`` with them,
so the weight is read once per 8 rows of ``x``. Off CUDA the product is a torch reference:
the weight dequantised to fp32, then ``x.float() @ W.T``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["dequantize", "quant_linear"]

BLOCK = 32  # weights per quantisation block (cpu_kernels.quant.BLOCK)
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_N = 8  # rows of x per program: the weight is read once per this many rows


@triton.jit
def _quant_gemv_kernel(
    x_ptr, q_ptr, d_ptr, m_ptr, out_ptr,
    N, ROWS, NB,
    s_xn, s_qr, s_dr, s_on,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, KB: tl.constexpr, QB: tl.constexpr,
):
    # Program (i, j): output rows [i*BLOCK_R, (i+1)*BLOCK_R) for rows [j*BLOCK_N, (j+1)*BLOCK_N)
    # of x. A column tile is KB blocks of QB (= 32) weights, held as [BLOCK_R, KB, QB].
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n0 = tl.program_id(1) * BLOCK_N
    ni = tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, KB)
    offs_j = tl.arange(0, QB)
    mask_r = r < ROWS
    r64 = r.to(tl.int64)  # rows * cols may pass 2**31 (a large vocabulary's LM head)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, NB, KB):
        blk = b0 + offs_b  # [KB] block indices along the row
        mask_b = blk < NB
        mask_rb = mask_r[:, None] & mask_b[None, :]  # [BLOCK_R, KB]
        offs_d = r64[:, None] * s_dr + blk[None, :]
        d = tl.load(d_ptr + offs_d, mask=mask_rb, other=0.0)
        m = tl.load(m_ptr + offs_d, mask=mask_rb, other=0.0)
        col = blk[:, None] * QB + offs_j[None, :]  # [KB, QB] column indices
        q = tl.load(q_ptr + r64[:, None, None] * s_qr + col[None, :, :], mask=mask_rb[:, :, None], other=0)
        w = q.to(tl.float32) * d[:, :, None] + m[:, :, None]  # [BLOCK_R, KB, QB], dequantised
        for i in tl.static_range(BLOCK_N):
            # Rows of x past N load row N-1 again (their sums are not stored): no scalar mask.
            x_row = tl.minimum(n0 + i, N - 1)
            x = tl.load(x_ptr + x_row * s_xn + col, mask=mask_b[:, None], other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(w * x[None, :, :], axis=2), axis=1)  # [BLOCK_R]
            acc = tl.where(ni[None, :] == i, acc + part[:, None], acc)
    mask_out = mask_r[:, None] & (n0 + ni < N)[None, :]
    tl.store(out_ptr + (n0 + ni)[None, :] * s_on + r[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=mask_out)


def _check(x: Tensor, q: Tensor, d: Tensor, m: Tensor) -> None:
    if x.dim() != 2 or q.dim() != 2:
        raise ValueError(f"quant_linear: x must be [n, cols] and q [rows, cols], got "
                         f"{tuple(x.shape)}, {tuple(q.shape)}")
    rows, cols = q.shape
    if cols % BLOCK:
        raise ValueError(f"quant_linear: cols must be a multiple of {BLOCK}, got {cols}")
    if x.shape[1] != cols:
        raise ValueError(f"quant_linear: x has {x.shape[1]} columns, the weight {cols}")
    if d.shape != (rows, cols // BLOCK) or m.shape != (rows, cols // BLOCK):
        raise ValueError(f"quant_linear: d and m must be [rows, cols / {BLOCK}] = "
                         f"{(rows, cols // BLOCK)}, got {tuple(d.shape)}, {tuple(m.shape)}")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"quant_linear: x must be float32, bfloat16 or float16, got {x.dtype}")
    if q.dtype != torch.int8:
        raise ValueError(f"quant_linear: q must be int8, got {q.dtype}")
    if d.dtype != torch.float32 or m.dtype != torch.float32:
        raise ValueError(f"quant_linear: d and m must be float32, got {d.dtype}, {m.dtype}")
    if not x.device == q.device == d.device == m.device:
        raise ValueError(f"quant_linear: x, q, d, m must be on one device, got {x.device}, "
                         f"{q.device}, {d.device}, {m.device}")


def _quant_gemv_triton(x: Tensor, q: Tensor, d: Tensor, m: Tensor, block_r: int = 16,
                       blocks_per_tile: int = 4, num_warps: int = 4) -> Tensor:
    """Triton path of ``quant_linear`` on any device the kernel runs on (CUDA, or CPU tensors
    under the interpreter). ``block_r`` output rows per program, column tiles of
    ``32 * blocks_per_tile`` (both powers of two)."""
    n, rows = x.shape[0], q.shape[0]
    x, q, d, m = x.contiguous(), q.contiguous(), d.contiguous(), m.contiguous()
    out = torch.empty((n, rows), dtype=x.dtype, device=x.device)
    block_n = min(_MAX_N, triton.next_power_of_2(max(n, 1)))
    if n > 0 and rows > 0:
        grid = (triton.cdiv(rows, block_r), triton.cdiv(n, block_n))
        _quant_gemv_kernel[grid](
            x, q, d, m, out, n, rows, d.shape[1],
            x.stride(0), q.stride(0), d.stride(0), out.stride(0),
            BLOCK_N=block_n, BLOCK_R=block_r, KB=blocks_per_tile, QB=BLOCK, num_warps=num_warps,
        )
    return out


def dequantize(q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """The weight float32 [rows, cols]: ``d * q + m`` per block of 32, on the codes' device
    (``cpu_kernels.quant.QuantBlocks.dequantize`` in numpy)."""
    rows, cols = q.shape
    w = q.view(rows, -1, BLOCK).float() * d[..., None] + m[..., None]
    return w.view(rows, cols)


def _quant_gemv_torch(x: Tensor, q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Torch path of ``quant_linear``: the weight dequantised to fp32, then an fp32 matmul."""
    return (x.float() @ dequantize(q, d, m).T).to(x.dtype)


def quant_linear(x: Tensor, q: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """``x @ W.T`` for a block-quantised weight ``W = d * q + m`` (per block of 32 along a row).

    Parameters
    ----------
    x : [n, cols] float32, bfloat16 or float16 (n is 1-8 at decode; any n works).
    q : [rows, cols] int8, one code per weight; cols is a multiple of 32.
    d, m : [rows, cols / 32] float32, each block's scale and offset.
        All four on one device.

    Returns
    -------
    out : [n, rows] in x's dtype, computed in fp32: a Triton dequant-GEMV on CUDA, the
        dequantised weight and a torch matmul elsewhere.
    """
    _check(x, q, d, m)
    if x.is_cuda:
        return _quant_gemv_triton(x, q, d, m)
    return _quant_gemv_torch(x, q, d, m)
