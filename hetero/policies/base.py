"""What a decode-attention policy sees and must return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from hetero.cache import KVStore


@dataclass(slots=True)
class DecodeStep:
    """Per-step metadata shared by every layer of one decode step (built once per step).

    ``block_tables`` [L, B, Hkv, P] int32 device page ids (-1 pads); ``kv_lens`` [B, Hkv]
    int32 tokens held in those pages, the new token included.
    """

    store: KVStore
    seq_ids: list[int]
    block_tables: Tensor
    kv_lens: Tensor
    scale: float


class Policy:
    """Decides, per layer and step, which KV takes part in decode attention and where."""

    name: ClassVar[str]

    def attend_decode(self, layer: int, q: Tensor, step: DecodeStep) -> Tensor:
        """Attention output [B, Hq, D] for queries ``q`` [B, Hq, D] of one layer."""
        raise NotImplementedError  # abstract
