"""numba kernels for the CPU workers: MagicPIG's LSH tables and sampled attention (``lsh``).

Every attention op returns ``(out, lse)`` partials that merge exactly with the device's
(``gpu_kernels.merge_partials``).
"""

from .lsh import (
    LSHTables, build_tables, centred_norms, lsh_attention, probe, sampled_attention, simhash_codes,
)

__all__ = [
    "LSHTables", "build_tables", "centred_norms", "lsh_attention", "probe", "sampled_attention",
    "simhash_codes",
]
