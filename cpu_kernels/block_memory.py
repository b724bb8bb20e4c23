"""One decode step of actqkv's attention on the CPU, in one numba call per layer and
sequence (the CPU twin of the tensor ops in ``hetero.policies.actqkv``, which a GPU runs and
which are this kernel's oracle).

A query ``q`` [Hkv, G, D] (each KV head's group of query heads; unscaled, before the rotary
embedding) attends, in one softmax per query head, to the keys and values of the pool
``pool`` [2, Hkv, slots, D] at:

- the local window: pool slots ``slots[:n_local]``, keys rotated at positions
  ``0 .. n_local - 1`` and the query at ``n_local - 1`` (true relative positions);
- the memory, keys as stored (position 0) and the query rotated at ``mem_pos``: the sinks,
  ``slots[n_local : n_local + n_sink]``, and the head cache: ``held.shape[1]`` pages of
  ``page_size`` slots, from slot ``span`` on (one run) or listed after the sinks in ``slots``
  (``span`` < 0). KV head ``h``'s cache page ``j`` holds block ``held[h, j]``; it counts only
  if that block is among the head's first ``keep[h]`` blocks of ``ranked[h]`` (the dynamic
  cut-off).

It also adds each local key's score, ``q·k`` of the unrotated key with the group's queries
summed (unscaled), to ``scores[h, ring[j]]``: what the representatives are chosen by.

The keys of a head are cut into chunks of ``CHUNK``; (head, chunk) tasks run in parallel
(``prange``), each a two-pass softmax over its keys (max, then exp and sums), merged by their
maxima at the end. One call replaces ~25 small torch ops per layer; it reads each key and
value once.
"""

from __future__ import annotations

import math

import numba
import numpy as np

CHUNK = 512


@numba.njit(nogil=True, parallel=True, fastmath={"reassoc", "contract"}, cache=True)  # keeps -inf
def _attend(q, pool, slots, n_local, n_sink, span, held, ranked, keep, page_size, cos, sin, mem_pos,
            scale, scores, ring):  # pragma: no cover - compiled
    hkv, g, d = q.shape
    half = d // 2
    n_pages = held.shape[1]
    n_near = n_local + n_sink
    n = n_near + n_pages * page_size
    # queries: scaled, rotated at the local position and at the memory's
    ql = np.empty((hkv, g, d), dtype=np.float32)
    qm = np.empty((hkv, g, d), dtype=np.float32)
    qsum = np.zeros((hkv, d), dtype=np.float32)
    pl = n_local - 1
    for h in range(hkv):
        for a in range(g):
            for i in range(d):
                o = q[h, a, i + half] if i < half else q[h, a, i - half]
                r = -o if i < half else o
                ql[h, a, i] = (q[h, a, i] * cos[pl, i] + r * sin[pl, i]) * scale
                qm[h, a, i] = (q[h, a, i] * cos[mem_pos, i] + r * sin[mem_pos, i]) * scale
                qsum[h, i] += q[h, a, i]
    # the cache pages each head counts (its first keep[h] ranked blocks)
    counts = np.zeros((hkv, n_pages), dtype=np.bool_)
    top = 0
    for h in range(hkv):
        for j in range(n_pages):
            top = max(top, held[h, j] + 1)
    for h in range(hkv):
        mark = np.zeros(max(top, 1), dtype=np.bool_)
        for i in range(keep[h]):
            if ranked[h, i] < top:
                mark[ranked[h, i]] = True
        for j in range(n_pages):
            counts[h, j] = held[h, j] >= 0 and mark[held[h, j]]
    n_chunks = (n + CHUNK - 1) // CHUNK
    part_m = np.full((hkv, n_chunks, g), -np.inf, dtype=np.float32)
    part_l = np.zeros((hkv, n_chunks, g), dtype=np.float32)
    part_o = np.zeros((hkv, n_chunks, g, d), dtype=np.float32)
    for t in numba.prange(hkv * n_chunks):
        h, c = t // n_chunks, t % n_chunks
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        logits = np.full((g, hi - lo), -np.inf, dtype=np.float32)
        where = np.empty(hi - lo, dtype=np.int64)  # pool slot of each key (-1: not counted)
        key = np.empty(d, dtype=np.float32)
        for j in range(lo, hi):
            if j < n_near:
                s = slots[j]
            else:
                page = (j - n_near) // page_size
                if not counts[h, page]:
                    where[j - lo] = -1
                    continue
                s = span + (j - n_near) if span >= 0 else slots[j]
            where[j - lo] = s
            if j < n_local:  # rotate at position j; add the key's local score
                local = 0.0
                for i in range(d):
                    x = pool[0, h, s, i]
                    o = pool[0, h, s, i + half] if i < half else pool[0, h, s, i - half]
                    key[i] = x * cos[j, i] + (-o if i < half else o) * sin[j, i]
                    local += qsum[h, i] * x
                scores[h, ring[j]] += local
                for a in range(g):
                    acc = 0.0
                    for i in range(d):
                        acc += ql[h, a, i] * key[i]
                    logits[a, j - lo] = acc
            else:
                for a in range(g):
                    acc = 0.0
                    for i in range(d):
                        acc += qm[h, a, i] * pool[0, h, s, i]
                    logits[a, j - lo] = acc
        for a in range(g):
            m = -np.inf
            for j in range(hi - lo):
                m = max(m, logits[a, j])
            part_m[h, c, a] = m
            if m == -np.inf:
                continue
            total = 0.0
            for j in range(hi - lo):
                if where[j] < 0:
                    continue
                p = math.exp(logits[a, j] - m)
                total += p
                s = where[j]
                for i in range(d):
                    part_o[h, c, a, i] += p * pool[1, h, s, i]
            part_l[h, c, a] = total
    out = np.zeros((hkv, g, d), dtype=np.float32)
    for h in range(hkv):
        for a in range(g):
            m = -np.inf
            for c in range(n_chunks):
                m = max(m, part_m[h, c, a])
            total = 0.0
            for c in range(n_chunks):
                if part_m[h, c, a] == -np.inf:
                    continue
                w = math.exp(part_m[h, c, a] - m)
                total += w * part_l[h, c, a]
                for i in range(d):
                    out[h, a, i] += w * part_o[h, c, a, i]
            for i in range(d):
                out[h, a, i] /= total
    return out


def decode_attention(q: np.ndarray, pool: np.ndarray, slots: np.ndarray, n_local: int, n_sink: int,
                     span: int, held: np.ndarray, ranked: np.ndarray, keep: np.ndarray, page_size: int,
                     cos: np.ndarray, sin: np.ndarray, mem_pos: int, scale: float, scores: np.ndarray,
                     ring: np.ndarray) -> np.ndarray:
    """Attention output float32 [Hkv, G, D] of ``q`` (float32 [Hkv, G, D]) as the module
    docstring says. ``slots``, ``held`` [Hkv, k], ``ranked`` [Hkv, >= max(keep)], ``keep``
    [Hkv], ``ring`` [n_local]: int64; ``pool`` float32; ``cos``, ``sin`` float32 [>=
    max(n_local, mem_pos + 1), D]; ``scores`` float32 [Hkv, ring size], updated in place.
    ``n_local`` >= 1 (the query's own key is local)."""
    return _attend(q, pool, slots, n_local, n_sink, span, held, ranked, keep, page_size, cos, sin, mem_pos,
                   np.float32(scale), scores, ring)


@numba.njit(nogil=True, parallel=True, fastmath={"reassoc", "contract"}, cache=True)
def _score(codes_k, codes_v, reps, per, start, stop, pool_k, pool_v, bounds, page_size, group,
           probe):  # pragma: no cover - compiled
    hkv, d = probe.shape
    n = stop - start
    g0, g1 = start // group, (stop - 1) // group + 1
    scores = np.empty((hkv, n), dtype=np.float32)
    bound = np.empty((hkv, g1 - g0), dtype=np.float32)
    inv = np.empty(hkv, dtype=np.float32)
    for h in range(hkv):
        norm = 0.0
        for i in range(d):
            norm += probe[h, i] * probe[h, i]
        inv[h] = 1.0 / (127.0 * max(math.sqrt(norm), 1e-30))
    n_chunks = (n + CHUNK - 1) // CHUNK
    for t in numba.prange(hkv * (n_chunks + 1)):
        h, c = t // (n_chunks + 1), t % (n_chunks + 1)
        if c == n_chunks:  # the head's group bounds
            for g in range(g0, g1):
                s = bounds[g // page_size] * page_size + g % page_size
                acc = 0.0
                for i in range(d):
                    acc += max(probe[h, i] * pool_k[h, s, i], probe[h, i] * pool_v[h, s, i])
                bound[h, g - g0] = acc
            continue
        for b in range(start + c * CHUNK, min(stop, start + (c + 1) * CHUNK)):
            row = reps[b // (2 * per)] * per + b % per
            acc = 0.0
            if (b // per) % 2 == 0:
                for i in range(d):
                    acc += probe[h, i] * codes_k[h, row, i]
            else:
                for i in range(d):
                    acc += probe[h, i] * codes_v[h, row, i]
            scores[h, b - start] = acc * inv[h]
    return scores, bound


def score_blocks(codes_k: np.ndarray, codes_v: np.ndarray, reps: np.ndarray, per: int, run: range,
                 pool_k: np.ndarray, pool_v: np.ndarray, bounds: np.ndarray, page_size: int, group: int,
                 probe: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """actqkv's block scores for ``probe`` float32 [Hkv, D]: the cosine similarity [Hkv,
    len(run)] of each offloaded block of ``run`` with its representative, int8 codes of the
    unit vector times 127 (block ``b`` at row ``reps[b // (2 per)] * per + b % per`` of
    ``codes_k`` [Hkv, rows, D] if ``b // per`` is even, else of ``codes_v``); and the key
    bound ``Σ_d max(p_d·max_d, p_d·min_d)`` [Hkv, groups] of each group of ``group`` blocks
    meeting ``run`` (group ``g``'s min at slot ``bounds[g // page_size] * page_size + g %
    page_size`` of ``pool_k`` [Hkv, slots, D], its max there in ``pool_v``, as quest keeps
    its page bounds)."""
    return _score(codes_k, codes_v, reps, per, run.start, run.stop, pool_k, pool_v, bounds, page_size, group,
                  probe)


@numba.njit(nogil=True, cache=True)
def _cutoff(scores, k_min, k_max):  # pragma: no cover - compiled
    hkv, n = scores.shape
    keep = np.empty(hkv, dtype=np.int64)
    for h in range(hkv):
        m = -np.inf
        for j in range(n):
            m = max(m, scores[h, j])
        total = 0.0
        for j in range(n):
            total += math.exp(scores[h, j] - m)
        entropy = 0.0
        for j in range(n):
            p = math.exp(scores[h, j] - m) / total
            entropy -= p * math.log(p + 1e-10)
        frac = math.exp(10.0 * (2.0 / (1.0 + math.exp(-10.0 * (entropy - math.log(n)))) - 1.0))
        keep[h] = min(max(np.rint(k_min + (k_max - k_min) * frac), k_min), k_max)
    return keep


def cutoff(scores: np.ndarray, k_min: int, k_max: int) -> np.ndarray:
    """ActQKV's dynamic cut-off (``hetero.policies.actqkv.dynamic_blocks``, whose tensor ops
    are its oracle) of float32 ``scores`` [Hkv, n], ``k_min <= k_max <= n``: int64 [Hkv]."""
    return _cutoff(scores, k_min, k_max)
