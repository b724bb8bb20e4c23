"""hetero: long-context LLM inference with the KV cache split between device and host."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The public names load on first use (PEP 562), so ``import hetero`` does not import torch:
# the ``hetero`` command imports this package before it can catch Ctrl-C, and its argument
# errors and ``--help`` need no model stack.
_EXPORTS = {
    "LLM": "hetero.llm",
    "LogprobsOutput": "hetero.outputs",
    "Output": "hetero.outputs",
    "RequestStats": "hetero.outputs",
    "SamplingParams": "hetero.sampling",
}

__all__ = ["LLM", "LogprobsOutput", "Output", "RequestStats", "SamplingParams"]

if TYPE_CHECKING:
    from hetero.llm import LLM
    from hetero.outputs import LogprobsOutput, Output, RequestStats
    from hetero.sampling import SamplingParams


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hetero' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
