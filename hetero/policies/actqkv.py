"""ActQKV: window-by-window prefill and decode over a block memory, with bounded positions,
so that prefill is linear in the prompt and a model reads far past its trained context.

**Blocks.** The store's pages are the blocks. A page that leaves the local window goes to
the host tier; the device keeps one representative key of it per KV head: the mean of the
``n_repr`` keys that the queries after them scored highest (``q·k``, before the rotary
embedding, summed over the group's query heads, while the key was in the local window),
normalised, stored as int8 codes (x127: a unit vector needs no scale; 64 bytes per block and
head, a quarter of fp32, which at 128k tokens is 47 MB scanned per decode step instead of
189 MB). This is InfLLM's rule as its code (and ActQKV's, a fork of it) applies it: the
top keys of a block by local score, averaged into one vector.

**Key bounds.** The average loses a key that the queries after it ignored: at 32k tokens of
the passkey task the retrieval head (layer 18, KV head 2 of the embedded model) put all its
attention on the block of the key's digits, whose representative ranked 612th of 2,009, and
the answer was lost. So every group of ``bound_group`` blocks also keeps Quest's key bound
(the channel-wise max and min of its keys, per KV head), and the blocks of the ``bound_top``
groups with the highest bound ``Σ_d max(p_d·max_d, p_d·min_d)`` are always selected (within
``top_blocks``). Over the decode steps of three 32k prompts, the selected blocks' share of
the attention mass that the best 128 blocks hold rose from a mean of 0.92 (minimum 0.003:
the lost key) to 0.95 (minimum 0.64); the 16 blocks with the highest bound per block
instead of per group left a minimum of 0.007, and cost 8x more to scan.

**Prefill** (the engine's windowed prefill): each window of ``window`` tokens runs through
every layer. In a layer the window attends, causally, to the local window (the last
``n_local`` tokens before it) and itself, and to its memory: the sinks and, per KV head, the
``top_blocks`` blocks whose representatives are most similar (cosine) to the window's probe
query (the bound's groups first), fetched into the layer's head cache. A window's cost
does not grow with the prompt. The prompt's last window, where the question usually is,
reads ``final_blocks`` (512) blocks, one layer at a time: at 32k tokens of the passkey task
a key that every decode step's selection found was still lost when the question's window
read 128 blocks (the answer began " the pass key"), and found with 256, 512 or all of them;
reading the tail in windows of 16 tokens at 128 blocks each did not find it.

**Probe query** (ActQKV's activation bias, as its code's ``activate`` computes it): per
layer and KV head, the window's queries ``h_t`` (the group's query heads side by side) are
compared with the running mean ``μ`` and variance ``σ²`` of every query seen so far
(the window's included); token ``t`` weighs ``w_t ∝ mean_c (h_tc − μ_c)² / (σ²_c +
mean(σ²)/100)``, and the probe is ``Σ_t w_t h_t``. Tokens whose queries stand out from the
context steer the retrieval. (The code keeps uniform weights for a warm-up of windows and
statistics shared by all layers; here every layer and KV head has its own, exact, running
statistics from the first window that has a memory.)

**Decode**: the new query is the probe (bound-selected groups first); ActQKV's dynamic
cut-off keeps, per KV head,
``K = K_min + (K_max − K_min)·exp(10·(2·sigmoid(10·(H − log n)) − 1))`` of the ``top_blocks``
best blocks (rounded), ``H`` the entropy of the softmax of the ``n`` block scores,
``K_min = min(n, min_blocks)``: flat scores keep more blocks, peaked ones fewer
(:func:`dynamic_blocks`; the formula of ActQKV's code, whose active version uses a minimum
of 32). On a GPU the head cache holds all ``top_blocks`` (fetched from the host tier) and
the cut-off leaves the rest out on the device. On the CPU the host tier is the device's own
memory, so nothing is copied: ``cpu_kernels.block_memory.decode_step`` scores the blocks,
cuts off, selects each head's kept ones (a partition, linear in the blocks) and attends over
them where they lie in the host tier, in one numba call per layer; the head cache is then
only prefill's.
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

from cpu_kernels.block_memory import decode_attention, decode_step, score_blocks
from gpu_kernels import merge_partials, prior_attention
from hetero.cache import KVStore
from hetero.config import ModelConfig
from hetero.device import Counter
from hetero.model import Rope, apply_rope
from hetero.policies.base import DecodeStep, PagedState, Policy, StepPlan
from hetero.policies.quest import HeadSlots, fetch_head_pages

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FORCED = 3.0  # added to a bound-selected block's score: above any cosine (int8 codes: |cos| <= 1.01)


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


def cutoff_range(n: int, min_blocks: int, top_blocks: int) -> tuple[int, int]:
    """The cut-off's ``(K_min, K_max)`` over ``n`` blocks (a minimum above the maximum keeps
    the maximum)."""
    return min(n, min_blocks, top_blocks), min(n, top_blocks)


def dynamic_blocks(scores: Tensor, min_blocks: int, top_blocks: int) -> Tensor:
    """ActQKV's dynamic cut-off: blocks to keep per row of ``scores`` [Hkv, n] (int64 [Hkv],
    on the scores' device: never read back), between ``min(n, min_blocks)`` and
    ``min(n, top_blocks)`` (a minimum above the maximum keeps the maximum)."""
    n = scores.shape[-1]
    k_min, k_max = cutoff_range(n, min_blocks, top_blocks)
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
    bounds: list[list[int]]
    heads: list[HeadSlots | None]
    mean: list[Tensor | None]
    var: list[Tensor | None]
    count: list[int]
    scores: Tensor

    def pages(self) -> list[int]:
        return ([p for r in self.reps + self.bounds for p in r]
                + [p for h in self.heads if h is not None for p in h.pages])


@dataclass(slots=True)
class ActQKVPolicy(PagedState, Policy):
    name = "actqkv"
    bounded_positions = True
    n_sink: int = 64
    n_local: int = 512
    window: int = 256
    top_blocks: int = 128
    min_blocks: int = 32
    final_blocks: int = 512
    n_repr: int = 4
    bound_group: int = 8
    bound_top: int = 2
    _store: KVStore | None = field(default=None, init=False, repr=False)
    _rope: Rope | None = field(default=None, init=False, repr=False)
    _seqs: dict[int, _SeqState] = field(default_factory=dict, init=False, repr=False)
    _keys_read: Counter = field(default_factory=Counter, init=False, repr=False)
    _keys_seen: Counter = field(default_factory=Counter, init=False, repr=False)

    def __post_init__(self):
        Policy.__post_init__(self)
        for name in ("window", "top_blocks", "min_blocks", "final_blocks", "n_repr", "bound_group", "bound_top"):
            value, least = getattr(self, name), 0 if name == "bound_top" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"actqkv: {name} must be an integer >= {least}, got {value!r}")
        if self.dense_layers:
            raise ValueError("actqkv: dense_layers must be 0 (every layer reads the block memory at "
                             "bounded positions)")

    # -- tiering -------------------------------------------------------------------------

    def cache_pages(self, cfg: ModelConfig, page_size: int, n_pages: int) -> int:
        return min(self.top_blocks, n_pages)  # the head cache: each KV head's blocks in the same pages

    def offload_pages(self, n_pages: int, page_size: int) -> int:
        return self._rep_count(n_pages, page_size) + self._bound_count(n_pages, page_size)

    def _rep_count(self, n_pages: int, page_size: int) -> int:
        # representatives: int8 codes, a slot's bytes (D x itemsize) hold itemsize of them, in K and V
        per_slot = self._store.dtype.itemsize if self._store is not None else 1
        return -(-n_pages // (2 * page_size * per_slot))

    def _bound_count(self, n_pages: int, page_size: int) -> int:
        return -(-n_pages // (self.bound_group * page_size))  # one slot per group: min in K, max in V

    def prefill_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int, chunk: int,
                      stream_prefill: bool = False) -> int:
        # every layer at once holds its resident set and one window (window-major prefill)
        # and one layer at a time the last window's larger head cache (and the one it replaces)
        n_pages = -(-n_tokens // page_size)
        final = min(max(self.final_blocks, self.top_blocks), n_pages)
        return (self.steady_pages(cfg, n_tokens, page_size) + cfg.n_layers * min(n_pages, self.window // page_size + 1)
                + final)

    # -- state ---------------------------------------------------------------------------

    def bind(self, backend, store: KVStore) -> None:
        if self.window % store.page_size or self.n_sink % store.page_size:
            raise ValueError(f"actqkv: window ({self.window}) and n_sink ({self.n_sink}) must be multiples "
                             f"of page_size ({store.page_size})")
        self._store, self._rope, self._seqs = store, Rope(store.cfg), {}
        self._keys_read, self._keys_seen = Counter(), Counter()

    def key_counts(self) -> tuple[int, int]:
        """Keys the decode steps attended (local window, sinks and the blocks each KV head
        kept) and keys of the context they could have read, both summed over query heads and
        (layer, sequence) calls since :meth:`bind`."""
        return self._keys_read.value, self._keys_seen.value

    def _state(self, store: KVStore, seq_id: int) -> _SeqState:
        state = self._seqs.get(seq_id)
        if state is None:
            cfg, n = store.cfg, store.cfg.n_layers
            ring = (self.n_local + self.window) // store.page_size * store.page_size + 2 * store.page_size
            scores = torch.zeros((n, cfg.n_kv_heads, ring), dtype=torch.float32, device=store.kv.device)
            state = self._seqs[seq_id] = _SeqState([[] for _ in range(n)], [[] for _ in range(n)], [None] * n,
                                                   [None] * n, [None] * n, [0] * n, scores)
        return state

    def _rep_pages(self, store: KVStore, seq_id: int, layer: int) -> tuple[list[int], list[int]]:
        """The layer's representative and key-bound pages (allocated at the first offload,
        one run for the whole sequence; the bounds start empty: min +inf, max -inf)."""
        state, ps = self._state(store, seq_id), store.page_size
        if not state.reps[layer]:
            n_pages = -(-store.tables[seq_id].capacity // ps)
            run = store.allocate(self.offload_pages(n_pages, ps))
            n_reps = self._rep_count(n_pages, ps)
            state.reps[layer], state.bounds[layer] = run[:n_reps], run[n_reps:]
            span = slice(run[n_reps] * ps, (run[-1] + 1) * ps)
            if run[-1] - run[n_reps] == len(run) - n_reps - 1:
                store.k[:, span] = float("inf")
                store.v[:, span] = float("-inf")
            else:
                slots = store.device.tensor([p * ps + j for p in run[n_reps:] for j in range(ps)], torch.int64)
                store.k.index_fill_(1, slots, float("inf"))
                store.v.index_fill_(1, slots, float("-inf"))
        return state.reps[layer], state.bounds[layer]

    def on_offload(self, store: KVStore, seq_id: int, layer: int, page_idx: list[int], k: Tensor) -> None:
        """Write the representatives of pages ``page_idx`` (keys ``k`` [Hkv, n, ps, D]): per
        KV head, the mean of the ``n_repr`` keys of each page with the highest local score,
        normalised, as int8 codes (x127); and widen their groups' key bounds."""
        ps, state = store.page_size, self._state(store, seq_id)
        reps, bounds = self._rep_pages(store, seq_id, layer)
        groups = [i // self.bound_group for i in page_idx]
        slots = store.device.tensor([bounds[g // ps] * ps + g % ps for g in groups], torch.int64)
        slots = slots[None, :, None].expand(k.shape[0], -1, k.shape[-1])  # as quest: min in K, max in V
        store.k.scatter_reduce_(1, slots, k.amin(2), "amin")
        store.v.scatter_reduce_(1, slots, k.amax(2), "amax")
        ring = state.scores.shape[-1]
        tokens = store.device.tensor([(i * ps + j) % ring for i in page_idx for j in range(ps)], torch.int64)
        score = state.scores[layer].index_select(1, tokens).view(k.shape[:3])  # [Hkv, n, ps]
        top = score.topk(min(self.n_repr, ps), dim=-1).indices
        rep = k.gather(2, top[..., None].expand(*top.shape, k.shape[-1])).float().mean(2)
        codes = torch.nn.functional.normalize(rep, dim=-1).mul_(127).round_().to(torch.int8)  # [Hkv, n, D]
        per = self._per(store)
        for half, pool in enumerate(_codes(store)):
            mine = [j for j, i in enumerate(page_idx) if i // per % 2 == half]
            if mine:
                rows = [reps[page_idx[j] // (2 * per)] * per + page_idx[j] % per for j in mine]
                pool.index_copy_(1, store.device.tensor(rows, torch.int64),
                                 codes.index_select(1, store.device.tensor(mine, torch.int64)))

    @staticmethod
    def _per(store: KVStore) -> int:
        """Representatives per page, in each of K and V."""
        return store.page_size * store.dtype.itemsize

    def scores(self, store: KVStore, seq_id: int, layer: int, probe: Tensor, run: range) -> tuple[Tensor, Tensor]:
        """For ``probe`` [Hkv, D]: the cosine similarity [Hkv, len(run)] of each offloaded block
        of ``run`` with its representative, and the key bound ``Σ_d max(p_d·max_d, p_d·min_d)``
        [Hkv, groups] of each group of ``bound_group`` blocks meeting ``run`` (Quest's bound,
        over groups). A float32 CPU pool runs ``cpu_kernels.block_memory.score_blocks``."""
        state, ps, grp, per = self._state(store, seq_id), store.page_size, self.bound_group, self._per(store)
        reps, bounds = state.reps[layer], state.bounds[layer]
        if _kernel_runs(store.kv):
            ck, cv = _codes(store)
            s, b = score_blocks(ck.numpy(), cv.numpy(), np.asarray(reps), per, run, store.k.numpy(), store.v.numpy(),
                                np.asarray(bounds), ps, grp, probe.float().contiguous().numpy())
            return torch.from_numpy(s), torch.from_numpy(b)
        hkv, d = probe.shape
        m = -(-run.stop // (2 * per))  # representative pages covering the run
        index = store.device.tensor(reps[:m], torch.int64)
        halves = [c.view(hkv, -1, per, d).index_select(1, index).float() for c in _codes(store)]
        p = probe.float()
        scores = torch.stack([torch.einsum("hmjd,hd->hmj", r, p) for r in halves], dim=2)  # [Hkv, m, 2, per]
        scores = scores.flatten(1)[:, run.start : run.stop] / (127 * p.norm(dim=-1, keepdim=True).clamp_min(1e-30))
        g0, g1 = run.start // grp, (run.stop - 1) // grp + 1
        index = store.device.tensor(bounds[: -(-g1 // ps)], torch.int64)  # bound pages covering the groups
        lo, hi = [t.view(hkv, -1, ps, d).index_select(1, index).flatten(1, 2)[:, g0:g1].float() for t in (store.k, store.v)]
        return scores, (hi @ p.clamp_min(0)[..., None] + lo @ p.clamp_max(0)[..., None])[..., 0]

    def ranked(self, store: KVStore, seq_id: int, layer: int, probe: Tensor, run: range) -> tuple[Tensor, Tensor]:
        """``(scores, rank)`` [Hkv, len(run)] of the offloaded blocks for ``probe`` [Hkv, D]:
        the representatives' cosine similarity (:meth:`scores`), and the same with the blocks
        of each head's ``bound_top`` groups of highest bound raised by ``FORCED`` above every
        other (in their own order): what the selection
        takes its top blocks by."""
        scores, bound = self.scores(store, seq_id, layer, probe, run)
        if not self.bound_top:
            return scores, scores
        grp = self.bound_group
        top = bound.topk(min(self.bound_top, bound.shape[1]), dim=1, sorted=False).indices
        blocks = (top[..., None] + run.start // grp) * grp + torch.arange(grp, device=top.device) - run.start
        forced = torch.zeros_like(scores).scatter_(1, blocks.flatten(1).clamp_(0, len(run) - 1), FORCED)
        return scores, scores + forced

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
        """cos, sin [1, D] of the memory's distance (``n_local``)."""
        cos, sin = self._rope_at(self.n_local + 1, dtype, device)
        return cos[self.n_local], sin[self.n_local]

    # -- prefill: one window of one layer ----------------------------------------------------

    def attend_window(self, store: KVStore, seq_id: int, layer: int, start: int, q: Tensor, k: Tensor,
                      scale: float, last: bool = False) -> Tensor:
        """Attention output [C, Hq, D] of a window's queries ``q`` [C, Hq, D] at ``start`` (keys
        ``k`` [C, Hkv, D] are written to the store, like the values; both before the rotary
        embedding); the prompt's ``last`` window reads ``final_blocks`` blocks."""
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
            parts.append(self._window_memory(store, seq_id, layer, q, run, scale, last))
        return merge_partials(*parts)[0] if len(parts) > 1 else own[0]

    def _window_memory(self, store: KVStore, seq_id: int, layer: int, q: Tensor, run: range,
                       scale: float, last: bool) -> tuple[Tensor, Tensor]:
        """The window's partial over the sinks and its top blocks (per KV head) at the memory
        distance. The last window's head cache (``final_blocks``) shrinks back to
        ``top_blocks`` after it (on the CPU, whose decode reads the host tier, it goes), so
        that only one layer at a time holds the larger one."""
        state, ps = self._state(store, seq_id), store.page_size
        c, hq, d = q.shape
        hkv = store.cfg.n_kv_heads
        probe, state.mean[layer], state.var[layer] = probe_query(q.view(c, hkv, -1), state.mean[layer],
                                                                  state.var[layer], state.count[layer])
        state.count[layer] += c
        cos, sin = self._memory_rotation(q.dtype, q.device)
        qm = apply_rope(q, cos, sin)
        probe = apply_rope(probe.view(hkv, -1, d), cos, sin).sum(1)  # [Hkv, D]
        kk = min(max(self.final_blocks, self.top_blocks) if last else self.top_blocks, len(run))
        picks = self.ranked(store, seq_id, layer, probe, run)[1].topk(kk, dim=1, sorted=False).indices.add_(run.start)
        slots = self.head_slots(store, seq_id, layer, kk)
        fetch_head_pages(store, seq_id, layer, slots, picks)
        pages = store.tables[seq_id].layers[layer][: run.start] + slots.pages
        table = store.device.tensor(pages, torch.int32)
        out = prior_attention(qm, store.k, store.v, table, len(pages) * ps, scale, ps)
        if last and _kernel_runs(store.kv):  # the CPU's decode reads the host tier: no head cache
            store.free(slots.pages)
            state.heads[layer] = None
        else:
            self.head_slots(store, seq_id, layer, min(self.top_blocks, len(run)))
        return out

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
        in_place = _kernel_runs(store.kv)  # the CPU reads the blocks from the host tier: no head cache
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
                if run and not in_place:
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
        memory (sinks, each KV head's selected blocks) at the fixed distance, the blocks past
        each head's cut-off left out. Adds the local keys' scores to the ring. A float32 CPU
        pool runs ``cpu_kernels.block_memory`` (selection and attention, reading the blocks
        in the host tier); other devices and dtypes the tensor ops below, its oracle, through
        the head cache."""
        store, ps = plan.step.store, plan.step.store.page_size
        hq, d = q.shape
        hkv = store.cfg.n_kv_heads
        qg = q.view(hkv, -1, d)
        state = self._seqs[w.seq_id]
        cos, sin = self._rope_at(max(w.n_local, self.n_local + 1), q.dtype, q.device)
        row = plan.index[w.row]
        ring = plan.index[len(plan.index) - len(plan.step.seq_ids) + w.b, : w.n_local]
        self._keys_seen.add(hq * plan.step.n_tokens[w.b])
        self._keys_read.add(hq * (w.n_local + w.n_sink))
        if not _kernel_runs(store.kv):
            probe = apply_rope(qg, *self._memory_rotation(q.dtype, q.device)).sum(1) if w.run else None
            ranked, keep = self._select(store, w, layer, probe) if w.run else (None, None)
            if w.run:
                self._keys_read.add(keep.sum() * (ps * (hq // hkv)))  # a device count
            held = state.heads[layer].held if w.run else None
            return self._decode_tensors(store, layer, qg, plan.step.scale, w, row, ring, held, ranked, keep, cos, sin)
        near = (qg.float().numpy(), store.kv.numpy(), row.numpy(), w.n_local, w.n_sink)
        rope = (cos[:, 0].numpy(), sin[:, 0].numpy(), self.n_local, plan.step.scale, state.scores[layer].numpy(),
                ring.numpy())
        if not w.run:
            none = np.zeros((hkv, 0), dtype=np.int64), np.zeros(hkv, dtype=np.int64)
            return torch.from_numpy(decode_attention(*near, store.kv.numpy(), *none, ps, *rope)).view(hq, d)
        ck, cv = _codes(store)
        out, keep = decode_step(*near, store.host_tier(w.seq_id)[layer].numpy(), ck.numpy(), cv.numpy(),
                                np.asarray(state.reps[layer]), self._per(store), w.run, np.asarray(state.bounds[layer]),
                                ps, self.bound_group, self.bound_top, FORCED,
                                *cutoff_range(len(w.run), self.min_blocks, self.top_blocks), *rope)
        self._keys_read.add(int(keep.sum()) * ps * (hq // hkv))
        return torch.from_numpy(out).view(hq, d)

    def _decode_tensors(self, store: KVStore, layer: int, qg: Tensor, scale: float, w: _Seq, row: Tensor,
                        ring: Tensor, held: Tensor | None, ranked: Tensor | None, keep: Tensor | None, cos: Tensor,
                        sin: Tensor) -> Tensor:
        """:meth:`_decode` in tensor ops (``qg`` [Hkv, G, D])."""
        ps, (hkv, g, d) = store.page_size, qg.shape
        n_local, n_near = w.n_local, w.n_local + w.n_sink
        kv = store.kv.index_select(2, row[: n_near + w.n_cache])  # [2, Hkv, n, D]
        keys, values = kv[0], kv[1]
        local = keys[:, :n_local]
        self._seqs[w.seq_id].scores[layer].index_add_(1, ring, (local @ qg.sum(1)[..., None])[..., 0].float())
        q = qg * scale
        local = apply_rope(local.transpose(0, 1), cos[:n_local], sin[:n_local]).transpose(0, 1)
        logits = [apply_rope(q, cos[n_local - 1], sin[n_local - 1]) @ local.transpose(1, 2)]  # [Hkv, G, n_local]
        if not w.run:
            p = torch.softmax(logits[0].float(), dim=-1)
            return (p.to(values.dtype) @ values).view(hkv * g, d)
        qm = apply_rope(q, *self._memory_rotation(q.dtype, q.device))
        rank = (held[:, :, None] == ranked[:, None, :]).to(torch.uint8).argmax(-1)  # of each slot's block
        dropped = rank >= keep[:, None]  # [Hkv, slots]: past the head's cut-off
        cache = store.kv[:, :, w.span[0] : w.span[1]] if w.span else kv[:, :, n_near:]
        blocks = qm @ cache[0].transpose(1, 2)  # [Hkv, G, slots * ps]
        blocks.view(hkv, g, -1, ps).masked_fill_(dropped[:, None, :, None], float("-inf"))
        logits += [qm @ keys[:, n_local:n_near].transpose(1, 2), blocks]
        p = torch.softmax(torch.cat(logits, dim=-1).float(), dim=-1).to(values.dtype)
        out = p[..., :n_near] @ values[:, :n_near] + p[..., n_near:] @ cache[1]
        return out.view(hkv * g, d)

    def _select(self, store: KVStore, w: _Seq, layer: int, probe: Tensor) -> tuple[Tensor, Tensor]:
        """Rank the offloaded blocks by ``probe`` [Hkv, D] (the query at the memory distance)
        and make the head cache hold each KV head's best ones. Returns the ranking (absolute
        block indices [Hkv, slots], best first) and how many of them each head keeps after
        the dynamic cut-off (int64 [Hkv])."""
        scores, rank = self.ranked(store, w.seq_id, layer, probe, w.run)
        slots = self._seqs[w.seq_id].heads[layer]
        top = rank.topk(slots.held.shape[1], dim=1, sorted=True).indices.add_(w.run.start)  # best first
        fetch_head_pages(store, w.seq_id, layer, slots, top)
        return top, dynamic_blocks(scores, self.min_blocks, self.top_blocks)


def _codes(store: KVStore) -> tuple[Tensor, Tensor]:
    """The K and V pools as int8 rows of D: a pool slot is ``itemsize`` rows."""
    return tuple(t.view(torch.int8).view(t.shape[0], -1, t.shape[-1]) for t in (store.k, store.v))


def _kernel_runs(pool: Tensor) -> bool:
    """Whether block scores, the cut-off and decode attention run ``cpu_kernels.block_memory``
    (a float32 CPU pool)."""
    return pool.device.type == "cpu" and pool.dtype == torch.float32


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
