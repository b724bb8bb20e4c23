"""Shared checks, page-run bookkeeping and KV block selection for the paged attention launchers."""

from __future__ import annotations

import torch
from torch import Tensor


def check_cache(name: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, page_size: int) -> None:
    """Raise ValueError unless ``k_cache``/``v_cache`` are ``[Hkv, n_slots, D]`` caches fitting ``q``.

    ``q`` is ``[N, Hq, D]``; Hq must be a multiple of Hkv; all on one device with one dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"{name}: q must be 3-D [N, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 3 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{name}: k_cache and v_cache must both be [Hkv, n_slots, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if not (q.is_floating_point() and q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"{name}: q, k_cache, v_cache must share one float dtype, got "
            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    if not (q.device == k_cache.device == v_cache.device):
        raise ValueError(f"{name}: q, k_cache, v_cache on {q.device}, {k_cache.device}, {v_cache.device}")
    hkv, n_slots, d = k_cache.shape
    if q.shape[2] != d:
        raise ValueError(f"{name}: head_dim of q ({q.shape[2]}) != head_dim of the cache ({d})")
    if hkv == 0 or q.shape[1] % hkv != 0:
        raise ValueError(f"{name}: Hq={q.shape[1]} must be a positive multiple of Hkv={hkv}")
    if not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"{name}: page_size must be a positive int, got {page_size!r}")
    if n_slots % page_size != 0:
        raise ValueError(f"{name}: n_slots={n_slots} is not a multiple of page_size={page_size}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{name}: k_cache and v_cache must be contiguous in the head_dim")


def check_index(name: str, what: str, t: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """Raise ValueError unless ``t`` is an int32 tensor of ``shape`` on ``device``."""
    if not isinstance(t, Tensor) or t.dtype != torch.int32:
        got = getattr(t, "dtype", type(t).__name__)
        raise ValueError(f"{name}: {what} must be an int32 tensor, got {got}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: {what} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: {what} is on {t.device}, q on {device}")


def page_runs(
    name: str, pages: list[int], n_tokens: int, page_size: int, n_pages: int
) -> list[tuple[int, int]]:
    """Split the first ``n_tokens`` tokens of a page list into runs of adjacent pages.

    Parameters
    ----------
    pages : page ids of one sequence (and KV head) in token order, as a Python list: tables
        are turned into lists once per call, because list operations cost far less than
        tensor ops on tables this small, and a table that is one run (the common case)
        costs a single list comparison.
    n_tokens : tokens to cover, from the start of the list.

    Returns
    -------
    List of ``(first_slot, length)``: slots ``[first_slot, first_slot + length)`` of the cache
    hold ``length`` consecutive tokens of the sequence, in order.
    """
    if n_tokens <= 0:
        return []
    n_used = -(-n_tokens // page_size)
    if n_used > len(pages):
        raise ValueError(f"{name}: {n_tokens} tokens need {n_used} pages, the block table lists {len(pages)}")
    used = pages[:n_used]
    first = used[0]
    if used == list(range(first, first + n_used)):
        if first < 0 or first + n_used > n_pages:
            raise ValueError(
                f"{name}: page ids must lie in [0, {n_pages}), got {first}..{first + n_used - 1}"
            )
        return [(first * page_size, n_tokens)]
    if min(used) < 0 or max(used) >= n_pages:
        raise ValueError(f"{name}: page ids must lie in [0, {n_pages}), got {min(used)}..{max(used)}")
    runs = []
    start = 0
    for j in range(1, n_used + 1):
        if j == n_used or used[j] != used[j - 1] + 1:
            runs.append((used[start] * page_size, min(j * page_size, n_tokens) - start * page_size))
            start = j
    return runs


def clip_runs(runs: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Restrict ``runs`` (as returned by ``page_runs``) to the token positions ``[lo, hi)``."""
    clipped = []
    pos = 0
    for first, length in runs:
        a, b = max(lo, pos), min(hi, pos + length)
        if a < b:
            clipped.append((first + a - pos, b - a))
        pos += length
    return clipped


# Runs shorter than this many tokens are gathered into one block (a copy) rather than read
# as views: below it, the fixed cost of an attention call per run exceeds the copy.
MIN_VIEW_TOKENS = 256


def kv_blocks(
    k_cache: Tensor, v_cache: Tensor, runs: list[tuple[int, int]], page_size: int
) -> list[tuple[Tensor, Tensor]]:
    """K and V blocks covering ``runs``, for attention that does not depend on key order.

    Parameters
    ----------
    k_cache, v_cache : [H, n_slots, D] caches (or a head slice of them).
    runs : as returned by ``page_runs``.

    Returns
    -------
    List of ``(k, v)`` [H, L, D] blocks: a view per run of at least ``MIN_VIEW_TOKENS``
    tokens (no copy), and one gather of all shorter runs (scattered pages of sparse
    policies, pages allocated while sequences decode side by side).
    """
    long = [(first, n) for first, n in runs if n >= MIN_VIEW_TOKENS]
    short = [(first, n) for first, n in runs if n < MIN_VIEW_TOKENS]
    if len(short) == 1:  # nothing to gather it with
        long, short = runs, []
    blocks = [(k_cache[:, first:first + n], v_cache[:, first:first + n]) for first, n in long]
    if short:
        # Whole pages, except possibly the sequence's last page, which comes last here.
        pages = torch.tensor([p for first, n in short
                              for p in range(first // page_size, (first + n - 1) // page_size + 1)])
        n_tokens = sum(n for _, n in short)
        h, _, d = k_cache.shape
        k, v = (cache.view(h, -1, page_size, d).index_select(1, pages).view(h, -1, d)[:, :n_tokens]
                for cache in (k_cache, v_cache))
        blocks.append((k, v))
    return blocks


def gather_heads(
    name: str, k_cache: Tensor, v_cache: Tensor, pages: list[list[int]], n_tokens: int, page_size: int
) -> list[tuple[Tensor, Tensor]]:
    """One K and V block [H, n_tokens, D] of head ``h``'s first ``n_tokens`` tokens of page
    list ``pages[h]`` (H lists of at least ``n_tokens / page_size`` page ids), gathered (a
    copy) by one page index per cache: the sparse-policy case, where heads list different
    pages of equal count. ``[]`` if ``n_tokens`` is 0."""
    if n_tokens <= 0:
        return []
    h, n_slots, d = k_cache.shape
    n_pages = n_slots // page_size
    n_used = -(-n_tokens // page_size)
    used = [row[:n_used] for row in pages]
    lo, hi = min(map(min, used)), max(map(max, used))
    if lo < 0 or hi >= n_pages:
        raise ValueError(f"{name}: page ids must lie in [0, {n_pages}), got {lo}..{hi}")
    index = torch.tensor([p + i * n_pages for i, row in enumerate(used) for p in row])
    return [tuple(
        cache.view(h * n_pages, page_size, d).index_select(0, index).view(h, -1, d)[:, :n_tokens]
        for cache in (k_cache, v_cache)
    )]
