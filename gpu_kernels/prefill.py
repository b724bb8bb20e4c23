"""Causal prefill attention of one sequence's chunk against its paged KV cache.

The chunk's queries sit at positions ``start .. start+C-1`` and its own keys and values are
already written to the cache; query ``start+i`` sees keys ``0 .. start+i``.

On CUDA a flash-attention Triton kernel reads K/V through the block table. On CPU the keys
split into the prior context ``[0, start)`` (no mask; GQA folded into query rows; read as
views of runs of adjacent pages) and the chunk itself (causal), merged by LSE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._paged import check_cache, check_index, clip_runs, kv_blocks, page_runs
from .merge import merge_partials

__all__ = ["prefill_attention"]

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, out_ptr, lse_ptr,
    stride_qc, stride_qh, stride_qd,
    stride_kh, stride_ks, stride_kd,
    stride_vh, stride_vs, stride_vd,
    stride_bp,
    C, Hq, start, scale, page_size,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (query block, query head): BLOCK_M queries against keys [0, last query pos].
    mb = tl.program_id(0)
    h = tl.program_id(1)
    hk = h // G

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < C
    mask_d = offs_d < D
    q_pos = start + offs_m

    q = tl.load(q_ptr + offs_m[:, None] * stride_qc + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = start + tl.minimum((mb + 1) * BLOCK_M, C)
    for t0 in range(0, hi, BLOCK_N):
        t = t0 + offs_n
        mask_n = t < hi
        page = tl.load(bt_ptr + (t // page_size) * stride_bp, mask=mask_n, other=0).to(tl.int64)
        slot = page * page_size + t % page_size
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + hk * stride_kh + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + hk * stride_vh + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        # Key 0 is visible to every query, so after the first block each row max is finite.
        s = tl.where(mask_n[None, :] & (t[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    out = acc / l[:, None]
    rows = offs_m * Hq + h
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + rows, m + tl.log(l), mask=mask_m)


def _prefill_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int,
    scale: float, page_size: int, *, block_m: int = 64, block_n: int = 64,
) -> tuple[Tensor, Tensor]:
    """Triton path of ``prefill_attention``, on whatever device the tensors are on.

    ``block_m`` / ``block_n`` are the query / key tile sizes. Arguments are not validated.
    """
    c, hq, d = q.shape
    g = hq // k_cache.shape[0]
    out = torch.empty((c, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((c, hq), dtype=torch.float32, device=q.device)
    if c > 0:
        _prefill_kernel[(triton.cdiv(c, block_m), hq)](
            q, k_cache, v_cache, block_table, out, lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), block_table.stride(0),
            c, hq, start, float(scale), page_size,
            G=g, D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        )
    return out, lse


def _run_slices(cache: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    """Tokens of ``runs`` from ``cache`` [Hkv, n_slots, D] as [Hkv, L, D]: a view if one run."""
    if len(runs) == 1:
        first, n = runs[0]
        return cache[:, first:first + n]
    return torch.cat([cache[:, first:first + n] for first, n in runs], dim=1)


def _prefill_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int,
    scale: float, page_size: int,
) -> tuple[Tensor, Tensor]:
    """CPU path of ``prefill_attention``: prior keys as page-run views, then the causal chunk."""
    c, hq, d = q.shape
    hkv = k_cache.shape[0]
    g = hq // hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    if c == 0:
        return q.new_empty((0, hq, d)), torch.empty((0, hq), dtype=torch.float32)
    pages = block_table[: -(-(start + c) // page_size)].tolist()
    runs = page_runs("prefill_attention", pages, start + c, page_size, k_cache.shape[1] // page_size)

    # The chunk against its own keys: causal, top-left aligned since Lq == Lk; the op maps
    # query head h to KV head h // G itself, so the chunk's K/V are not expanded.
    own = clip_runs(runs, start, start + c)
    k_own, v_own = _run_slices(k_cache, own), _run_slices(v_cache, own)
    out, lse = _flash_cpu(q.transpose(0, 1)[None], k_own[None], v_own[None], 0.0, True, scale=scale)[:2]
    diag = (out[0].transpose(0, 1), lse[0].transpose(0, 1))  # [C, Hq, D], [C, Hq]
    if start == 0:
        return diag[0].contiguous(), diag[1].to(torch.float32).contiguous()

    # Prior context: every query sees every key, so the G query heads of a KV head become
    # G*C rows of one query block and K/V are read once per KV head, as views.
    q_fold = q.reshape(c, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * c, d)
    partials = [diag]
    for k, v in kv_blocks(k_cache, v_cache, clip_runs(runs, 0, start), page_size):
        out, lse = _flash_cpu(q_fold, k[None], v[None], 0.0, False, scale=scale)[:2]  # [1, Hkv, G*C, (D)]
        partials.append((out.view(hkv, g, c, d).permute(2, 0, 1, 3).reshape(c, hq, d),
                         lse.view(hkv, g, c).permute(2, 0, 1).reshape(c, hq)))
    out, lse = merge_partials(*partials)
    return out.contiguous(), lse.contiguous()


def prefill_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int,
    scale: float, page_size: int,
) -> tuple[Tensor, Tensor]:
    """Causal attention of one sequence's prefill chunk over its paged KV cache.

    Parameters
    ----------
    q : [C, Hq, D] float (fp32/fp16/bf16), queries at positions ``start .. start+C-1``.
    k_cache, v_cache : [Hkv, n_slots, D], same dtype and device as ``q``; the chunk's own keys
        and values are already written at positions ``start .. start+C-1``.
    block_table : [P] int32 page ids of this sequence in token order, covering at least
        ``start + C`` tokens (entries past them are ignored).
    start : int, position of the chunk's first token (tokens already in the cache before it).
    scale : softmax scale (typically ``D ** -0.5``).
    page_size : tokens per page.

    Returns
    -------
    out : [C, Hq, D], q.dtype; query head ``h`` uses KV head ``h // (Hq // Hkv)`` (GQA).
    lse : [C, Hq] float32, natural-log softmax denominator.

    Notes
    -----
    Query ``start+i`` sees keys ``0 .. start+i``. CUDA: flash-attention Triton kernel reading
    K/V through the block table (page ids not range-checked). CPU: prior keys unmasked with
    GQA folded into query rows, plus the causal chunk, merged by LSE.
    """
    name = "prefill_attention"
    check_cache(name, q, k_cache, v_cache, page_size)
    if block_table.dim() != 1:
        raise ValueError(f"{name}: block_table must be [P], got shape {tuple(block_table.shape)}")
    check_index(name, "block_table", block_table, tuple(block_table.shape), q.device)
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"{name}: start must be a non-negative int, got {start!r}")
    if start + q.shape[0] > block_table.shape[0] * page_size:
        raise ValueError(
            f"{name}: start + C = {start + q.shape[0]} tokens exceed the {block_table.shape[0]} pages "
            f"of page_size {page_size} in block_table"
        )
    if q.is_cuda:
        return _prefill_triton(q, k_cache, v_cache, block_table, start, scale, page_size)
    return _prefill_torch(q, k_cache, v_cache, block_table, start, scale, page_size)
