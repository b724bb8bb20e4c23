"""hetero: long-context LLM inference with the KV cache split between device and host."""

from hetero.llm import LLM
from hetero.outputs import LogprobsOutput, Output, RequestStats
from hetero.sampling import SamplingParams

__all__ = ["LLM", "LogprobsOutput", "Output", "RequestStats", "SamplingParams"]
