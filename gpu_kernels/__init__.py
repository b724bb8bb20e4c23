"""Attention kernels for the device: Triton on CUDA, fast torch paths on CPU.

Every attention op returns ``(out, lse)`` partials that combine exactly with ``merge_partials``.
``quant_linear`` multiplies by a block-quantised weight (``cpu_kernels.quant``'s layout).
"""

from .decode import PagedTables, paged_decode_attention
from .gather import gather_head_pages
from .merge import merge_partials
from .prefill import prefill_attention, prior_attention
from .quant_gemv import quant_linear
from .quest import quest_page_scores
from .simhash import simhash_codes

__all__ = ["PagedTables", "merge_partials", "paged_decode_attention", "prefill_attention", "prior_attention"]
__all__ += ["gather_head_pages", "quant_linear", "quest_page_scores", "simhash_codes"]
