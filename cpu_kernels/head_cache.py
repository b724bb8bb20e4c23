"""A per-KV-head page cache on the CPU device: one call updates which offloaded pages each
head holds and copies the ones it picks anew (the CPU twin of the device path in
``hetero.policies.quest``, which does the same with tensor ops and
``gpu_kernels.gather_head_pages``).

The cache of one layer is ``k`` device pages ``first``; in KV head ``h``, page ``first[j]``
holds offloaded page ``held[h, j]`` (-1: nothing). Given each head's ``k`` distinct picks, a
head keeps the pages it holds and still picks where they are, and copies each new pick into
a slot whose page it no longer picks. Pages are copied as raw bits, so any dtype works.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def _update(host, pool, held, first, picks, page_size):  # pragma: no cover - compiled
    hkv, k = picks.shape
    n_host = host.shape[2] // page_size
    mark = np.zeros(n_host, dtype=np.bool_)
    misses = 0
    for h in range(hkv):
        for j in range(k):
            mark[picks[h, j]] = True
        free = np.empty(k, dtype=np.int64)  # slots whose page is no longer picked
        n_free = 0
        for j in range(k):
            p = held[h, j]
            if p >= 0 and mark[p]:
                mark[p] = False  # held and still picked: stays; not a new pick
            else:
                free[n_free] = j
                n_free += 1
        f = 0
        for j in range(k):
            p = picks[h, j]
            if mark[p]:  # a new pick: into the next free slot
                mark[p] = False
                slot = free[f]
                f += 1
                held[h, slot] = p
                dst, src = first[slot] * page_size, p * page_size
                for kv in range(2):
                    pool[kv, h, dst : dst + page_size] = host[kv, h, src : src + page_size]
                misses += 1
    return misses


def update_head_cache(host: np.ndarray, pool: np.ndarray, held: np.ndarray, first: np.ndarray,
                      picks: np.ndarray, page_size: int) -> int:
    """Update ``held`` [Hkv, k] (int64, in place) to hold each head's ``picks`` [Hkv, k]
    (int64, distinct within a head) and copy the new ones from ``host`` [2, Hkv, n_host *
    page_size, D] to ``pool`` [2, Hkv, n_slots, D] (same dtype; any 2-byte or 4-byte type,
    read as raw bits) at pages ``first`` [k]. Returns the number of (head, page) copies."""
    return int(_update(host, pool, held, first, picks, page_size))
