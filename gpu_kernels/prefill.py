"""Prefill attention of one sequence's chunk against its paged KV cache, in two modes.

``prefill_attention`` (causal): the chunk's queries sit at positions ``start .. start+C-1``
and its own keys and values are already written to the cache; query ``start+i`` sees keys
``0 .. start+i``.

``prior_attention`` (no mask): every query of the chunk sees the first ``n_keys`` keys of a
block table, e.g. a block of offloaded pages streamed back; its ``(out, lse)`` partial is
merged with the others by ``merge_partials``.

On CUDA both run one flash-attention Triton kernel that reads K/V through the block table.
On CPU the prior keys are attended without a mask (GQA folded into query rows; read as
views of runs of adjacent pages) and, in the causal mode, the chunk itself with the causal
mask; the partials are merged by LSE.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._paged import check_cache, check_index, clip_runs, kv_blocks, page_runs
from .merge import merge_partials

__all__ = ["PREFILL_TILE_SHAPES", "PrefillTiles", "prefill_attention", "prefill_tiles", "prior_attention"]

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# The kernel works in base 2 (exp2 is the GPU's native exponential): scores are scaled by
# scale * log2(e) on the host, and the row max is turned back to natural log with ln(2).
_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)

# (BLOCK_M, BLOCK_N) query x key tiles the kernel is tested with; all at least 16, as tl.dot
# needs. (16, 16) is the test tile; the others are what ``prefill_tiles`` picks.
PREFILL_TILE_SHAPES: tuple[tuple[int, int], ...] = ((128, 64), (64, 64), (64, 32), (32, 32), (16, 16))


@dataclass(frozen=True, slots=True)
class PrefillTiles:
    """Launch configuration of the prefill kernel.

    Parameters
    ----------
    block_m, block_n : query rows and keys per tile; ``(block_m, block_n)`` must be one of
        ``PREFILL_TILE_SHAPES``.
    num_warps, num_stages : Triton launch options (warps per program, software-pipeline depth).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if (self.block_m, self.block_n) not in PREFILL_TILE_SHAPES:
            raise ValueError(
                f"PrefillTiles: (block_m, block_n) = ({self.block_m}, {self.block_n}) is not one of "
                f"PREFILL_TILE_SHAPES {PREFILL_TILE_SHAPES}"
            )
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"PrefillTiles: num_warps must be a power of two <= 16, got {self.num_warps}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"PrefillTiles: num_stages must be a positive int, got {self.num_stages!r}")


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index``, queried once per device."""
    return torch.cuda.get_device_capability(index)


def prefill_tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> PrefillTiles:
    """Tiles of the prefill kernel for ``head_dim``, ``dtype`` on ``device``.

    The choices follow the configurations of Triton's fused-attention tutorial
    (``06-fused-attention.py``: BLOCK_M 64/128, BLOCK_N 32-128, 4/8 warps, 2-4 stages) for
    Ampere/Hopper: 128x64 tiles for 16-bit inputs, 8 warps once head_dim exceeds 64 (the
    accumulator grows with it), smaller tiles for fp32, whose ieee ``tl.dot`` operands take
    twice the registers and shared memory. They are unmeasured on this kernel (no GPU was at
    hand when they were set): time them before trusting them.
    """
    device = torch.device(device)
    # Off CUDA the kernel only runs in Triton's interpreter, where tiles cost no registers.
    cap = (8, 0)
    if device.type == "cuda":
        cap = _capability(torch.cuda.current_device() if device.index is None else device.index)
    return _tiles_for(head_dim, dtype, cap)


@functools.cache
def _tiles_for(head_dim: int, dtype: torch.dtype, cap: tuple[int, int]) -> PrefillTiles:
    warps = 8 if head_dim > 64 else 4
    if dtype.itemsize >= 4:
        if head_dim > 128:
            return PrefillTiles(32, 32, num_warps=4, num_stages=2)
        return PrefillTiles(64, 32, num_warps=warps, num_stages=2)
    if cap < (8, 0) or head_dim > 128:
        # Pre-Ampere shared memory (64-96 KiB) or very wide heads: halve the tiles.
        return PrefillTiles(64, 32, num_warps=warps, num_stages=2)
    return PrefillTiles(128, 64, num_warps=warps, num_stages=3)


@triton.jit
def _attend_keys(
    acc, l, m, q, q_pos,
    k_base, v_base, bt_ptr, stride_ks, stride_kd, stride_vs, stride_vd, stride_bp,
    offs_n, offs_d, mask_d, lo, hi, qk_scale, page_size,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Online softmax of the query tile over keys [lo, hi) in BLOCK_N steps (scores in base 2).
    # Unmasked blocks (MASKED False) must lie wholly inside the valid keys and, if causal,
    # below the tile's first query position: they skip the masks and the where.
    for t0 in range(lo, hi, BLOCK_N):
        t = t0 + offs_n
        if MASKED:
            mask_n = t < hi
            page = tl.load(bt_ptr + (t // page_size) * stride_bp, mask=mask_n, other=0)
            kv_mask = mask_n[:, None] & mask_d[None, :]
        else:
            page = tl.load(bt_ptr + (t // page_size) * stride_bp)
            kv_mask = mask_d[None, :]
        slot = page.to(tl.int64) * page_size + t % page_size
        k = tl.load(k_base + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        if MASKED:
            visible = mask_n[None, :]
            if CAUSAL:
                visible = visible & (t[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        # Key 0 is visible to every row and comes first, so m is finite after the first block
        # and exp2(m - m_new) never sees -inf - -inf.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    return acc, l, m


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, out_ptr, lse_ptr,
    stride_qc, stride_qh, stride_qd,
    stride_kh, stride_ks, stride_kd,
    stride_vh, stride_vs, stride_vd,
    stride_bp,
    C, Hq, start, n_keys, qk_scale, page_size,
    CAUSAL: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (query block, query head) over keys [0, n_keys) of the block table. Causal:
    # query i sits at position start + i (n_keys = start + C); otherwise it sees every key.
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
    if CAUSAL:
        # Keys below the tile's first query are visible to all its queries; the rest, up to
        # its last query, form the diagonal that needs the causal mask.
        lo = start + mb * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, n_keys)
    else:
        lo = n_keys
        hi = n_keys
    # Whole key blocks below lo run unmasked; the remainder (< BLOCK_N + BLOCK_M keys when
    # causal, < BLOCK_N otherwise) runs masked.
    full = (lo // BLOCK_N) * BLOCK_N
    k_base = k_ptr + hk * stride_kh
    v_base = v_ptr + hk * stride_vh
    acc, l, m = _attend_keys(acc, l, m, q, q_pos, k_base, v_base, bt_ptr,
                             stride_ks, stride_kd, stride_vs, stride_vd, stride_bp,
                             offs_n, offs_d, mask_d, 0, full, qk_scale, page_size,
                             MASKED=False, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N)
    acc, l, m = _attend_keys(acc, l, m, q, q_pos, k_base, v_base, bt_ptr,
                             stride_ks, stride_kd, stride_vs, stride_vd, stride_bp,
                             offs_n, offs_d, mask_d, full, hi, qk_scale, page_size,
                             MASKED=True, CAUSAL=CAUSAL, BLOCK_N=BLOCK_N)

    out = acc / l[:, None]
    rows = offs_m * Hq + h
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + rows, (m + tl.log2(l)) * _LN2, mask=mask_m)


def _prefill_triton(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int,
    scale: float, page_size: int, *, causal: bool = True, tiles: PrefillTiles | None = None,
) -> tuple[Tensor, Tensor]:
    """Triton path of both modes, on whatever device the tensors are on.

    ``causal``: queries at positions ``start .. start+C-1`` see keys up to their own position
    (``prefill_attention``). Otherwise every query sees keys ``[0, start)``: the prior context
    of a chunk at ``start`` (``prior_attention`` with ``n_keys = start``). ``tiles`` overrides
    ``prefill_tiles``. Arguments are not validated.
    """
    c, hq, d = q.shape
    g = hq // k_cache.shape[0]
    n_keys = start + c if causal else start
    if n_keys == 0:  # no key at all (only possible when not causal): the empty partial
        lse = torch.full((c, hq), float("-inf"), dtype=torch.float32, device=q.device)
        return torch.zeros_like(q), lse
    tiles = tiles or prefill_tiles(d, q.dtype, q.device)
    out = torch.empty((c, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((c, hq), dtype=torch.float32, device=q.device)
    if c > 0:
        _prefill_kernel[(triton.cdiv(c, tiles.block_m), hq)](
            q, k_cache, v_cache, block_table, out, lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), block_table.stride(0),
            c, hq, start if causal else 0, n_keys, float(scale) * _LOG2E, page_size,
            CAUSAL=causal, G=g, D=d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
            BLOCK_D=max(16, triton.next_power_of_2(d)),
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )
    return out, lse


def _run_slices(cache: Tensor, runs: list[tuple[int, int]]) -> Tensor:
    """Tokens of ``runs`` from ``cache`` [Hkv, n_slots, D] as [Hkv, L, D]: a view if one run."""
    if len(runs) == 1:
        first, n = runs[0]
        return cache[:, first:first + n]
    return torch.cat([cache[:, first:first + n] for first, n in runs], dim=1)


def _unmasked_partials(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, runs: list[tuple[int, int]], scale: float,
    page_size: int,
) -> list[tuple[Tensor, Tensor]]:
    """``(out [C, Hq, D], lse [C, Hq])`` of every query over the keys of ``runs``, one per KV block.

    Every query sees every key, so the G query heads of a KV head become G*C rows of one
    query block and K/V are read once per KV head, as views where runs are long.
    """
    c, hq, d = q.shape
    hkv = k_cache.shape[0]
    g = hq // hkv
    q_fold = q.reshape(c, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * c, d)
    partials = []
    for k, v in kv_blocks(k_cache, v_cache, runs, page_size):
        out, lse = _flash_cpu(q_fold, k[None], v[None], 0.0, False, scale=scale)[:2]  # [1, Hkv, G*C, (D)]
        partials.append((out.view(hkv, g, c, d).permute(2, 0, 1, 3).reshape(c, hq, d),
                         lse.view(hkv, g, c).permute(2, 0, 1).reshape(c, hq)))
    return partials


def _runs(
    name: str, block_table: Tensor, n_tokens: int, page_size: int, n_slots: int
) -> list[tuple[int, int]]:
    """Page runs of the first ``n_tokens`` tokens of ``block_table`` (page ids range-checked)."""
    pages = block_table[: -(-n_tokens // page_size)].tolist()
    return page_runs(name, pages, n_tokens, page_size, n_slots // page_size)


def _prefill_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, start: int,
    scale: float, page_size: int,
) -> tuple[Tensor, Tensor]:
    """CPU path of ``prefill_attention``: prior keys as page-run views, then the causal chunk."""
    c, hq, d = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    if c == 0:
        return q.new_empty((0, hq, d)), torch.empty((0, hq), dtype=torch.float32)
    runs = _runs("prefill_attention", block_table, start + c, page_size, k_cache.shape[1])

    # The chunk against its own keys: causal, top-left aligned since Lq == Lk; the op maps
    # query head h to KV head h // G itself, so the chunk's K/V are not expanded.
    own = clip_runs(runs, start, start + c)
    k_own, v_own = _run_slices(k_cache, own), _run_slices(v_cache, own)
    out, lse = _flash_cpu(q.transpose(0, 1)[None], k_own[None], v_own[None], 0.0, True, scale=scale)[:2]
    diag = (out[0].transpose(0, 1), lse[0].transpose(0, 1))  # [C, Hq, D], [C, Hq]
    if start == 0:
        return diag[0].contiguous(), diag[1].to(torch.float32).contiguous()
    prior = _unmasked_partials(q, k_cache, v_cache, clip_runs(runs, 0, start), scale, page_size)
    out, lse = merge_partials(diag, *prior)
    return out.contiguous(), lse.contiguous()


def _prior_torch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, n_keys: int,
    scale: float, page_size: int,
) -> tuple[Tensor, Tensor]:
    """CPU path of ``prior_attention``."""
    c, hq, d = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    runs = _runs("prior_attention", block_table, n_keys, page_size, k_cache.shape[1])
    if c == 0 or not runs:
        return torch.zeros_like(q), torch.full((c, hq), float("-inf"), dtype=torch.float32)
    out, lse = merge_partials(*_unmasked_partials(q, k_cache, v_cache, runs, scale, page_size))
    return out.contiguous(), lse.contiguous()


def _check_args(name: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                page_size: int, what: str, n_tokens: int) -> None:
    """Raise ValueError unless the cache fits ``q`` and ``block_table`` ([P] int32) covers
    ``n_tokens`` (a non-negative int, called ``what`` in messages)."""
    check_cache(name, q, k_cache, v_cache, page_size)
    if not isinstance(block_table, Tensor) or block_table.dim() != 1:
        got = tuple(block_table.shape) if isinstance(block_table, Tensor) else type(block_table).__name__
        raise ValueError(f"{name}: block_table must be an int32 tensor [P], got {got}")
    check_index(name, "block_table", block_table, tuple(block_table.shape), q.device)
    if not isinstance(n_tokens, int) or n_tokens < 0:
        raise ValueError(f"{name}: {what} must be a non-negative int, got {n_tokens!r}")
    if n_tokens > block_table.shape[0] * page_size:
        raise ValueError(
            f"{name}: {what} = {n_tokens} tokens exceed the {block_table.shape[0]} pages "
            f"of page_size {page_size} in block_table"
        )


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
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"{name}: start must be a non-negative int, got {start!r}")
    c = q.shape[0] if q.dim() == 3 else 0  # check_cache reports a q of the wrong rank
    _check_args(name, q, k_cache, v_cache, block_table, page_size, "start + C", start + c)
    if q.is_cuda:
        return _prefill_triton(q, k_cache, v_cache, block_table, start, scale, page_size)
    return _prefill_torch(q, k_cache, v_cache, block_table, start, scale, page_size)


def prior_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, n_keys: int,
    scale: float, page_size: int,
) -> tuple[Tensor, Tensor]:
    """Attention of every query of a chunk over the first ``n_keys`` keys of a block table.

    No mask: for keys that precede the whole chunk, e.g. a block of offloaded pages streamed
    back, whose partial is merged with the others by ``merge_partials``.

    Parameters
    ----------
    q : [C, Hq, D] float (fp32/fp16/bf16).
    k_cache, v_cache : [Hkv, n_slots, D], same dtype and device as ``q``.
    block_table : [P] int32 page ids listing the keys in order, with ``P * page_size >= n_keys``
        (entries past them are ignored).
    n_keys : int >= 0, number of keys to attend.
    scale : softmax scale (typically ``D ** -0.5``).
    page_size : tokens per page.

    Returns
    -------
    out : [C, Hq, D], q.dtype; query head ``h`` uses KV head ``h // (Hq // Hkv)`` (GQA);
        0 if ``n_keys == 0``.
    lse : [C, Hq] float32, natural-log softmax denominator; ``-inf`` if ``n_keys == 0``.

    Notes
    -----
    CUDA: the prefill Triton kernel without its causal mask (page ids not range-checked).
    CPU: page runs read as views, GQA folded into query rows, torch's fused flash op.
    """
    _check_args("prior_attention", q, k_cache, v_cache, block_table, page_size, "n_keys", n_keys)
    if q.is_cuda:
        return _prefill_triton(q, k_cache, v_cache, block_table, n_keys, scale, page_size, causal=False)
    return _prior_torch(q, k_cache, v_cache, block_table, n_keys, scale, page_size)
