"""What a decode-attention policy decides, and the per-step metadata it reads.

A policy says which pages of a sequence stay on the device when the sequence offloads
(sinks, local window, and for its ``dense_layers`` everything), how many fetched pages its
page cache holds per layer, and computes decode attention in two parts: ``plan`` once per
decode step (every layer's tables, from host-side state) and ``run`` per layer (kernels
only, nothing read back). Its per-sequence state lives in the policy, created and freed
through the hooks (``on_admit``, ``on_qk``, ``on_offload``, ``on_layer_prefilled``,
``on_release``), reported by ``stats`` and saved by ``export_state``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from gpu_kernels import PagedTables
from hetero.backend import CPUBackend
from hetero.cache import OFFLOADED, KVStore, SeqPages
from hetero.config import ModelConfig


@dataclass(slots=True)
class DecodeStep:
    """What the engine knows of one decode step, on the host: the batch's sequences and
    their token counts (the new token included). Built once per step."""

    store: KVStore
    seq_ids: list[int]
    n_tokens: list[int]
    scale: float

    @property
    def tables(self) -> list[SeqPages]:
        return [self.store.tables[s] for s in self.seq_ids]


@dataclass(slots=True)
class LayerTables:
    """What the decode kernel reads of one layer: ``block_table`` [B, Hkv, P] and
    ``kv_lens`` [B, Hkv] (int32, device) and their host copy ``host``."""

    block_table: Tensor
    kv_lens: Tensor
    host: PagedTables


@dataclass(slots=True)
class StepPlan:
    """Everything a decode step's layers need, built once per step by :meth:`Policy.plan`
    before layer 0 runs: ``layers[l]`` the tables of layer ``l`` (the resident set, unless
    the policy's plan says otherwise). Policies that need more subclass it."""

    step: DecodeStep
    layers: list[LayerTables]


def pack_rows(step: DecodeStep, rows: dict[int, list[list[int]]]) -> dict[int, LayerTables]:
    """Tables of the layers in ``rows``: ``rows[l][b]`` lists the device pages sequence
    ``b`` attends to in layer ``l`` in token order, shared by its KV heads, the last one the
    sequence's last (partial) page. One upload for all the layers' pages and lengths."""
    if not rows:
        return {}
    store = step.store
    ps, hkv = store.page_size, store.cfg.n_kv_heads
    last = [n - (n - 1) // ps * ps for n in step.n_tokens]  # tokens in the last page
    width = max(len(r) for layer_rows in rows.values() for r in layer_rows)
    pages = [[r + [OFFLOADED] * (width - len(r)) for r in layer_rows] for layer_rows in rows.values()]
    lens = [[(len(r) - 1) * ps + t for r, t in zip(layer_rows, last)] for layer_rows in rows.values()]
    dev = store.device.tensor([[[*p, n] for p, n in zip(ps_l, ls_l)] for ps_l, ls_l in zip(pages, lens)],
                              torch.int32)  # [n_layers, B, width + 1]: pages, then the length
    b = len(step.seq_ids)
    return {
        layer: LayerTables(dev[i, :, None, :width].expand(b, hkv, width),
                           dev[i, :, width, None].expand(b, hkv),
                           PagedTables([[r] for r in layer_rows], [[n] * hkv for n in lens[i]]))
        for i, (layer, layer_rows) in enumerate(rows.items())
    }


@dataclass(slots=True)
class Policy(ABC):
    """Base of every policy: the resident set is ``n_sink`` first and ``n_local`` last
    tokens (page-aligned), plus every page of the first ``dense_layers`` layers; exact
    attention streams offloaded pages through the page cache ``stream_pages`` at a time."""

    name: ClassVar[str]
    raw_qk: ClassVar[bool] = False  # whether the engine calls on_qk
    # True: keys are stored before the rotary embedding and the policy places them itself
    # (InfLLM's bounded positions), so the model reads past its trained context; the engine
    # prefills window by window through every layer (attend_window) and decodes without RoPE
    bounded_positions: ClassVar[bool] = False
    # tokens per KV page: the LLM's page size unless one is given (the granularity of a
    # selection that picks pages)
    page_size: ClassVar[int] = 16
    n_sink: int = 4
    n_local: int = 64
    dense_layers: int = 0
    stream_pages: int = 64

    def __post_init__(self):
        for field in ("n_sink", "n_local", "dense_layers", "stream_pages"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{self.name}: {field} must be an integer >= 0, got {value!r}")
        if self.n_local < 1:
            raise ValueError(f"{self.name}: n_local must be >= 1 (the new token's page is local)")
        if self.stream_pages < 1:
            raise ValueError(f"{self.name}: stream_pages must be >= 1")

    # -- tiering -------------------------------------------------------------------------

    def offloads(self, fits: bool, n_tokens: int, page_size: int) -> bool:
        """Whether a sequence of up to ``n_tokens`` keeps only its resident set on the device;
        ``fits`` tells whether its whole KV fits the free device budget."""
        return True

    def cache_pages(self, cfg: ModelConfig, page_size: int, n_pages: int) -> int:
        """Pages of fetched (offloaded) KV a layer's page cache keeps between decode steps
        when a sequence has ``n_pages`` per layer."""
        return 0

    def offload_pages(self, n_pages: int, page_size: int) -> int:
        """Device pages a layer keeps for its offloaded pages (``on_offload``) when a
        sequence has ``n_pages`` per layer: none unless the policy keeps something of them."""
        return 0

    def sink_pages(self, page_size: int) -> int:
        """Leading pages that hold the attention sinks."""
        return -(-self.n_sink // page_size)

    def first_local(self, n_tokens: int, page_size: int) -> int:
        """First page of the local window; pages between the sinks and it are offloaded."""
        return max(self.sink_pages(page_size), (n_tokens - self.n_local) // page_size)

    def resident(self, layer: int, n_tokens: int, page_size: int) -> list[int]:
        """Page indices of one layer that stay on the device for a sequence of ``n_tokens``,
        in token order."""
        n_pages = -(-n_tokens // page_size)
        if layer < self.dense_layers:
            return list(range(n_pages))
        n_sink = min(n_pages, self.sink_pages(page_size))
        return [*range(n_sink), *range(self.first_local(n_tokens, page_size), n_pages)]

    def device_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int, chunk: int,
                     stream_prefill: bool = False) -> int:
        """Most device pages one offloading sequence of ``n_tokens`` holds at any time: while
        it is prefilled (:meth:`prefill_pages`) or decodes (:meth:`steady_pages`)."""
        return max(self.steady_pages(cfg, n_tokens, page_size),
                   self.prefill_pages(cfg, n_tokens, page_size, chunk, stream_prefill))

    def steady_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int) -> int:
        """Device pages one offloading sequence of ``n_tokens`` holds while it decodes: the
        dense layers whole, and the resident set, page cache and key metadata of every
        other layer."""
        n_pages = -(-n_tokens // page_size)
        n_dense = min(self.dense_layers, cfg.n_layers)
        cached = self._layer_share(n_pages, page_size) + self.cache_pages(cfg, page_size, n_pages)
        return n_dense * n_pages + (cfg.n_layers - n_dense) * cached

    def prefill_pages(self, cfg: ModelConfig, n_tokens: int, page_size: int, chunk: int,
                      stream_prefill: bool = False) -> int:
        """Most device pages an offloading sequence holds while it is prefilled, layer by
        layer: the dense layers whole, the layers done their resident set and metadata, and
        the layer at hand its whole KV, or with ``stream_prefill`` its resident set, a chunk
        and ``stream_pages`` of its prior KV streamed back."""
        n_pages = -(-n_tokens // page_size)
        n_dense = min(self.dense_layers, cfg.n_layers)
        if n_dense == cfg.n_layers:
            return n_dense * n_pages
        share = self._layer_share(n_pages, page_size)
        if stream_prefill:
            at_hand = share + chunk // page_size + 1 + self.stream_pages
        else:
            at_hand = n_pages + self.offload_pages(n_pages, page_size)
        return n_dense * n_pages + (cfg.n_layers - n_dense - 1) * share + at_hand

    def resident_share(self, n_pages: int, page_size: int) -> int:
        """Most resident pages an offloaded layer holds: sinks and the window (and the page
        that leaves it, and a partial one), never more than the sequence's pages and one."""
        return min(n_pages + 1, self.sink_pages(page_size) + self.n_local // page_size + 2)

    def _layer_share(self, n_pages: int, page_size: int) -> int:
        """Device pages an offloaded layer keeps: its resident pages, and what the policy
        keeps of its offloaded pages."""
        return self.resident_share(n_pages, page_size) + self.offload_pages(n_pages, page_size)

    # -- lifecycle hooks (no-ops unless a policy keeps state outside the store) ---------

    def bind(self, backend: CPUBackend, store: KVStore) -> None:
        """Called once by the facade with the execution backend (CPU workers) and the store."""

    def on_admit(self, store: KVStore, seq_id: int) -> None:
        """Called as a sequence is admitted (its page tables exist, nothing is written)."""

    def on_qk(self, layer: int, seq_ids: list[int], q: Tensor, k: Tensor) -> None:
        """One layer's queries [N, Hq, D] and keys [N, Hkv, D] *before* the rotary embedding:
        at decode one row per sequence of ``seq_ids``, at prefill a chunk of one sequence.
        Called only for a policy that sets ``raw_qk = True``."""

    def on_offload(self, store: KVStore, seq_id: int, layer: int, page_idx: list[int], k: Tensor) -> None:
        """Called by the engine as pages ``page_idx`` of one layer leave for the host tier,
        with their keys ``k`` [Hkv, n, page_size, D] (a device copy; the pages are free)."""

    def on_layer_prefilled(self, store: KVStore, seq_id: int, layer: int, settled: int) -> None:
        """Called by the engine as each layer finishes a prompt's last chunk, before the next
        layer runs: the layer's KV is written and, in sparse layers of an offloading
        sequence, its pages before ``settled`` are on the host tier."""

    def on_release(self, seq_id: int) -> None:
        """Called by the engine before a sequence's KV is freed."""

    def stats(self, seq_id: int | None = None) -> dict[str, Any]:
        """The policy's figures (e.g. bytes of the state it keeps) of one sequence, read as
        its request finishes, before ``on_release`` (``RequestStats.policy``), or with
        ``None`` of all live sequences (``LLM.memory_report()["policy"]``). JSON-ready
        values."""
        return {}

    def export_state(self, seq_id: int) -> dict[str, Tensor]:
        """The policy's per-sequence state as named CPU tensors (saved with the sequence's
        KV), so that :meth:`import_state` restores it; empty for a stateless policy."""
        return {}

    def import_state(self, store: KVStore, seq_id: int, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`export_state` returned into admitted sequence ``seq_id``,
        whose KV is in the store as when it was exported."""
        if state:
            raise ValueError(f"{self.name} keeps no per-sequence state, got {sorted(state)}")

    # -- prefill, for a policy with bounded positions ----------------------------------------

    def attend_window(self, store: KVStore, seq_id: int, layer: int, start: int, q: Tensor, k: Tensor,
                      scale: float, last: bool = False) -> Tensor:
        """Attention output [C, Hq, D] of one prefill window's queries ``q`` [C, Hq, D] at
        positions ``start ..`` in ``layer``; its keys ``k`` [C, Hkv, D] and values are in the
        store (q and k before the rotary embedding); ``last``: the prompt's last window. Only
        for ``bounded_positions``."""
        raise NotImplementedError(f"{self.name} has no windowed prefill")

    # -- decode: plan once per step, run per layer ----------------------------------------

    def plan(self, step: DecodeStep) -> StepPlan:
        """Called once per decode step before the layers run: build, from host-side state,
        every table the layers will read (as device tensors). The default: each layer's
        resident set."""
        return StepPlan(step, self.resident_tables(step))

    @abstractmethod
    def run(self, layer: int, q: Tensor, plan: StepPlan) -> Tensor:
        """Attention output [B, Hq, D] for queries ``q`` [B, Hq, D] of one layer (its k and v
        are in the store). Launches work; never reads a device tensor on the host."""

    def resident_tables(self, step: DecodeStep) -> list[LayerTables]:
        """Every layer's tables over its resident set (:meth:`resident_pages`)."""
        tables = step.tables
        return self.layer_tables(step, {
            layer: [self.resident_pages(t, layer) for t in tables]
            for layer in range(step.store.cfg.n_layers) if any(t.offloads_layer(layer) for t in tables)
        })

    def layer_tables(self, step: DecodeStep, rows: dict[int, list[list[int]]]) -> list[LayerTables]:
        """Every layer's tables: the layers in ``rows`` packed from those page lists
        (:func:`pack_rows`, one upload); every other layer reads the whole of each
        sequence's pages from the store's device page tables (a layer no sequence of the
        batch has offloaded: dense layers, sequences that do not offload)."""
        store, hkv, n_layers = step.store, step.store.cfg.n_kv_heads, step.store.cfg.n_layers
        tables, b = step.tables, len(step.seq_ids)
        packed = pack_rows(step, rows)
        if len(packed) == n_layers:
            return [packed[layer] for layer in range(n_layers)]
        width = max(t.n_pages for t in tables)
        pages = store.block_tables(step.seq_ids, width)  # [L, B, width]
        lens = store.device.tensor(step.n_tokens, torch.int32)[:, None].expand(b, hkv)
        host_lens = [[n] * hkv for n in step.n_tokens]
        return [packed[layer] if layer in packed else
                LayerTables(pages[layer, :, None].expand(b, hkv, width), lens,
                            PagedTables([[t.layers[layer]] for t in tables], host_lens))
                for layer in range(n_layers)]

    def resident_pages(self, table: SeqPages, layer: int) -> list[int]:
        """Device pages holding the tokens of one layer, in token order: the resident set,
        and pages that left the window during this step (the engine offloads them after
        it), so that with the offloaded run (``SeqPages.offloaded``) they cover every
        token."""
        pages = table.layers[layer][: -(-table.n_tokens // table.page_size)]
        if table.offloads_layer(layer):
            run = table.offloaded
            pages = pages[: run.start] + pages[run.stop :]
        return pages


class PagedState:
    """Mixin of a policy that keeps per-sequence state in store pages: ``_seqs`` maps a
    sequence to a state whose ``pages()`` lists them, ``_store`` is the store. Frees them on
    release and reports their bytes."""

    __slots__ = ()

    def on_release(self, seq_id: int) -> None:
        state = self._seqs.pop(seq_id, None)
        if state is not None:
            self._store.free(state.pages())

    def stats(self, seq_id: int | None = None) -> dict:
        """Device bytes of the state the policy keeps (of one sequence, or all)."""
        states = list(self._seqs.values()) if seq_id is None else [self._seqs.get(seq_id)]
        n_pages = sum(len(s.pages()) for s in states if s is not None)
        return {"state_bytes": n_pages * (self._store.page_bytes if self._store else 0)}

