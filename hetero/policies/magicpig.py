"""MagicPIG (LSH sampling): the device attends over sinks + local window, a CPU worker
samples the offloaded keys through SimHash tables and computes the importance-corrected
rest; the two partials merge by LSE. See DESIGN.md, "MagicPIG", and ``cpu_kernels.lsh``.

Per sparse layer (the first ``dense_layers`` stay exact on the device):

- prefill (``on_prefill_layer_done``): as each layer finishes the prompt (an offloading
  sequence is prefilled layer by layer) and its pages have landed on the host, the
  backend starts building, per KV head, ``lsh_l`` tables of ``lsh_k``-bit buckets over the
  layer's offloaded keys centred by their mean (one pool task per layer), while the device
  moves on to the next layer, samples the first token and starts decoding; a layer's first
  decode step waits for its build only;
- decode: the device hashes the queries (``gpu_kernels.simhash_codes``, no centre: the
  kernels' convention), ships q and codes to the worker, attends over its resident set
  meanwhile, and merges the worker's ``(out, lse)``. Pages offloaded after the build are
  attended exactly by the worker; once that tail reaches ``REBUILD_TAIL`` tokens the tables
  are rebuilt in the background.

Defaults for head_dim 64: K=8, L=75 (the paper's K=10, L=150 are for head_dim 128).
Measured on SmolLM2-135M (head_dim 64), 2k tokens of GPL-3, 8 decode steps, relative
attention-output error over the 28 sparse layers, keys touched per head = sinks + window
(~83) + sampled; quest and streaming at the same number of keys:

  K    L  sampled  touched  error  quest  streaming  table bytes per key and KV head
 10  150     2.8%     6.8%  0.196  0.294      0.354  600
  9  100     3.8%     7.8%  0.186                    400
  8   75     6.5%    10.3%  0.153  0.232      0.328  300
  7   50     8.8%    12.5%  0.147  0.214      0.310  200
  8   40     2.3%     6.3%  0.278                    160
  6   30    10.8%    14.4%  0.153                    120

(sampled: share of the offloaded keys; touched: share of all keys.)

K=8, L=75 halves the paper's table memory (300 bytes per key and KV head, below the 512 of
fp32 K and V) and, sampling ~6% of the offloaded keys instead of ~3%, lowers the error
from 0.196 to 0.153; fewer tables at the same K (L=40) miss relevant keys and the error
jumps. At 2k, sampling beats quest's page top-k and streaming at every budget above. At
4k-16k (``hetero bench fidelity``, same keys touched) it beats streaming everywhere and
quest only at 8k (0.083 against 0.115), and token top-k by exact scores (an oracle) is
4-16x more accurate than either: on this model, attention is sparse enough for top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from gpu_kernels import merge_partials, paged_decode_attention, simhash_codes
from hetero.backend import CPUBackend, LSHSpec
from hetero.cache import KVStore
from hetero.policies.base import DecodeStep, Policy, pack_tables

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
    _backend: CPUBackend | None = field(default=None, init=False, repr=False)
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
        self._backend, self._built = backend, {}
        backend.start_lsh(LSHSpec(self.lsh_k, self.lsh_l, cfg.head_dim**-0.5, proj))

    def on_prefill_layer_done(self, store: KVStore, seq_id: int, layer: int, settled: int) -> None:
        if layer in self._proj and store.tables[seq_id].offload:
            self._build(store, seq_id, [layer], settled)

    def on_release(self, seq_id: int) -> None:
        if self._built.pop(seq_id, None) is not None:
            self._backend.release(seq_id)

    def _build(self, store: KVStore, seq_id: int, layers: list[int], settled: int) -> None:
        """Submit a (re)build of ``layers``' tables over the tokens offloaded before page
        ``settled``."""
        if self._backend is None:
            raise ValueError("magicpig needs a CPU backend: create it through LLM(...), or call "
                             "policy.bind(backend, store) first")
        ps = store.page_size
        lo, hi = self.sink_pages(ps) * ps, max(settled, self.sink_pages(ps)) * ps
        host = store.host_tier(seq_id)  # the layers' copies to the host have landed
        for layer in layers:
            self._backend.submit_build(seq_id, layer, host[layer, 0], host[layer, 1], lo, hi)
        self._built[seq_id] = hi

    # -- decode --------------------------------------------------------------------------

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        store = step.store
        ps, hkv, device = store.page_size, store.cfg.n_kv_heads, store.device
        tables = [store.tables[s] for s in step.seq_ids]
        # sequences with offloaded tokens in this layer (the dense layers keep theirs)
        cpu = [b for b, t in enumerate(tables) if layer >= self.dense_layers and t.offloaded]
        future = None
        if cpu:
            if self._backend is None:
                raise ValueError("magicpig needs a CPU backend: create it through LLM(...), or call "
                                 "policy.bind(backend, store) first")
            if layer == min(self._proj):
                for b in cpu:
                    self._maybe_rebuild(store, step.seq_ids[b])
            sel = q[cpu]
            codes = simhash_codes(sel, self._proj[layer], self.lsh_k, self.lsh_l)  # [n, Hq, L]
            q_host = device.host_empty(sel.shape, torch.float32)
            codes_host = device.host_empty(codes.shape, codes.dtype)
            device.to_host(q_host, sel.float())
            device.to_host(codes_host, codes)
            device.host_sync()  # the worker reads q, codes and the pages offloaded so far
            future = self._backend.submit_attend(layer, [step.seq_ids[b] for b in cpu], q_host, codes_host,
                                                 [tables[b].offloaded.stop * ps for b in cpu])
        # meanwhile, the resident set (everything, for dense layers) on the device
        rows = [self.resident_pages(t, layer) for t in tables]
        bt, lens, host = pack_tables(rows, [t.n_tokens for t in tables], ps, hkv, q.device)
        out, lse = paged_decode_attention(q, store.k, store.v, bt, lens, step.scale, ps, host)
        if future is None:
            return out
        cpu_out = torch.zeros_like(out)
        cpu_lse = torch.full_like(lse, float("-inf"))
        o, s = future.result()
        for i, b in enumerate(cpu):
            device.to_device(cpu_out[b], o[i])
            device.to_device(cpu_lse[b], s[i])
        return merge_partials((out, lse), (cpu_out, cpu_lse))[0]

    def _maybe_rebuild(self, store: KVStore, seq_id: int) -> None:
        """Rebuild a sequence's tables once the exactly attended tail outgrows them."""
        built, settled = self._built.get(seq_id), store.tables[seq_id].settled
        # None: offloaded after a prompt that offloaded nothing
        if built is None or settled * store.page_size - built >= REBUILD_TAIL:
            self._build(store, seq_id, list(self._proj), settled)
