"""MagicPIG (LSH sampling): the device attends over sinks + local window, a CPU worker
samples the offloaded keys through SimHash tables and computes the importance-corrected
rest; the two partials merge by LSE. See docs/architecture.md ("CPU workers") and
``cpu_kernels.lsh``.

Per sparse layer (the first ``dense_layers`` stay exact on the device):

- prefill (``on_layer_prefilled``): as each layer finishes the prompt (an offloading
  sequence is prefilled layer by layer), the workers start building, per KV head,
  ``lsh_l`` tables of ``lsh_k``-bit buckets over the layer's offloaded keys centred by their
  mean (one background task per layer, which waits for the layer's pages to land on the
  host), while the device moves on to the next layer, samples the first token and starts
  decoding; a layer's first decode step waits for its build only;
- decode (``run``): the device hashes the queries (``gpu_kernels.simhash_codes``, no centre:
  the kernels' convention), copies q and codes to the host and submits the worker's share
  without waiting for the copies (the worker waits for them), attends over the resident set
  (the step plan's tables) meanwhile, and merges the worker's ``(out, lse)``. Pages
  offloaded after the build are attended exactly by the worker; once that tail reaches
  ``REBUILD_TAIL`` tokens the tables are rebuilt in the background.

The workers are reached through MagicPIG's protocol (``hetero.policies.lsh_protocol``) over
whichever backend the facade made (``hetero.backend``).

Defaults for head_dim 64: K=8, L=75 (the paper's K=10, L=150 are for head_dim 128): half
the paper's table memory (300 bytes per key and KV head, below the 512 of fp32 K and V) and
about twice its sample (~6% of the offloaded keys instead of ~3%), which lowered the
attention error on SmolLM2-135M; fewer tables at the same K miss relevant keys. The
measurements: docs/benchmarks.md, "MagicPIG parameters (K, L)".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpu_kernels import merge_partials, paged_decode_attention, simhash_codes
from hetero.backend import CPUBackend
from hetero.cache import KVStore
from hetero.policies.base import Policy, StepPlan
from hetero.policies.lsh_protocol import LSHClient, LSHSpec

# Offloaded tokens past the tables (attended exactly) before they are rebuilt: the exact
# tail then costs about what the sample of a few thousand keys does, and a rebuild (tens of
# ms per layer at 16k tokens, in the background) comes every REBUILD_TAIL steps.
REBUILD_TAIL = 512


@dataclass(slots=True)
class MagicPIGPolicy(Policy):
    """``lsh_k`` bits per table (0..16; 0 samples every key), ``lsh_l`` tables (>= 2),
    ``seed`` of the per-layer random projections ``R`` [head_dim, K*L]."""

    name = "magicpig"
    lsh_k: int = 8
    lsh_l: int = 75
    n_sink: int = 4
    n_local: int = 64
    dense_layers: int = 2
    seed: int = 0
    lsh: LSHClient | None = field(default=None, init=False, repr=False)  # the workers, once bound
    _n_layers: int = field(default=0, init=False, repr=False)
    _proj: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)  # device R
    _built: dict[int, int] = field(default_factory=dict, init=False, repr=False)  # seq -> hi

    def __post_init__(self):
        Policy.__post_init__(self)
        for name in ("lsh_k", "lsh_l", "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"magicpig: {name} must be an integer, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ValueError(f"magicpig: seed must be >= 0, got {self.seed}")
        if not 0 <= self.lsh_k <= 16:
            raise ValueError(f"magicpig: lsh_k (bits per table) must be in [0, 16], got {self.lsh_k}")
        if self.lsh_l < 2:
            raise ValueError(f"magicpig: lsh_l (tables) must be >= 2: a key is sampled when it collides "
                             f"in 2 of them, got {self.lsh_l}")

    # -- set-up and lifecycle ------------------------------------------------------------

    def bind(self, backend: CPUBackend, store: KVStore) -> None:
        # float32 KV is read in place by the CPU workers; half KV is converted by them
        if store.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"magicpig needs float32, bfloat16 or float16 KV, got {store.dtype}")
        cfg = store.cfg
        d, kl = cfg.head_dim, self.lsh_k * self.lsh_l
        proj = {layer: np.random.default_rng([self.seed, layer]).standard_normal((d, kl), dtype=np.float32)
                for layer in range(self.dense_layers, cfg.n_layers)}
        self._proj = {layer: torch.from_numpy(r).to(store.device.device) for layer, r in proj.items()}
        self._built, self._n_layers = {}, cfg.n_layers
        self.lsh = LSHClient(backend, LSHSpec(self.lsh_k, self.lsh_l, cfg.head_dim**-0.5, proj))

    def on_layer_prefilled(self, store: KVStore, seq_id: int, layer: int, settled: int) -> None:
        if layer in self._proj and store.tables[seq_id].offload:
            self._build(store, seq_id, [layer], settled)

    def on_release(self, seq_id: int) -> None:
        if self._built.pop(seq_id, None) is not None:
            self.lsh.release(seq_id)

    def stats(self, seq_id: int | None = None) -> dict[str, Any]:
        """Bytes of the workers' LSH state (tables, key norms, centres) of one sequence, or
        of all live ones: in all, and per layer of the model (0 for the dense layers)."""
        per = {} if self.lsh is None else self.lsh.table_bytes(seq_id)
        per_layer = [int(per.get(layer, 0)) for layer in range(self._n_layers)]
        return {"lsh_table_bytes": sum(per_layer), "lsh_table_bytes_per_layer": per_layer}

    def key_counts(self) -> tuple[int, int]:
        """Keys the workers' attention read (sampled and exact tail) and offloaded keys it
        could have read, summed over query heads and calls since :meth:`bind`."""
        return (0, 0) if self.lsh is None else self.lsh.key_counts()

    def _client(self) -> LSHClient:
        if self.lsh is None:
            raise ValueError("magicpig needs a CPU backend: create it through LLM(...), or call "
                             "policy.bind(backend, store) first")
        return self.lsh

    def _build(self, store: KVStore, seq_id: int, layers: list[int], settled: int) -> None:
        """Submit a (re)build of ``layers``' tables over the tokens offloaded before page
        ``settled``."""
        lsh = self._client()
        ps = store.page_size
        lo, hi = self.sink_pages(ps) * ps, max(settled, self.sink_pages(ps)) * ps
        # the workers wait for the copies into the host tier issued so far, not this thread
        host, ready = store.host[seq_id], store.device.copy_event()
        for layer in layers:
            lsh.build(seq_id, layer, host[layer, 0], host[layer, 1], lo, hi, ready)
        self._built[seq_id] = hi

    # -- decode --------------------------------------------------------------------------

    def run(self, layer: int, q: Tensor, plan: StepPlan) -> Tensor:
        step, store = plan.step, plan.step.store
        ps, device, tables = store.page_size, store.device, step.tables
        # sequences with offloaded tokens in this layer (the dense layers keep theirs)
        cpu = [b for b, t in enumerate(tables) if layer >= self.dense_layers and t.offloaded]
        future = None
        if cpu:
            lsh = self._client()
            if layer == min(self._proj):
                for b in cpu:
                    self._maybe_rebuild(store, step.seq_ids[b])
            sel = q if len(cpu) == len(tables) else q[cpu]
            codes = self.hash(layer, sel)
            q_host = device.host_empty(sel.shape, torch.float32)
            codes_host = device.host_empty(codes.shape, codes.dtype)
            device.to_host(q_host, sel.float())
            device.to_host(codes_host, codes)
            # no wait here: the worker side waits for the copies (q, codes and the pages
            # offloaded so far) before reading them (a remote backend just before sending)
            future = lsh.attend(layer, [step.seq_ids[b] for b in cpu], q_host, codes_host,
                                [tables[b].offloaded.stop * ps for b in cpu], device.copy_event())
        # meanwhile, the resident set (everything, for dense layers) on the device
        lt = plan.layers[layer]
        out, lse = paged_decode_attention(q, store.k, store.v, lt.block_table, lt.kv_lens, step.scale, ps,
                                          lt.host)
        if future is None:
            return out
        o, s = future.result()  # waits for the CPU's share, not for the device
        if len(cpu) == len(tables):
            cpu_out, cpu_lse = torch.empty_like(out), torch.empty_like(lse)
            device.to_device(cpu_out, o)
            device.to_device(cpu_lse, s)
        else:
            cpu_out, cpu_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
            for i, b in enumerate(cpu):
                device.to_device(cpu_out[b], o[i])
                device.to_device(cpu_lse[b], s[i])
        return merge_partials((out, lse), (cpu_out, cpu_lse))[0]

    def hash(self, layer: int, q: Tensor) -> Tensor:
        """The SimHash codes [n, Hq, L] of queries ``q`` [n, Hq, D] of a sparse layer, as the
        workers receive them."""
        return simhash_codes(q, self._proj[layer], self.lsh_k, self.lsh_l)

    def _maybe_rebuild(self, store: KVStore, seq_id: int) -> None:
        """Rebuild a sequence's tables once the exactly attended tail outgrows them."""
        built, settled = self._built.get(seq_id), store.tables[seq_id].settled
        # None: offloaded after a prompt that offloaded nothing
        if built is None or settled * store.page_size - built >= REBUILD_TAIL:
            self._build(store, seq_id, list(self._proj), settled)
