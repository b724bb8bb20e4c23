"""ActQKV: window-by-window prefill and decode over a block memory, with bounded positions,
so that prefill is linear in the prompt and a model reads far past its trained context.

**Blocks.** The store's pages are the blocks. A page that leaves the local window goes to
the host tier; the device keeps one representative key of it per KV head: the mean of the
``n_repr`` keys that the queries after them scored highest (``q·k``, before the rotary
embedding, summed over the group's query heads, while the key was in the local window),
normalised. This is InfLLM's rule as its code (and ActQKV's, a fork of it) applies it: the
top keys of a block by local score, averaged into one vector.

**Prefill** (the engine's windowed prefill): each window of ``window`` tokens runs through
every layer. In a layer the window attends, causally, to the local window (the last
``n_local`` tokens before it) and itself, and to its memory: the sinks and, per KV head, the
``top_blocks`` blocks whose representatives are most similar (cosine) to the window's probe
query, fetched into the layer's head cache. A window's cost does not grow with the prompt.

**Probe query** (ActQKV's activation bias, as its code's ``activate`` computes it): per
layer and KV head, the window's queries ``h_t`` (the group's query heads side by side) are
compared with the running mean ``μ`` and variance ``σ²`` of every query seen so far
(the window's included); token ``t`` weighs ``w_t ∝ mean_c (h_tc − μ_c)² / (σ²_c +
mean(σ²)/100)``, and the probe is ``Σ_t w_t h_t``. Tokens whose queries stand out from the
context steer the retrieval. (The code keeps uniform weights for a warm-up of windows and
statistics shared by all layers; here every layer and KV head has its own, exact, running
statistics from the first window that has a memory.)

**Decode**: the new query is the probe; ActQKV's dynamic cut-off keeps, per KV head,
``K = K_min + (K_max − K_min)·exp(10·(2·sigmoid(10·(H − log n)) − 1))`` of the ``top_blocks``
best blocks (rounded), ``H`` the entropy of the softmax of the ``n`` block scores,
``K_min = min(n, min_blocks)``: flat scores keep more blocks, peaked ones fewer
(:func:`dynamic_blocks`; the formula of ActQKV's code, whose active version uses a minimum
of 32). The head cache holds all ``top_blocks``; the cut-off masks the rest on the device.
The prompt's last token is fed as a decode step (the engine's windowed prefill), so the
token whose logits are sampled picks its memory by its own query.

**Bounded positions** (InfLLM): keys are stored before the rotary embedding. The local part
attends with true relative positions; the sinks and blocks sit at position 0 and every query
at ``n_local``: one distance, as if just beyond the local window. Every relative position
stays below ``n_local + window + page_size``, inside the trained range. The parts are
``(out, lse)`` partials merged by LSE at prefill, one softmax at decode. Until the first page
leaves the window nothing is in memory and attention is exact.

Defaults for the embedded SmolLM2-135M (8k positions, 3 KV heads of 64): ActQKV's Llama-3-8B
setting is 32-token blocks, 4 representative keys, 64 sink + 512 local tokens, the top 46
blocks, 256-token windows: about 2k tokens attended. Blocks here are the store's pages (16
tokens unless ``page_size`` says otherwise: one representative per 16 keys, and a finer
selection); the top 128 blocks (2,048 tokens), 64 sinks, 512 local tokens and 256-token
windows give ActQKV's 2k of memory per query. Fewer lost the passkey: at 8k tokens of the
passkey task, 32 blocks found 0 of 3 keys that 128 (and all blocks) found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from gpu_kernels import merge_partials, prior_attention
from hetero.cache import KVStore
from hetero.config import ModelConfig
from hetero.model import Rope, apply_rope
from hetero.policies.base import DecodeStep, PagedState, Policy, StepPlan
from hetero.policies.quest import HeadSlots, fetch_head_pages

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def probe_query(q: Tensor, mean: Tensor | None, var: Tensor | None, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """ActQKV's activation-aware probe of one window: ``q`` [C, Hkv, F] (a KV head's query
    heads side by side, F = G * D), running ``mean``, ``var`` [Hkv, F] float32 of ``count``
    earlier queries (None, None, 0 at first). Returns the probe [Hkv, F] (float32) and the
    statistics updated with this window (Chan's parallel update)."""
    x = q.float()
    c = x.shape[0]
    m_b, v_b = x.mean(0), x.var(0, unbiased=False)
    if mean is None:
        mean, var = m_b, v_b
    else:
        n = count + c
        delta = m_b - mean
        mean = mean + delta * (c / n)
        var = (var * count + v_b * c + delta.square() * (count * c / n)) / n
    dev = (x - mean).square_().div_(var + var.mean(-1, keepdim=True) / 100)
    w = dev.mean(-1)  # [C, Hkv]
    w = w / w.sum(0).clamp_min(1e-30)
    return torch.einsum("ch,chf->hf", w, x), mean, var


def dynamic_blocks(scores: Tensor, min_blocks: int, top_blocks: int) -> Tensor:
    """ActQKV's dynamic cut-off: blocks to keep per row of ``scores`` [Hkv, n] (int64 [Hkv],
    on the scores' device: never read back), between ``min(n, min_blocks)`` and
    ``min(n, top_blocks)`` (a minimum above the maximum keeps the maximum)."""
    n = scores.shape[-1]
    k_min, k_max = min(n, min_blocks, top_blocks), min(n, top_blocks)
    p = torch.softmax(scores.float(), dim=-1)
    h = -(p * torch.log(p + 1e-10)).sum(-1)
    frac = torch.exp(10 * (2 * torch.sigmoid(10 * (h - math.log(n))) - 1))
    return (k_min + (k_max - k_min) * frac).round().long().clamp_(k_min, k_max)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """``(out [C, Hq, D], lse [C, Hq] float32)`` of queries ``q`` [C, Hq, D] over keys and
    values ``k``, ``v`` [Hkv, N, D] (query head ``h`` reads KV head ``h // G``); ``causal``
    (C == N): query ``i`` sees keys ``0..i``. The CPU runs torch's fused flash op; other
    devices :func:`attention_math` (a window's local part: a few hundred keys)."""
    if q.is_cuda:
        return attention_math(q, k, v, scale, causal)
    out, lse = _flash_cpu(q.transpose(0, 1)[None], k[None], v[None], 0.0, causal, scale=scale)[:2]
    return out[0].transpose(0, 1), lse[0].transpose(0, 1).float()


def attention_math(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`attention` in plain tensor ops (float32 logits)."""
    c, hq, d = q.shape
    hkv, n = k.shape[:2]
    logits = torch.einsum("chgd,hnd->hgcn", q.view(c, hkv, hq // hkv, d).float(), k.float()) * scale
    if causal:
        logits.masked_fill_(torch.ones(c, n, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    lse = logits.logsumexp(-1)  # [Hkv, G, C]
    out = torch.einsum("hgcn,hnd->chgd", (logits - lse[..., None]).exp_(), v.float()).reshape(c, hq, d)
    return out.to(q.dtype), lse.permute(2, 0, 1).reshape(c, hq)


@dataclass(slots=True)
class _SeqState:
    """ActQKV's state of one sequence, per layer: the device pages of its block
    representatives (``reps[l]``: page ``m`` holds, in K, the representatives of blocks
    ``2m*ps ..`` and, in V, of ``(2m+1)*ps ..``; one run), the head cache, the running query
    statistics, and the local scores of the tokens not yet offloaded (``scores[l]``, float32
    [Hkv, ring], token ``t`` at ``t % ring``)."""

    reps: list[list[int]]
    heads: list[HeadSlots | None]
    mean: list[Tensor | None]
    var: list[Tensor | None]
    count: list[int]
    scores: Tensor

    def pages(self) -> list[int]:
        return [p for r in self.reps for p in r] + [p for h in self.heads if h is not None for p in h.pages]


@dataclass(slots=True)
class ActQKVPolicy(PagedState, Policy):
    name = "actqkv"
    bounded_positions = True
    n_sink: int = 64
    n_local: int = 512
    window: int = 256
    top_blocks: int = 128
    min_blocks: int = 32
    n_repr: int = 4
    _store: KVStore | None = field(default=None, init=False, repr=False)
    _rope: Rope | None = field(default=None, init=False, repr=False)
    _seqs: dict[int, _SeqState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        Policy.__post_init__(self)
        for name in ("window", "top_blocks", "min_blocks", "n_repr"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"actqkv: {name} must be an integer >= 1, got {value!r}")
        if self.dense_layers:
            raise ValueError("actqkv: dense_layers must be 0 (every layer reads the block memory at "
                             "bounded positions)")

    # -- tiering -------------------------------------------------------------------------

    def cache_pages(self, cfg: ModelConfig, page_size: int, n_pages: int) -> int:
        return min(self.top_blocks, n_pages)  # the head cache: each KV head's blocks in the same pages

    def offload_pages(self, n_pages: int, page_size: int) -> int:
        return -(-n_pages // (2 * page_size))  # representatives: one slot per page, in K and V

    def prefill_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int, chunk: int,
                      stream_prefill: bool = False) -> int:
        # every layer at once holds its resident set and one window (window-major prefill)
        n_pages = -(-n_tokens // page_size)
        return self.steady_pages(cfg, n_tokens, page_size) + cfg.n_layers * min(n_pages, self.window // page_size + 1)

    # -- state ---------------------------------------------------------------------------

    def bind(self, backend, store: KVStore) -> None:
        if self.window % store.page_size or self.n_sink % store.page_size:
            raise ValueError(f"actqkv: window ({self.window}) and n_sink ({self.n_sink}) must be multiples "
                             f"of page_size ({store.page_size})")
        self._store, self._rope, self._seqs = store, Rope(store.cfg), {}

    def _state(self, store: KVStore, seq_id: int) -> _SeqState:
        state = self._seqs.get(seq_id)
        if state is None:
            cfg, n = store.cfg, store.cfg.n_layers
            ring = (self.n_local + self.window) // store.page_size * store.page_size + 2 * store.page_size
            scores = torch.zeros((n, cfg.n_kv_heads, ring), dtype=torch.float32, device=store.kv.device)
            state = self._seqs[seq_id] = _SeqState([[] for _ in range(n)], [None] * n, [None] * n,
                                                   [None] * n, [0] * n, scores)
        return state

    def _rep_pages(self, store: KVStore, seq_id: int, layer: int) -> list[int]:
        reps = self._state(store, seq_id).reps[layer]
        if not reps:  # one run for the whole sequence
            reps += store.allocate(self.offload_pages(-(-store.tables[seq_id].capacity // store.page_size),
                                                      store.page_size))
        return reps

    def on_offload(self, store: KVStore, seq_id: int, layer: int, page_idx: list[int], k: Tensor) -> None:
        """Write the representatives of pages ``page_idx`` (keys ``k`` [Hkv, n, ps, D]): per
        KV head, the mean of the ``n_repr`` keys of each page with the highest local score."""
        ps, state = store.page_size, self._state(store, seq_id)
        reps = self._rep_pages(store, seq_id, layer)
        ring = state.scores.shape[-1]
        tokens = store.device.tensor([(i * ps + j) % ring for i in page_idx for j in range(ps)], torch.int64)
        score = state.scores[layer].index_select(1, tokens).view(k.shape[:3])  # [Hkv, n, ps]
        top = score.topk(min(self.n_repr, ps), dim=-1).indices
        rep = k.gather(2, top[..., None].expand(*top.shape, k.shape[-1])).float().mean(2)
        rep = torch.nn.functional.normalize(rep, dim=-1).to(store.dtype)  # [Hkv, n, D]
        for half, pool in enumerate((store.k, store.v)):
            mine = [j for j, i in enumerate(page_idx) if i // ps % 2 == half]
            if mine:
                slots = [reps[page_idx[j] // (2 * ps)] * ps + page_idx[j] % ps for j in mine]
                pool.index_copy_(1, store.device.tensor(slots, torch.int64),
                                 rep.index_select(1, store.device.tensor(mine, torch.int64)))

    def block_scores(self, store: KVStore, seq_id: int, layer: int, probe: Tensor, run: range) -> Tensor:
        """Cosine similarity [Hkv, len(run)] of ``probe`` [Hkv, D] with the representatives of
        the offloaded pages ``run``."""
        reps, ps = self._state(store, seq_id).reps[layer], store.page_size
        m = -(-run.stop // (2 * ps))  # representative pages covering the run
        if reps[m - 1] - reps[0] == m - 1:  # contiguous (ids come sorted)
            span = slice(reps[0] * ps, (reps[0] + m) * ps)
            halves = [t[:, span].view(t.shape[0], m, ps, -1) for t in (store.k, store.v)]
        else:
            index = store.device.tensor(reps[:m], torch.int64)
            halves = [t.view(t.shape[0], -1, ps, t.shape[-1]).index_select(1, index) for t in (store.k, store.v)]
        p = probe.to(store.dtype)
        scores = torch.stack([torch.einsum("hmjd,hd->hmj", r, p) for r in halves], dim=2)  # [Hkv, m, 2, ps]
        scores = scores.flatten(1)[:, run.start : run.stop].float()
        return scores / probe.float().norm(dim=-1, keepdim=True).clamp_min(1e-30)

    def head_slots(self, store: KVStore, seq_id: int, layer: int, k: int) -> HeadSlots:
        """The layer's head cache for ``k`` blocks per KV head ((re)allocated as ``k`` grows)."""
        state = self._state(store, seq_id)
        slots = state.heads[layer]
        if slots is None or slots.held.shape[1] != k:
            pages = store.allocate(k)
            if slots is not None:
                store.free(slots.pages)
            held = torch.full((store.cfg.n_kv_heads, k), -1, dtype=torch.int64, device=store.kv.device)
            slots = state.heads[layer] = HeadSlots(pages, held, store.device.tensor(pages, torch.int64))
        return slots

    def _rope_at(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [n, 1, D] of positions ``0..n-1``."""
        return self._rope.span(n, dtype, device)

    def _memory_rotation(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [1, 1, D] of the memory's distance (``n_local``)."""
        cos, sin = self._rope_at(self.n_local + 1, dtype, device)
        return cos[-1:], sin[-1:]

    # -- prefill: one window of one layer ----------------------------------------------------

    def attend_window(self, store: KVStore, seq_id: int, layer: int, start: int, q: Tensor, k: Tensor,
                      scale: float) -> Tensor:
        """Attention output [C, Hq, D] of a window's queries ``q`` [C, Hq, D] at ``start`` (keys
        ``k`` [C, Hkv, D] are written to the store, like the values; both before the rotary
        embedding)."""
        table, ps = store.tables[seq_id], store.page_size
        c, hq, d = q.shape
        hkv = k.shape[1]
        state = self._state(store, seq_id)
        run = table.offloaded
        base = run.stop * ps if run else 0  # the local part: tokens base .. start + c - 1
        n = start + c - base
        pages = table.layers[layer][base // ps : -(-(start + c) // ps)]
        idx = store.device.tensor([p * ps + j for p in pages for j in range(ps)][:n], torch.int64)
        keys, values = store.k.index_select(1, idx), store.v.index_select(1, idx)  # [Hkv, n, D]
        self._score_local(state, layer, q.view(c, hkv, -1, d).sum(2), keys, base, start)
        cos, sin = self._rope_at(n, q.dtype, q.device)
        kr = apply_rope(keys.transpose(0, 1), cos, sin).transpose(0, 1)
        qr = apply_rope(q, cos[n - c :], sin[n - c :])
        prior = attention(qr, kr[:, : n - c], values[:, : n - c], scale) if n > c else None
        own = attention(qr, kr[:, n - c :], values[:, n - c :], scale, causal=True)
        parts = [own] if prior is None else [own, prior]
        if run:
            parts.append(self._window_memory(store, seq_id, layer, q, run, scale))
        return merge_partials(*parts)[0] if len(parts) > 1 else own[0]

    def _window_memory(self, store: KVStore, seq_id: int, layer: int, q: Tensor, run: range,
                       scale: float) -> tuple[Tensor, Tensor]:
        """The window's partial over the sinks and its top blocks (per KV head) at the memory
        distance."""
        state, ps = self._state(store, seq_id), store.page_size
        c, hq, d = q.shape
        hkv = store.cfg.n_kv_heads
        probe, state.mean[layer], state.var[layer] = probe_query(q.view(c, hkv, -1), state.mean[layer],
                                                                  state.var[layer], state.count[layer])
        state.count[layer] += c
        cos, sin = self._memory_rotation(q.dtype, q.device)
        qm = apply_rope(q, cos, sin)
        probe = apply_rope(probe.view(hkv, -1, d), cos, sin).sum(1)  # [Hkv, D]
        scores = self.block_scores(store, seq_id, layer, probe, run)
        kk = min(self.top_blocks, len(run))
        picks = scores.topk(kk, dim=1, sorted=False).indices.add_(run.start)
        slots = self.head_slots(store, seq_id, layer, kk)
        fetch_head_pages(store, seq_id, layer, slots, picks)
        pages = store.tables[seq_id].layers[layer][: run.start] + slots.pages
        table = store.device.tensor(pages, torch.int32)
        return prior_attention(qm, store.k, store.v, table, len(pages) * ps, scale, ps)

    def _score_local(self, state: _SeqState, layer: int, qs: Tensor, keys: Tensor, base: int, start: int) -> None:
        """Add the local scores of this window's queries (``qs`` [C, Hkv, D], summed over each
        group, before the rotary embedding) to keys ``base .. start + C - 1`` (``keys`` [Hkv, n,
        D]): each key scores ``q·k`` with the queries at and after it."""
        c, ring = qs.shape[0], state.scores.shape[-1]
        n = keys.shape[1]
        qs = qs.float()
        suffix = qs.sum(0) - qs.cumsum(0) + qs  # [C, Hkv, D]: queries at and after each token
        own = torch.einsum("chd,hcd->hc", suffix, keys[:, n - c :].float())
        earlier = torch.einsum("hd,hnd->hn", qs.sum(0), keys[:, : n - c].float())
        index = torch.arange(base, start + c, device=keys.device) % ring
        new = torch.cat([state.scores[layer][:, index[: n - c]] + earlier, own], dim=1)
        state.scores[layer][:, index] = new

    # -- decode ------------------------------------------------------------------------

    def plan(self, step: DecodeStep) -> _ActPlan:
        """Per sequence and layer: the pool slots of the local tokens and sinks, and the head
        cache (a run of pool slots read as a view, or slots to gather); per sequence the
        local tokens' places in the score ring. All from host-side state, one upload. Clears
        the new tokens' local scores."""
        store, ps, n_layers = step.store, step.store.page_size, step.store.cfg.n_layers
        offsets = np.arange(ps)
        rows, rings, work = [], [], [[] for _ in range(n_layers)]
        for b, (s, t) in enumerate(zip(step.seq_ids, step.tables)):
            run, state = t.offloaded, self._state(store, s)
            base = run.stop * ps if run else 0
            n, ring = t.n_tokens - base, state.scores.shape[-1]
            kk = min(self.top_blocks, len(run))
            for layer in range(n_layers):
                pages = t.layers[layer]
                local = (np.array(pages[base // ps : -(-t.n_tokens // ps)])[:, None] * ps + offsets).ravel()[:n]
                sinks = cache = np.zeros(0, dtype=np.int64)
                span = None
                if run:
                    sinks = (np.array(pages[: run.start])[:, None] * ps + offsets).ravel()
                    held = self.head_slots(store, s, layer, kk).pages
                    if held[-1] - held[0] == kk - 1:  # one run: read as a view
                        span = (held[0] * ps, (held[-1] + 1) * ps)
                    else:
                        cache = (np.array(held)[:, None] * ps + offsets).ravel()
                work[layer].append(_Seq(b, s, run, len(rows), n, len(sinks), len(cache), span))
                rows.append(np.concatenate([local, sinks, cache]))
            state.scores[:, :, (t.n_tokens - 1) % ring] = 0
            rings.append((base + np.arange(n)) % ring)
        rows += rings  # row len(rows) - B + b: sequence b's ring places
        index = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
        for i, r in enumerate(rows):
            index[i, : len(r)] = r
        return _ActPlan(step, [], work, store.device.tensor(torch.from_numpy(index), torch.int64))

    def run(self, layer: int, q: Tensor, plan: _ActPlan) -> Tensor:
        outs = [self._decode(layer, q[w.b], plan, w) for w in plan.work[layer]]
        return torch.stack(outs)

    def _decode(self, layer: int, q: Tensor, plan: _ActPlan, w: _Seq) -> Tensor:
        """Attention output [Hq, D] of one sequence's query ``q`` [Hq, D] (before the rotary
        embedding): one softmax over the local window at true relative positions and the
        memory (sinks, head cache) at the fixed distance, the blocks past each head's
        cut-off masked."""
        store, ps = plan.step.store, plan.step.store.page_size
        hq, d = q.shape
        hkv = store.cfg.n_kv_heads
        qg = q.view(hkv, -1, d) * plan.step.scale
        if w.run:  # select and fetch the blocks first: the reads below see the head cache
            cos, sin = self._memory_rotation(q.dtype, q.device)
            qm = apply_rope(qg, cos[0], sin[0])
            dropped = self._select(store, w, layer, qm.sum(1))
        n_local, n_near = w.n_local, w.n_local + w.n_sink
        kv = store.kv.index_select(2, plan.index[w.row, : n_near + w.n_cache])  # [2, Hkv, n, D]
        keys, values = kv[0], kv[1]
        local = keys[:, :n_local]
        ring = plan.index[len(plan.index) - len(plan.step.seq_ids) + w.b, :n_local]
        self._seqs[w.seq_id].scores[layer].index_add_(1, ring, (local @ qg.sum(1)[..., None])[..., 0].float())
        cos, sin = self._rope_at(n_local, q.dtype, q.device)
        local = apply_rope(local.transpose(0, 1), cos, sin).transpose(0, 1)
        logits = [apply_rope(qg, cos[-1], sin[-1]) @ local.transpose(1, 2)]  # [Hkv, G, n_local]
        if not w.run:
            p = torch.softmax(logits[0].float(), dim=-1)
            return (p.to(values.dtype) @ values).view(hq, d)
        cache = store.kv[:, :, w.span[0] : w.span[1]] if w.span else kv[:, :, n_near:]
        blocks = qm @ cache[0].transpose(1, 2)  # [Hkv, G, slots * ps]
        blocks.view(hkv, qg.shape[1], -1, ps).masked_fill_(dropped[:, None, :, None], float("-inf"))
        logits += [qm @ keys[:, n_local:n_near].transpose(1, 2), blocks]
        p = torch.softmax(torch.cat(logits, dim=-1).float(), dim=-1).to(values.dtype)
        out = p[..., :n_near] @ values[:, :n_near] + p[..., n_near:] @ cache[1]
        return out.view(hq, d)

    def _select(self, store: KVStore, w: _Seq, layer: int, probe: Tensor) -> Tensor:
        """Rank the offloaded blocks by ``probe`` [Hkv, D] (the query at the memory distance),
        make the head cache hold each KV head's best ones, and return which of its slots
        fall past the head's dynamic cut-off (bool [Hkv, slots])."""
        scores = self.block_scores(store, w.seq_id, layer, probe, w.run)
        slots = self._seqs[w.seq_id].heads[layer]
        top = scores.topk(slots.held.shape[1], dim=1, sorted=True).indices.add_(w.run.start)  # best first
        fetch_head_pages(store, w.seq_id, layer, slots, top)
        keep = dynamic_blocks(scores, self.min_blocks, self.top_blocks)  # [Hkv]
        rank = (slots.held[:, :, None] == top[:, None, :]).to(torch.uint8).argmax(-1)  # of each slot's block
        return rank >= keep[:, None]


@dataclass(slots=True)
class _Seq:
    """One sequence's share of a decode step's layer: batch row ``b``, its offloaded run, and
    its row of the plan's index: ``n_local`` slots of the local window, ``n_sink`` of the
    sinks, then ``n_cache`` of the head cache, unless it is the run ``span``."""

    b: int
    seq_id: int
    run: range
    row: int
    n_local: int
    n_sink: int
    n_cache: int  # head-cache slots to gather (0: read the run ``span`` of pool slots)
    span: tuple[int, int] | None


@dataclass(slots=True)
class _ActPlan(StepPlan):
    work: list[list[_Seq]]  # per layer
    index: Tensor  # [B * n_layers + B, width]: pool slots per sequence and layer, then score rings
