"""Quest page scoring: an upper bound of q·k over each page from its key min/max.

For a query q and a page whose keys lie channel-wise in [kmin, kmax], every key k of the
page satisfies ``q·k <= sum_d max(q_d * kmax_d, q_d * kmin_d)``. A KV head scores a page
by the max of this bound over the query heads of its GQA group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _quest_kernel(
    q_ptr, kmin_ptr, kmax_ptr, out_ptr, n_pages,
    s_qh, s_kh, s_kp, s_oh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    h = tl.program_id(0)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.arange(0, D)
    mask = p < n_pages
    offs = h * s_kh + p[:, None] * s_kp + d[None, :]
    kmin = tl.load(kmin_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
    kmax = tl.load(kmax_ptr + offs, mask=mask[:, None], other=0.0).to(tl.float32)
    best = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    for g in range(G):
        q = tl.load(q_ptr + (h * G + g) * s_qh + d).to(tl.float32)
        bound = tl.sum(tl.maximum(q[None, :] * kmax, q[None, :] * kmin), axis=1)
        best = tl.maximum(best, bound)
    tl.store(out_ptr + h * s_oh + p, best, mask=mask)


def _check(q: Tensor, kmin: Tensor, kmax: Tensor) -> None:
    if q.dim() != 2 or kmin.dim() != 3 or kmin.shape != kmax.shape:
        raise ValueError(
            f"quest_page_scores: q must be [Hq, D] and kmin, kmax [Hkv, P, D], got "
            f"{tuple(q.shape)}, {tuple(kmin.shape)}, {tuple(kmax.shape)}"
        )
    if kmin.shape[2] != q.shape[1] or q.shape[0] % kmin.shape[0]:
        raise ValueError(
            f"quest_page_scores: head_dim or GQA mismatch: q {tuple(q.shape)}, kmin {tuple(kmin.shape)}"
        )


def _quest_triton(q: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    hkv, n_pages, d = kmin.shape
    q, kmin, kmax = q.contiguous(), kmin.contiguous(), kmax.contiguous()
    out = torch.empty((hkv, n_pages), dtype=torch.float32, device=q.device)
    block = 64
    grid = (hkv, triton.cdiv(n_pages, block))
    _quest_kernel[grid](
        q, kmin, kmax, out, n_pages, q.stride(0), kmin.stride(0), kmin.stride(1), out.stride(0),
        G=q.shape[0] // hkv, D=d, BLOCK_P=block,
    )
    return out


def _quest_torch(q: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    # max(q*kmax, q*kmin) picks kmax where q > 0 and kmin where q < 0: two matmuls, the
    # second accumulated into the first. [G, D] @ [D, P] runs ~1.6x faster on CPU than
    # [P, D] @ [D, G] (measured at P=2048, G=3, D=64).
    hkv, _, d = kmin.shape
    qg = q.float().view(hkv, -1, d)  # [Hkv, G, D]
    bound = torch.bmm(qg.clamp(min=0), kmax.float().transpose(1, 2))  # [Hkv, G, P]
    return bound.baddbmm_(qg.clamp(max=0), kmin.float().transpose(1, 2)).amax(dim=1)


def quest_page_scores(q: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Upper bounds of q·k per page and KV head.

    Parameters
    ----------
    q : [Hq, D] queries of one sequence (any float dtype).
    kmin, kmax : [Hkv, P, D] channel-wise key min and max of each page (same dtype as q);
        Hq is a multiple of Hkv and query head h belongs to KV head ``h // (Hq // Hkv)``.

    Returns
    -------
    scores : [Hkv, P] float32, the max over each KV head's query heads of
        ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` (unscaled).
    """
    _check(q, kmin, kmax)
    if q.is_cuda:
        return _quest_triton(q, kmin, kmax)
    return _quest_torch(q, kmin, kmax)
