"""The Llama-family transformer: embeddings, decoder blocks, final norm, LM head.

The model knows nothing about caches or policies. Each attention layer computes q, k, v and
RoPE, then hands them to ``attend(layer, q, k, v)``, supplied by the engine for the step at
hand (prefill chunk or decode batch), which stores k, v and returns the attention output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hetero.config import ModelConfig

AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""``attend(layer, q [N, Hq, D], k [N, Hkv, D], v [N, Hkv, D]) -> out [N, Hq, D]``."""
QKFn = Callable[[int, Tensor, Tensor], None]
"""``on_qk(layer, q [N, Hq, D], k [N, Hkv, D])``: a layer's q and k before RoPE."""


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [head_dim // 2] (float32), with the llama3 scaling if configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    rs = cfg.rope_scaling
    if rs is not None:  # llama3: stretch low frequencies, keep high ones, blend between
        factor = rs["factor"]
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, blended, inv_freq)
    return inv_freq.float()


class Rope:
    """Rotary embedding with HF's half-rotation layout; cos/sin tables grow on demand."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq = rope_inv_freq(cfg)
        self._cos = self._sin = None

    def tables(self, positions: Tensor, dtype: torch.dtype, bound: int | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin [N, 1, head_dim] for ``positions`` [N], all below ``bound`` (a Python int
        the caller knows; without it the positions are read back to find it)."""
        self._grow(int(positions.max()) + 1 if bound is None else bound, dtype, positions.device)
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)

    def span(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin [n, 1, head_dim] of positions ``0 .. n-1`` (views, no gather)."""
        self._grow(n, dtype, device)
        return self._cos[:n, None], self._sin[:n, None]

    def _grow(self, need: int, dtype: torch.dtype, device: torch.device) -> None:
        stale = self._cos is None or self._cos.dtype != dtype or self._cos.device != device
        if stale or self._cos.shape[0] < need:
            n = max(need, 4096, 0 if stale else 2 * self._cos.shape[0])
            t = torch.arange(n, dtype=torch.float32, device="cpu")
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = emb.cos().to(device, dtype)
            self._sin = emb.sin().to(device, dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_size, self.kv_size = cfg.n_heads * hd, cfg.n_kv_heads * hd
        self.attn_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.wqkv = nn.Linear(d, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.wo = nn.Linear(self.q_size, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.w13 = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)  # gate | up
        self.w2 = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, attend: AttendFn,
                on_qk: QKFn | None = None) -> Tensor:
        """``cos``, ``sin`` None: q and k reach ``attend`` before the rotary embedding."""
        cfg = self.cfg
        n = x.shape[0]
        qkv = self.wqkv(self.attn_norm(x))
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q, k = q.view(n, cfg.n_heads, cfg.head_dim), k.view(n, cfg.n_kv_heads, cfg.head_dim)
        if on_qk is not None:
            on_qk(self.layer, q, k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(n, cfg.n_kv_heads, cfg.head_dim)
        x = x + self.wo(attend(self.layer, q, k, v).reshape(n, self.q_size))
        gate, up = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w2(F.silu(gate) * up)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = Rope(cfg)

    def forward(self, tokens: Tensor, positions: Tensor | None, attend: AttendFn, bound: int | None = None,
                on_qk: QKFn | None = None) -> Tensor:
        """Final-normed hidden states [N, hidden] for ``tokens`` [N] at ``positions`` [N]
        (all below ``bound`` if given, which spares reading them back); ``positions`` None:
        no rotary embedding, ``attend`` places q and k itself. ``on_qk`` sees each layer's q
        and k before the rotary embedding."""
        x = self.embed(tokens)
        cos, sin = (None, None) if positions is None else self.rope.tables(positions, x.dtype, bound)
        for block in self.blocks:
            x = block(x, cos, sin, attend, on_qk)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load HF Llama parameter names (``model.layers.N.self_attn.q_proj.weight``, ...).

        Raises ``ValueError`` naming the tensor when a name is missing or a shape differs.
        """
        cfg = self.cfg
        sd = dict(sd)

        def take(name: str) -> Tensor:
            if name not in sd:
                raise ValueError(f"checkpoint has no tensor {name!r}")
            return sd.pop(name)

        def put(param: Tensor, value: Tensor, name: str) -> None:
            if param.shape != value.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(value.shape)}, the config implies "
                    f"{tuple(param.shape)}: config.json and weights do not match"
                )
            param.copy_(value)

        if cfg.tie_word_embeddings:  # re-tie: moving a module between devices unties
            self.lm_head.weight = self.embed.weight
        put(self.embed.weight, take("model.embed_tokens.weight"), "model.embed_tokens.weight")
        put(self.norm.weight, take("model.norm.weight"), "model.norm.weight")
        if not cfg.tie_word_embeddings:
            put(self.lm_head.weight, take("lm_head.weight"), "lm_head.weight")
        sd.pop("lm_head.weight", None)
        for i, b in enumerate(self.blocks):
            p = f"model.layers.{i}."
            qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            put(b.wqkv.weight, torch.cat(qkv), p + "self_attn.{q,k,v}_proj.weight")
            if cfg.attention_bias:
                bias = [take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
                put(b.wqkv.bias, torch.cat(bias), p + "self_attn.{q,k,v}_proj.bias")
            put(b.wo.weight, take(p + "self_attn.o_proj.weight"), p + "self_attn.o_proj.weight")
            gate_up = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
            put(b.w13.weight, gate_up, p + "mlp.{gate,up}_proj.weight")
            put(b.w2.weight, take(p + "mlp.down_proj.weight"), p + "mlp.down_proj.weight")
            put(b.attn_norm.weight, take(p + "input_layernorm.weight"), p + "input_layernorm.weight")
            put(
                b.mlp_norm.weight,
                take(p + "post_attention_layernorm.weight"),
                p + "post_attention_layernorm.weight",
            )
        leftover = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ValueError(
                f"checkpoint has {len(leftover)} tensors this architecture does not use, "
                f"e.g. {leftover[:3]}: is it really a {cfg.model_type} model?"
            )
