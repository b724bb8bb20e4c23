"""actqkv's decode step on the CPU: block scores, the cut-off, the selection and attention
(the CPU twins of the tensor ops in ``hetero.policies.actqkv``, which a GPU runs and which
are these kernels' oracle), one numba call per layer and sequence (:func:`decode_step`: its
parallel parts run back to back while the worker threads are awake; called one by one, each
woke them, which cost 4 ms of a 59 ms step at 128k tokens).

On the CPU the host tier is the device's own memory, so the selected blocks are read where
they lie: no head cache, no copies.

A query ``q`` [Hkv, G, D] (each KV head's group of query heads; unscaled, before the rotary
embedding) attends, in one softmax per query head, to:

- the local window: pool slots ``slots[:n_local]`` of ``pool`` [2, Hkv, slots, D], keys
  rotated at positions ``0 .. n_local - 1`` and the query at ``n_local - 1`` (true relative
  positions);
- the memory, keys as stored (position 0) and the query rotated at ``mem_pos``: the sinks,
  pool slots ``slots[n_local : n_local + n_sink]``, and KV head ``h``'s blocks
  ``blocks[h, :keep[h]]`` of ``page_size`` tokens in the layer's host tier ``host`` [2, Hkv,
  capacity, D] (block ``b`` at slots ``b * page_size ..``).

It also adds each local key's score, ``q·k`` of the unrotated key with the group's queries
summed (unscaled), to ``scores[h, ring[j]]``: what the representatives are chosen by.

A head's keys are cut into tasks, ``NEAR`` pool keys or ``CHUNK`` keys of whole blocks, run
in parallel (``prange``), each a two-pass softmax over its keys (max, then exp and sums),
merged by their maxima at the end. The loops walk whole blocks (no division per key). It
reads each key and value once.
"""

from __future__ import annotations

import math

import numba
import numpy as np

CHUNK = 512  # keys (or blocks, in the scan) per task
NEAR = 192  # pool keys per task: the local ones are rotated, which costs about as much again
LOG2E = np.float32(1.4426950408889634)
# 2^f = e^(f ln 2) on [-1/2, 1/2]: Taylor coefficients (ln 2)^i / i!, i = 6 .. 1 (relative error < 2e-7)
EXP2 = tuple(np.float32(math.log(2) ** i / math.factorial(i)) for i in range(6, 0, -1))


@numba.njit(nogil=True, fastmath={"reassoc", "contract"}, cache=True)
def _exp_shifted(x, m, bits):  # pragma: no cover - compiled
    """``x = exp(x - m)`` in place for float32 ``x <= m``, in loops the compiler vectorises
    (``math.exp`` is a scalar call): ``2^y = 2^k 2^f``, ``k = round(y)``, ``2^f`` by its
    polynomial, ``2^k`` by the exponent bits (``bits``: int32 scratch of x's length; below
    2^-126 it stays 2^-126)."""
    c6, c5, c4, c3, c2, c1 = EXP2
    for j in range(x.shape[0]):
        y = max((x[j] - m) * LOG2E, np.float32(-126.0))
        k = math.floor(y + np.float32(0.5))
        f = y - k
        x[j] = ((((((c6 * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f) + np.float32(1.0)
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)
    scale = bits.view(np.float32)
    for j in range(x.shape[0]):
        x[j] *= scale[j]


@numba.njit(nogil=True, parallel=True, fastmath={"reassoc", "contract"}, cache=True)  # keeps -inf
def _attend(q, pool, slots, n_local, n_sink, host, blocks, keep, page_size, cos, sin, mem_pos, scale, scores,
            ring):  # pragma: no cover - compiled
    hkv, g, d = q.shape
    half = d // 2
    n_near = n_local + n_sink
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
    near = (n_near + NEAR - 1) // NEAR  # a head's tasks: its pool keys, then its blocks
    per_task = max(CHUNK // page_size, 1)
    n_tasks = near
    for h in range(hkv):
        n_tasks = max(n_tasks, near + (keep[h] + per_task - 1) // per_task)
    part_m = np.full((hkv, n_tasks, g), -np.inf, dtype=np.float32)
    part_l = np.zeros((hkv, n_tasks, g), dtype=np.float32)
    part_o = np.zeros((hkv, n_tasks, g, d), dtype=np.float32)
    for t in numba.prange(hkv * n_tasks):
        h, c = t // n_tasks, t % n_tasks
        lo, hi, b0, b1 = c * NEAR, min(n_near, (c + 1) * NEAR), 0, 0  # keys lo..hi of the pool
        if c >= near:  # blocks b0..b1 of the head's selection
            lo, b0 = 0, (c - near) * per_task
            b1 = min(keep[h], b0 + per_task)
            hi = max(b1 - b0, 0) * page_size
        if lo >= hi:
            continue
        n = hi - lo
        logits = np.empty((g, n), dtype=np.float32)
        bits = np.empty(n, dtype=np.int32)
        key = np.empty(d, dtype=np.float32)
        acc = np.zeros((g, d), dtype=np.float32)
        for j in range(lo, hi if c < near else lo):
            s = slots[j]
            if j < n_local:  # rotate at position j; add the key's local score
                for i in range(half):
                    key[i] = pool[0, h, s, i] * cos[j, i] - pool[0, h, s, i + half] * sin[j, i]
                for i in range(half, d):
                    key[i] = pool[0, h, s, i] * cos[j, i] + pool[0, h, s, i - half] * sin[j, i]
                local = np.float32(0.0)
                for i in range(d):
                    local += qsum[h, i] * pool[0, h, s, i]
                scores[h, ring[j]] += local
                for a in range(g):
                    z = np.float32(0.0)
                    for i in range(d):
                        z += ql[h, a, i] * key[i]
                    logits[a, j - lo] = z
            else:
                for a in range(g):
                    z = np.float32(0.0)
                    for i in range(d):
                        z += qm[h, a, i] * pool[0, h, s, i]
                    logits[a, j - lo] = z
        j = 0
        for b in range(b0, b1):
            for s in range(blocks[h, b] * page_size, (blocks[h, b] + 1) * page_size):
                for a in range(g):
                    z = np.float32(0.0)
                    for i in range(d):
                        z += qm[h, a, i] * host[0, h, s, i]
                    logits[a, j] = z
                j += 1
        for a in range(g):
            m = -np.inf
            for j in range(n):
                m = max(m, logits[a, j])
            part_m[h, c, a] = m
            _exp_shifted(logits[a], np.float32(m), bits)
            total = np.float32(0.0)
            for j in range(n):
                total += logits[a, j]
            part_l[h, c, a] = total
        for j in range(lo, hi if c < near else lo):
            s = slots[j]
            for a in range(g):
                p = logits[a, j - lo]
                for i in range(d):
                    acc[a, i] += p * pool[1, h, s, i]
        j = 0
        for b in range(b0, b1):
            for s in range(blocks[h, b] * page_size, (blocks[h, b] + 1) * page_size):
                for a in range(g):
                    p = logits[a, j]
                    for i in range(d):
                        acc[a, i] += p * host[1, h, s, i]
                j += 1
        part_o[h, c] = acc
    out = np.zeros((hkv, g, d), dtype=np.float32)
    for h in range(hkv):
        for a in range(g):
            m = -np.inf
            for c in range(n_tasks):
                m = max(m, part_m[h, c, a])
            total = 0.0
            for c in range(n_tasks):
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
                     host: np.ndarray, blocks: np.ndarray, keep: np.ndarray, page_size: int, cos: np.ndarray,
                     sin: np.ndarray, mem_pos: int, scale: float, scores: np.ndarray,
                     ring: np.ndarray) -> np.ndarray:
    """Attention output float32 [Hkv, G, D] of ``q`` (float32 [Hkv, G, D]) as the module
    docstring says. ``slots`` [n_local + n_sink], ``blocks`` [Hkv, >= max(keep)], ``keep``
    [Hkv], ``ring`` [n_local]: int64; ``pool``, ``host`` float32; ``cos``, ``sin`` float32
    [>= max(n_local, mem_pos + 1), D]; ``scores`` float32 [Hkv, ring size], updated in place.
    ``n_local`` >= 1 (the query's own key is local)."""
    return _attend(q, pool, slots, n_local, n_sink, host, blocks, keep, page_size, cos, sin, mem_pos,
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
    pos, neg = np.maximum(probe, 0), np.minimum(probe, 0)
    for h in range(hkv):
        norm = 0.0
        for i in range(d):
            norm += probe[h, i] * probe[h, i]
        inv[h] = 1.0 / (127.0 * max(math.sqrt(norm), 1e-30))
    # tasks of about equal bytes: CHUNK blocks' int8 codes, or CHUNK // 8 groups' fp32 bounds
    n_chunks, n_groups = (n + CHUNK - 1) // CHUNK, (g1 - g0 + CHUNK // 8 - 1) // (CHUNK // 8)
    for t in numba.prange(hkv * (n_chunks + n_groups)):
        h, c = t // (n_chunks + n_groups), t % (n_chunks + n_groups)
        if c >= n_chunks:  # group bounds: max where the probe is positive, min where negative
            g, hi = g0 + (c - n_chunks) * (CHUNK // 8), min(g1, g0 + (c - n_chunks + 1) * (CHUNK // 8))
            while g < hi:  # the groups in one page of bounds
                end, page = min(hi, (g // page_size + 1) * page_size), g // page_size
                for x in range(g, end):
                    s = bounds[page] * page_size + x - page * page_size
                    acc = np.float32(0.0)
                    for i in range(d):
                        acc += pos[h, i] * pool_v[h, s, i] + neg[h, i] * pool_k[h, s, i]
                    bound[h, x - g0] = acc
                g = end
            continue
        b, hi = start + c * CHUNK, min(stop, start + (c + 1) * CHUNK)
        while b < hi:  # the representatives in one half of a page
            end, half = min(hi, (b // per + 1) * per), b // per
            codes, first = codes_k if half % 2 == 0 else codes_v, reps[half // 2] * per - half * per
            for x in range(b, end):
                acc = np.float32(0.0)
                for i in range(d):
                    acc += probe[h, i] * codes[h, first + x, i]
                scores[h, x - start] = acc * inv[h]
            b = end
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


@numba.njit(nogil=True, parallel=True, fastmath={"reassoc", "contract"}, cache=True)
def _cutoff(scores, k_min, k_max):  # pragma: no cover - compiled
    hkv, n = scores.shape
    keep = np.empty(hkv, dtype=np.int64)
    for h in numba.prange(hkv):
        m = scores[h].max()
        e, bits = scores[h].copy(), np.empty(n, dtype=np.int32)
        _exp_shifted(e, m, bits)
        z, ex = 0.0, 0.0
        for j in range(n):
            z += e[j]
            ex += e[j] * (scores[h, j] - m)
        entropy = math.log(z) - ex / z
        frac = math.exp(10 * (2 / (1 + math.exp(-10 * (entropy - math.log(n)))) - 1))
        keep[h] = min(max(np.rint(k_min + (k_max - k_min) * frac), k_min), k_max)
    return keep


def cutoff(scores: np.ndarray, k_min: int, k_max: int) -> np.ndarray:
    """ActQKV's dynamic cut-off (``hetero.policies.actqkv.dynamic_blocks``, whose tensor ops
    are its oracle) of float32 ``scores`` [Hkv, n], ``k_min <= k_max <= n``: int64 [Hkv].
    The entropy of the softmax ``p = e^x / z`` (``x`` the scores less their maximum) is
    ``log z - Σ p·x``: one exp per score, vectorised."""
    return _cutoff(scores, k_min, k_max)


@numba.njit(nogil=True, parallel=True, cache=True)
def _select(scores, bound, start, group, bound_top, forced, keep, k_max):  # pragma: no cover - compiled
    hkv, n = scores.shape
    blocks = np.full((hkv, k_max), -1, dtype=np.int64)
    for h in numba.prange(hkv):
        rank = scores[h].copy()
        taken = np.zeros(bound.shape[1], dtype=np.bool_)
        for _ in range(min(bound_top, bound.shape[1])):  # the groups of highest bound: every block in
            best = -1
            for g in range(bound.shape[1]):
                if not taken[g] and (best < 0 or bound[h, g] > bound[h, best]):
                    best = g
            taken[best] = True
            first = (start // group + best) * group - start
            for b in range(max(first, 0), min(first + group, n)):
                rank[b] = scores[h, b] + forced
        k = keep[h]
        if k <= 0:
            continue
        threshold = np.partition(rank, n - k)[n - k] if k < n else -np.inf  # the k-th highest
        m = 0
        for b in range(n):
            if rank[b] > threshold:
                blocks[h, m] = start + b
                m += 1
        for b in range(n):
            if m == k:
                break
            if rank[b] == threshold:
                blocks[h, m] = start + b
                m += 1
    return blocks


def select_blocks(scores: np.ndarray, bound: np.ndarray, run: range, group: int, bound_top: int, forced: float,
                  keep: np.ndarray, k_max: int) -> np.ndarray:
    """Each KV head's first ``keep[h]`` blocks (absolute indices, in no order; int64 [Hkv,
    k_max], -1 past them) of ``run`` by actqkv's ranking (``hetero.policies.actqkv``'s
    ``ranked`` and ``topk``, its oracle): the highest ``scores`` [Hkv, len(run)], those of the
    blocks of the head's ``bound_top`` groups of highest ``bound`` [Hkv, groups] raised by
    ``forced``. Linear in the blocks (a partition, not a sort)."""
    return _select(scores, bound, run.start, group, bound_top, np.float32(forced), keep, k_max)


@numba.njit(nogil=True, cache=True)
def _step(q, pool, slots, n_local, n_sink, host, codes_k, codes_v, reps, per, start, stop, bounds, page_size, group,
          bound_top, forced, k_min, k_max, cos, sin, mem_pos, scale, scores, ring):  # pragma: no cover - compiled
    hkv, g, d = q.shape
    half = d // 2
    probe = np.zeros((hkv, d), dtype=np.float32)  # the group's queries at the memory's position, summed
    for h in range(hkv):
        for a in range(g):
            for i in range(d):
                o = q[h, a, i + half] if i < half else q[h, a, i - half]
                probe[h, i] += q[h, a, i] * cos[mem_pos, i] + (-o if i < half else o) * sin[mem_pos, i]
    s, b = _score(codes_k, codes_v, reps, per, start, stop, pool[0], pool[1], bounds, page_size, group, probe)
    keep = _cutoff(s, k_min, k_max)
    blocks = _select(s, b, start, group, bound_top, forced, keep, k_max)
    return _attend(q, pool, slots, n_local, n_sink, host, blocks, keep, page_size, cos, sin, mem_pos, scale, scores,
                   ring), keep


def decode_step(q: np.ndarray, pool: np.ndarray, slots: np.ndarray, n_local: int, n_sink: int, host: np.ndarray,
                codes_k: np.ndarray, codes_v: np.ndarray, reps: np.ndarray, per: int, run: range,
                bounds: np.ndarray, page_size: int, group: int, bound_top: int, forced: float, k_min: int,
                k_max: int, cos: np.ndarray, sin: np.ndarray, mem_pos: int, scale: float, scores: np.ndarray,
                ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sequence's decode attention over a memory, in one call (the threads stay awake
    from one part to the next): the probe (``q``'s group summed, rotated at ``mem_pos``),
    :func:`score_blocks` over ``run``, :func:`cutoff` between ``k_min`` and ``k_max``,
    :func:`select_blocks`, :func:`decode_attention` over the kept blocks. Arguments as
    theirs (``pool`` holds the bounds: min in ``pool[0]``, max in ``pool[1]``). Returns the
    output float32 [Hkv, G, D] and the blocks kept per head (int64 [Hkv])."""
    return _step(q, pool, slots, n_local, n_sink, host, codes_k, codes_v, reps, per, run.start, run.stop, bounds,
                 page_size, group, bound_top, np.float32(forced), k_min, k_max, cos, sin, mem_pos, np.float32(scale),
                 scores, ring)
