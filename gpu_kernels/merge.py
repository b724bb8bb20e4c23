"""Exact merge of partial attention results by their log-sum-exp (the project's one merge).

Partials over disjoint key sets combine exactly::

    lse = logaddexp(lse_1, ..., lse_n)
    out = sum_i out_i * exp(lse_i - lse)

A partial over an empty key set has ``lse = -inf`` and contributes nothing; if every partial
is empty the result is ``out = 0, lse = -inf`` (never NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["merge_partials"]


@triton.jit
def _merge_kernel(
    outs_ptr, lses_ptr, out_ptr, lse_ptr,
    N, R, D,
    BLOCK_D: tl.constexpr,
):
    # One program per row r: outs [N, R, D], lses [N, R] (contiguous) -> out [R, D], lse [R].
    r = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    # Loop-carried values start from partial 0 (N >= 1), so they are typed tensors throughout.
    m = tl.load(lses_ptr + r)
    for n in range(1, N):
        m = tl.maximum(m, tl.load(lses_ptr + n * R + r))
    # All partials empty: shift by 0 so exp(-inf - 0) = 0 instead of exp(nan).
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    s = tl.exp(tl.load(lses_ptr + r) - m_safe)
    acc = s * tl.load(outs_ptr + r * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for n in range(1, N):
        w = tl.exp(tl.load(lses_ptr + n * R + r) - m_safe)
        o = tl.load(outs_ptr + (n * R + r) * D + offs_d, mask=mask_d, other=0.0)
        acc += w * o.to(tl.float32)
        s += w
    s_safe = tl.where(s > 0.0, s, 1.0)
    out = acc / s_safe
    tl.store(out_ptr + r * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(lse_ptr + r, tl.where(s > 0.0, m_safe + tl.log(s_safe), float("-inf")))


def _merge_triton(outs: Tensor, lses: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge stacked partials with the Triton kernel (any device the kernel can run on).

    Parameters
    ----------
    outs : [N, ..., D] float tensor; lses : [N, ...] float tensor (natural log).
    out_dtype : dtype of the merged ``out``.

    Returns
    -------
    out : [..., D] ``out_dtype``; lse : [...] float32.
    """
    n, *batch, d = outs.shape
    outs_c = outs.reshape(n, -1, d).contiguous()
    lses_c = lses.reshape(n, -1).to(torch.float32).contiguous()
    r = outs_c.shape[1]
    out = torch.empty((r, d), dtype=out_dtype, device=outs.device)
    lse = torch.empty((r,), dtype=torch.float32, device=outs.device)
    if r > 0:
        _merge_kernel[(r,)](
            outs_c, lses_c, out, lse, n, r, d,
            BLOCK_D=max(16, triton.next_power_of_2(d)),
        )
    return out.reshape(*batch, d), lse.reshape(batch)


def _merge_torch(outs: list[Tensor], lses: list[Tensor], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Merge partials with torch ops (the CPU path); same contract as ``_merge_triton``."""
    lse_all = torch.stack(lses).to(torch.float32)
    m = lse_all.amax(dim=0).nan_to_num_(neginf=0.0)  # all empty: shift by 0, not by -inf
    w = (lse_all - m).exp_()
    s = w.sum(dim=0)
    lse = s.log().add_(m)
    w = w.div_(s).nan_to_num_(nan=0.0).unsqueeze(-1)  # 0/0 where every partial is empty
    out = outs[0] * w[0]  # float32 at least, by type promotion
    for i in range(1, len(outs)):
        out.addcmul_(outs[i], w[i])
    return out.to(out_dtype), lse


def merge_partials(*partials: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Merge partial attention results over disjoint key sets, exactly.

    Parameters
    ----------
    *partials : one or more ``(out, lse)`` pairs with identical shapes, on one device.
        ``out`` is ``[..., D]`` (any float dtype), ``lse`` is ``[...]`` float (natural log of
        the softmax denominator; ``-inf`` for an empty key set, whose ``out`` must be finite,
        e.g. 0: it is weighted by 0).

    Returns
    -------
    out : [..., D], dtype of the first partial's ``out``.
    lse : [...] float32; ``-inf`` (with ``out = 0``) where every partial is empty.

    Notes
    -----
    On CUDA the partials are stacked and merged by a Triton kernel (float32 arithmetic); on CPU
    by torch ops (float32 weights; float64 outputs are accumulated in float64). A single
    partial is returned as is (converted to the output dtypes if needed), not copied.
    """
    if not partials:
        raise ValueError("merge_partials needs at least one (out, lse) partial")
    for i, p in enumerate(partials):
        if not (isinstance(p, tuple | list) and len(p) == 2 and all(isinstance(t, Tensor) for t in p)):
            raise ValueError(f"partial {i} must be an (out, lse) pair of tensors, got {type(p).__name__}")
    out0, lse0 = partials[0]
    if out0.dim() < 1 or tuple(out0.shape[:-1]) != tuple(lse0.shape):
        raise ValueError(
            f"partial 0: out shape {tuple(out0.shape)} must be lse shape {tuple(lse0.shape)} + (D,)"
        )
    for i, (out, lse) in enumerate(partials):
        if out.shape != out0.shape or lse.shape != lse0.shape:
            raise ValueError(
                f"partial {i} has shapes out {tuple(out.shape)}, lse {tuple(lse.shape)}; "
                f"partial 0 has out {tuple(out0.shape)}, lse {tuple(lse0.shape)}"
            )
        if out.device != out0.device or lse.device != out0.device:
            raise ValueError(f"partial {i} is on {out.device}/{lse.device}, partial 0 on {out0.device}")
        if not (out.is_floating_point() and lse.is_floating_point()):
            raise ValueError(f"partial {i}: out and lse must be floating point, got {out.dtype}, {lse.dtype}")

    out_dtype = out0.dtype
    if len(partials) == 1:
        return out0.to(out_dtype), lse0.to(torch.float32)
    outs = [p[0] for p in partials]
    lses = [p[1] for p in partials]
    if out0.is_cuda:
        return _merge_triton(torch.stack(outs), torch.stack(lses), out_dtype)
    return _merge_torch(outs, lses, out_dtype)
