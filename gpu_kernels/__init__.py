"""Attention kernels for the device: Triton on CUDA, fast torch paths on CPU.

Every op returns ``(out, lse)`` partials that combine exactly with ``merge_partials``.
"""

from .decode import PagedTables, paged_decode_attention
from .gather import gather_head_pages
from .merge import merge_partials
from .prefill import prefill_attention, prior_attention
from .quest import quest_page_scores
from .simhash import simhash_codes

__all__ = ["PagedTables", "merge_partials", "paged_decode_attention", "prefill_attention", "prior_attention"]
__all__ += ["gather_head_pages", "quest_page_scores", "simhash_codes"]
