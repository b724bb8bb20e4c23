"""Paged decode attention: one query token per sequence against its paged KV cache.

KV cache layout (per layer): ``k_cache``, ``v_cache`` are ``[Hkv, n_slots, D]`` with
``n_slots = n_pages * page_size``; page ``p`` holds slots ``[p*page_size, (p+1)*page_size)``.
A block table lists, per sequence and KV head, the pages in token order.

On CUDA a split-K (flash-decoding) Triton kernel computes partials over ranges of the page
list and a Triton merge combines them. On CPU the fused flash-attention op of torch reads
the KV through views of runs of adjacent pages (no gather copy of the sequence) and the
partials are merged by LSE.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._paged import check_cache, check_index, gather_heads, kv_blocks, page_runs
from .merge import _merge_triton, merge_partials

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

__all__ = ["PagedTables", "paged_decode_attention"]


@dataclass(frozen=True, slots=True)
class PagedTables:
    """The host's copy of a decode call's ``block_table`` and ``kv_lens``, as Python lists
    the caller already holds (its page bookkeeping is host-side): the CPU path reads these
    instead of converting the tensors, so a decode step reads nothing back from the device.

    ``tables[b]`` lists sequence ``b``'s page ids per KV head, or one list shared by every
    head; ``lens[b]`` its valid tokens per KV head. Entries must equal the tensors'.
    """

    tables: list[list[list[int]]]
    lens: list[list[int]]


@functools.cache
def _n_sm(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``, queried once."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, po_ptr, plse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kh, stride_ks, stride_kd,
    stride_vh, stride_vs, stride_vd,
    stride_bb, stride_bh, stride_bp,
    stride_lb, stride_lh,
    B, Hq, scale, page_size, tokens_per_split,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (b, kv head, split): the G query heads of this KV head against the tokens
    # [split*tokens_per_split, (split+1)*tokens_per_split) of the sequence's page list.
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = hk * G + offs_g

    kv_len = tl.load(lens_ptr + b * stride_lb + hk * stride_lh)
    lo = sp * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, kv_len)

    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_g[:, None] & mask_d[None, :], other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + b * stride_bb + hk * stride_bh
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + offs_n
        mask_n = t < hi
        page = tl.load(bt_row + (t // page_size) * stride_bp, mask=mask_n, other=0).to(tl.int64)
        slot = page * page_size + t % page_size
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + hk * stride_kh + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + hk * stride_vh + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        # Every block holds at least one valid token, so the row max stays finite.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new

    nonempty = l > 0.0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
    # Partials are laid out [S, B, Hq, (D)] so the merge reads them without a copy.
    row = (sp * B + b) * Hq + heads
    tl.store(po_ptr + row[:, None] * D + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(plse_ptr + row, lse, mask=mask_g)


def _decode_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, kv_lens: Tensor,
    scale: float, page_size: int, *, block_n: int = 64, num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton path of ``paged_decode_attention``, on whatever device the tensors are on.

    ``block_n`` is the number of tokens per inner step; ``num_splits`` overrides the split
    count (default: enough programs to fill the GPU). Arguments are not validated.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[0]
    g = hq // hkv
    max_tokens = max(block_table.shape[2] * page_size, 1)  # bound without reading kv_lens
    if num_splits is None:
        n_sm = _n_sm(q.device.index if q.device.index is not None else torch.cuda.current_device()) if q.is_cuda else 1
        num_splits = max(1, -(-4 * n_sm // max(b * hkv, 1)))
    num_splits = max(1, min(num_splits, -(-max_tokens // block_n)))
    tokens_per_split = -(-max_tokens // (num_splits * block_n)) * block_n
    num_splits = -(-max_tokens // tokens_per_split)

    part_out = torch.empty((num_splits, b, hq, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((num_splits, b, hq), dtype=torch.float32, device=q.device)
    if b > 0:
        _decode_split_kernel[(b, hkv, num_splits)](
            q, k_cache, v_cache, block_table, kv_lens, part_out, part_lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(), *kv_lens.stride(),
            b, hq, float(scale), page_size, tokens_per_split,
            G=g, D=d, BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n,
            BLOCK_D=max(16, triton.next_power_of_2(d)),
        )
    return _merge_triton(part_out, part_lse, q.dtype)


# A block is split across threads only if every part gets at least this many tokens.
_MIN_SPLIT_TOKENS = 1024


def _block_partials(q: Tensor, k: Tensor, v: Tensor, scale: float) -> list[tuple[Tensor, Tensor]]:
    """Partials of ``q`` [H, G, D] over one block ``k``, ``v`` [H, L, D] (fused CPU flash op).

    The op runs one task per (KV head, query block): with few KV heads (3 in the default
    model) and several threads the tasks would not fill the threads evenly, so a long block
    is split, as a view, into ``n_threads`` equal parts (H * n_threads equal tasks).
    """
    h, g, d = q.shape
    length = k.shape[1]
    n = torch.get_num_threads()
    if n == 1 or length < n * _MIN_SPLIT_TOKENS:
        out, lse = _flash_cpu(q[None], k[None], v[None], 0.0, False, scale=scale)[:2]
        return [(out[0], lse[0])]
    main = length - length % n
    out, lse = _flash_cpu(q[:, None].expand(h, n, g, d), k[:, :main].view(h, n, main // n, d),
                          v[:, :main].view(h, n, main // n, d), 0.0, False, scale=scale)[:2]
    parts = [(out[:, j], lse[:, j]) for j in range(n)]
    if main < length:
        out, lse = _flash_cpu(q[None], k[None, :, main:], v[None, :, main:], 0.0, False, scale=scale)[:2]
        parts.append((out[0], lse[0]))
    return parts


def _decode_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, kv_lens: Tensor,
    scale: float, page_size: int, host: PagedTables | None = None,
) -> tuple[Tensor, Tensor]:
    """CPU path of ``paged_decode_attention``.

    Per sequence, runs of adjacent pages of at least ``MIN_VIEW_TOKENS`` tokens are read as
    views ``[Hkv, L, D]`` (no copy); shorter runs (scattered pages of sparse policies, pages
    allocated while sequences decode side by side) are gathered into one block. GQA is folded:
    the G query heads of a KV head are the query rows of one attention call. A sequence whose
    KV heads share one page list (dense: an expanded view, or equal rows) is computed for all
    heads at once; so is one whose heads list different pages of equal count (sparse
    policies), gathered by one page index; otherwise head by head. Partials beyond the first
    of each sequence are merged by LSE once for the whole batch (small tensor ops cost more
    than their data here).
    """
    name = "paged_decode_attention"
    b, hq, d = q.shape
    hkv, width = k_cache.shape[0], block_table.shape[2]
    g = hq // hkv
    lens = kv_lens.tolist() if host is None else host.lens
    for i, lens_i in enumerate(lens):
        if min(lens_i) < 0 or max(lens_i) > width * page_size:
            raise ValueError(
                f"{name}: kv_lens[{i}]={lens_i} must lie in [0, P*page_size={width * page_size}]"
            )

    n_pages = k_cache.shape[1] // page_size
    max_used = -(-max((max(lens_i) for lens_i in lens), default=0) // page_size)
    same_len = [lens_i.count(lens_i[0]) == hkv for lens_i in lens]
    if host is not None:
        tables = [rows * hkv if len(rows) == 1 else rows for rows in host.tables]
        shared = [same and (len(rows) == 1 or all(r == rows[0] for r in rows[1:]))
                  for same, rows in zip(same_len, host.tables)]
    elif hkv == 1 or block_table.stride(1) == 0:
        tables = [[row] * hkv for row in block_table[:, 0, :max_used].tolist()]
        shared = same_len
    else:
        tables = block_table[:, :, :max_used].tolist()
        n_used = [-(-lens_i[0] // page_size) for lens_i in lens]
        shared = [same and all(row[:n] == rows[0][:n] for row in rows[1:])
                  for same, rows, n in zip(same_len, tables, n_used)]

    out = torch.zeros((b, hkv, g, d), dtype=q.dtype)
    lse = torch.full((b, hkv, g), float("-inf"), dtype=torch.float32)
    qg = (q if q.stride(-1) == 1 else q.contiguous()).reshape(b, hkv, g, d)
    later = []  # (rank, index, partial) of each sequence's second and later partials
    for i in range(b):
        if shared[i]:  # one page list: views of its runs, all heads at once
            runs = page_runs(name, tables[i][0], lens[i][0], page_size, n_pages)
            groups = [(slice(None), kv_blocks(k_cache, v_cache, runs, page_size))]
        elif same_len[i]:  # sparse heads, equal counts: one gather, all heads at once
            blocks = gather_heads(name, k_cache, v_cache, tables[i], lens[i][0], page_size)
            groups = [(slice(None), blocks)]
        else:
            groups = [
                (slice(h, h + 1), kv_blocks(
                    k_cache[h : h + 1], v_cache[h : h + 1],
                    page_runs(name, tables[i][h], lens[i][h], page_size, n_pages), page_size,
                ))
                for h in range(hkv)
            ]
        for hs, blocks in groups:
            partials = [p for k, v in blocks for p in _block_partials(qg[i, hs], k, v, scale)]
            if partials:
                out[i, hs], lse[i, hs] = partials[0]
                later += [(rank, (i, hs), p) for rank, p in enumerate(partials[1:])]
    if later:
        n_more = 1 + max(rank for rank, _, _ in later)
        more_out = torch.zeros((n_more, b, hkv, g, d), dtype=q.dtype)
        more_lse = torch.full((n_more, b, hkv, g), float("-inf"), dtype=torch.float32)
        for rank, index, (o, l) in later:
            more_out[rank][index], more_lse[rank][index] = o, l
        out, lse = merge_partials((out, lse), *zip(more_out, more_lse))
    return out.view(b, hq, d), lse.view(b, hq)


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, kv_lens: Tensor,
    scale: float, page_size: int, host: PagedTables | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of one query token per sequence over its paged KV cache.

    Parameters
    ----------
    q : [B, Hq, D] float (fp32/fp16/bf16), the new token's queries.
    k_cache, v_cache : [Hkv, n_slots, D], same dtype and device as ``q``;
        ``n_slots = n_pages * page_size``; page ``p`` holds slots ``[p*page_size, (p+1)*page_size)``.
    block_table : [B, Hkv, P] int32 page ids, in token order, per sequence and KV head. Heads
        may list different pages (sparse policies); a dense caller may pass one list expanded
        over heads (stride 0). Entries past the pages in use are ignored.
    kv_lens : [B, Hkv] int32, valid tokens in the concatenation of the listed pages (all full
        but possibly the last). 0 gives ``out = 0`` and ``lse = -inf`` for those heads.
    scale : softmax scale (typically ``D ** -0.5``).
    page_size : tokens per page.
    host : the host's copy of ``block_table`` and ``kv_lens`` (:class:`PagedTables`); the CPU
        path then reads no tensor back (CUDA ignores it).

    Returns
    -------
    out : [B, Hq, D], q.dtype; query head ``h`` uses KV head ``h // (Hq // Hkv)`` (GQA).
    lse : [B, Hq] float32, natural-log softmax denominator (merge with ``merge_partials``).

    Notes
    -----
    CUDA: split-K Triton kernel plus Triton merge; kv_lens and page ids are not range-checked
    (that would synchronise). CPU: torch's fused attention over views of runs of adjacent
    pages, GQA folded, partials merged by LSE (see ``_decode_torch``).
    """
    name = "paged_decode_attention"
    check_cache(name, q, k_cache, v_cache, page_size)
    b, hkv = q.shape[0], k_cache.shape[0]
    if block_table.dim() != 3:
        raise ValueError(f"{name}: block_table must be [B, Hkv, P], got shape {tuple(block_table.shape)}")
    check_index(name, "block_table", block_table, (b, hkv, block_table.shape[2]), q.device)
    check_index(name, "kv_lens", kv_lens, (b, hkv), q.device)
    if q.is_cuda:
        return _decode_triton(q, k_cache, v_cache, block_table, kv_lens, scale, page_size)
    return _decode_torch(q, k_cache, v_cache, block_table, kv_lens, scale, page_size, host)
