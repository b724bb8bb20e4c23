"""Exact attention over a sequence's KV wherever it lives: resident pages are read in
place, offloaded pages are streamed through the layer's page cache in batches that fit it,
and the cache is emptied afterwards (one layer's staging at a time is on the device).

Used by the dense policy once a sequence has offloaded (one query per sequence: the decode
kernel) and by the prefill of a sequence whose layer does not fit the device budget whole
(a chunk of queries: the prefill kernel, never the decode kernel with the chunk folded into
its head axis, a tile that does not compile on a GPU at useful chunk sizes). Every batch
yields an ``(out, lse)`` partial; the partials merge exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gpu_kernels import PagedTables, merge_partials, paged_decode_attention, prefill_attention, prior_attention
from hetero.cache import OFFLOADED, KVStore


def exact_attention(
    store: KVStore, layer: int, seq_id: int, q: Tensor, start: int, scale: float, batch_pages: int
) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` [C, Hq, D] at positions ``start..start+C-1`` over positions
    ``0..start+C-1`` of one layer of ``seq_id`` (causal).

    A chunk (C > 1) must have its pages on the device, the one it starts in included (its
    tokens before ``start`` are seen by every query of the chunk); a single query (decode)
    sees every key up to itself. ``batch_pages`` offloaded pages are fetched at a time.
    Returns out [C, Hq, D] (q.dtype), lse [C, Hq] float32.
    """
    table, ps = store.tables[seq_id], store.page_size
    pages = table.layers[layer]
    c = q.shape[0]
    partials = []
    if c > 1:  # the chunk over itself (causal) and the start of its first page
        n_prior = start - start % ps
        own = store.device.tensor(pages[start // ps : -(-(start + c) // ps)], torch.int32)
        partials.append(prefill_attention(q, store.k, store.v, own, start % ps, scale, ps))
    else:  # decode: every key, the new one included, without a mask
        n_prior = start + 1
    if n_prior:
        n_prior_pages = -(-n_prior // ps)
        resident = [p for p in pages[:n_prior_pages] if p != OFFLOADED]
        offloaded = [i for i in range(n_prior_pages) if pages[i] == OFFLOADED]
        last = n_prior - (n_prior_pages - 1) * ps  # tokens in the last prior page
        if resident:
            # the last prior page, if partial, is resident (the local window) and listed last
            partials.append(_unmasked(q, store, resident, (len(resident) - 1) * ps + last, scale))
        for b in range(0, len(offloaded), batch_pages):
            group = offloaded[b : b + batch_pages]
            dev = store.fetch(seq_id, layer, group, batch_pages)
            partials.append(_unmasked(q, store, dev, len(dev) * ps, scale))
        store.drop_cache(seq_id, layer)
    return merge_partials(*partials)


def _unmasked(q: Tensor, store: KVStore, pages: list[int], n_tokens: int, scale: float):
    """Attention of every query of ``q`` [C, Hq, D] over ``n_tokens`` tokens of device
    ``pages``: the prefill kernel's unmasked mode for a chunk, the decode kernel for one
    query."""
    if q.shape[0] > 1:
        table = store.device.tensor(pages, torch.int32)
        return prior_attention(q, store.k, store.v, table, n_tokens, scale, store.page_size)
    hkv = store.cfg.n_kv_heads
    table = store.device.tensor([*pages, n_tokens], torch.int32)  # the pages, then the length
    return paged_decode_attention(q, store.k, store.v, table[None, None, :-1].expand(1, hkv, -1),
                                  table[None, -1:].expand(1, hkv), scale, store.page_size,
                                  PagedTables([[pages]], [[n_tokens] * hkv]))
