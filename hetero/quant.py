"""Linear layers over block-quantised weights (``LLM(weights="quantized")`` or a format).

``quantize_linears`` swaps the model's ``nn.Linear`` layers for :class:`QuantLinear` where
blocks are given for their weights (``cpu_kernels.quant``: GGUF's Q4_0, Q4_1, Q8_0): a GGUF's
own (``hetero.loader.read_gguf_blocks``) or any checkpoint's quantised at load
(:func:`quantize_weights`); the fused q/k/v and gate/up projections from their parts, the LM
head from the tied embedding when there is none of its own. A few rows (decode) go through a
GEMV that reads 1.25 bytes per weight (numba on the CPU, Triton on CUDA); a prefill chunk
dequantises the weight once per call and runs the device's matmul (the weight's read is
small beside a chunk's arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpu_kernels.quant import QuantBlocks, gemv, quantize
from gpu_kernels.quant_gemv import dequantize, quant_linear
from hetero.model import Transformer

GEMV_ROWS = 8
"""Most input rows that go through the GEMV (decode batches); more are a prefill chunk."""


class QuantLinear(nn.Module):
    """``y = x @ W.T`` (no bias) with ``W`` held as block codes ``q`` (int8 [out, in]) and
    per-block ``d``, ``m`` (float32 [out, in / 32]) on the model's device.

    Decode rows (at most :data:`GEMV_ROWS`) go through a GEMV that reads the codes: on CUDA
    ``gpu_kernels.quant_linear`` (Triton), on the CPU ``cpu_kernels.quant.gemv`` (numba,
    int16 activations, float32). More rows (a prefill chunk) dequantise the weight and use
    the device's matmul."""

    def __init__(self, blocks: QuantBlocks, device: torch.device | str = "cpu"):
        super().__init__()
        for name, a in zip(("q", "d", "m"), blocks):
            self.register_buffer(name, torch.from_numpy(a).to(device))
        self.out_features, self.in_features = blocks.q.shape

    @property
    def blocks(self) -> QuantBlocks:
        """The codes and scales as numpy views (CPU)."""
        return QuantBlocks(self.q.numpy(), self.d.numpy(), self.m.numpy())

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] > GEMV_ROWS:
            out = F.linear(rows, self.dequantize(rows.dtype))
        elif _on_gpu(rows):
            out = quant_linear(rows, self.q, self.d, self.m)
        else:
            out = torch.from_numpy(gemv(self.blocks, rows.float().contiguous().numpy())).to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight [out, in] in ``dtype``, on the codes' device."""
        return dequantize(self.q, self.d, self.m).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks of 32"


def _on_gpu(x: Tensor) -> bool:
    """Whether ``x`` takes the device GEMV (tests point the CPU at it)."""
    return x.is_cuda


def _cat(parts: list[QuantBlocks]) -> QuantBlocks:
    return QuantBlocks(*(np.concatenate(a) for a in zip(*parts)))


def quantize_weights(state_dict: dict[str, Tensor], kind: str) -> dict[str, QuantBlocks]:
    """The linear layers' weights of an HF state dict (``*_proj.weight``, the LM head or the
    embedding it is tied to) quantised to ``kind`` (Q4_0, Q4_1 or Q8_0) at load."""
    linear = [n for n, t in state_dict.items() if t.dim() == 2 and t.shape[1] % 32 == 0 and
              (n.endswith("_proj.weight") or n in ("lm_head.weight", "model.embed_tokens.weight"))]
    return {n: quantize(state_dict[n].float().numpy(), kind) for n in linear}


def quantize_linears(model: Transformer, blocks: dict[str, QuantBlocks]) -> int:
    """Swap every linear layer of ``model`` whose weights ``blocks`` holds (HF names) for a
    :class:`QuantLinear`; returns how many were swapped. A layer is swapped only if all its
    parts are there, and never one with a bias."""
    swapped = 0

    def swap(module: nn.Module, attr: str, names: list[str]) -> None:
        nonlocal swapped
        linear = getattr(module, attr)
        if linear.bias is None and all(n in blocks for n in names):
            setattr(module, attr, QuantLinear(_cat([blocks[n] for n in names]), linear.weight.device))
            swapped += 1

    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        swap(b, "wqkv", [p + f"self_attn.{n}_proj.weight" for n in "qkv"])
        swap(b, "wo", [p + "self_attn.o_proj.weight"])
        swap(b, "w13", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        swap(b, "w2", [p + "mlp.down_proj.weight"])
    head = "lm_head.weight" if "lm_head.weight" in blocks or not model.cfg.tie_word_embeddings \
        else "model.embed_tokens.weight"
    swap(model, "lm_head", [head])
    return swapped
