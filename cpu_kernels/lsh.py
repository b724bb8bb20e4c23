"""MagicPIG on the CPU: SimHash codes, L hash tables per KV head, probing, sampled attention.

A CPU worker holds the offloaded keys and values of its layers and, per (layer, KV head),
L hash tables of K-bit SimHash buckets. Per decode step and layer it receives the query
heads' codes (hashed on the device), keeps the keys that share the query's bucket in at
least 2 of the L tables, and returns an importance-corrected attention partial
``(out, lse)`` over them, which merges exactly with the device's partial over its resident
keys (``gpu_kernels.merge_partials``). How the runtime uses it: docs/architecture.md ("CPU workers").

Conventions
-----------
Codes
    ``h = (x - mean) @ R`` with ``R`` of shape ``[D, K*L]``; table ``j``'s code of ``x`` is
    ``sum(b in 0..K-1) [h[j*K + b] > 0] << b`` (bit ``b`` is column ``j*K + b``; a projection
    of exactly 0 gives bit 0), stored as ``uint16`` (``0 <= K <= 16``). ``gpu_kernels.simhash``
    packs identically. A query is hashed without centring; scaling it (normalising) does not
    change its signs.
Tables (``LSHTables``, one per (layer, KV head), stacked over KV heads)
    CSR per table: ``ids[..., j, offsets[..., j, b]:offsets[..., j, b+1]]`` are the key ids in
    bucket ``b`` of table ``j``, ascending. ``offsets`` is ``[..., L, 2**K + 1]`` int32 and
    ``ids`` is ``[..., L, n]`` int32, so the tables cost ``4*L*(n + 2**K + 1)`` bytes per KV
    head: with K=10, L=150 that is 600 bytes per key, against ``4*D*2 = 512`` bytes of fp32
    K and V at D=64 (MagicPIG's known weak spot).
Keys and values
    The host tier's layout, ``[Hkv, capacity, D]`` float32, C-contiguous: one key (or value)
    is one contiguous row, so a sampled key costs ``D*4`` bytes read sequentially and the
    keys of one KV head are one block. Key ids are row indices (token positions); the tables
    cover ids ``0..n-1`` with ``n <= capacity``.
Which keys may be sampled
    Only ids in ``[lo, hi)``: the device holds the sinks (ids below ``lo``) and the local
    window (ids from ``hi`` on), so one pair excludes both; the tables can be built once at
    prefill and keep covering keys that the device holds.
Centring and the lse
    Keys are hashed centred: ``k - mean`` with ``mean`` the mean of the offloaded keys, and
    the collision probability uses the angle between ``q`` and ``k - mean``
    (``q.(k - mean) = q.k - q.mean``, so ``cos = (q.k - q.mean) / (|q| |k - mean|)`` needs only
    the stored per-key norms ``|k - mean|``). The logits use the stored, uncentred keys,
    ``q.k * scale``: they are the true logits, so ``lse`` is on the same scale as the device's
    partial and merges with it as is. (Centred logits would give the same ``out`` but an
    ``lse`` short by ``q.mean * scale``.) Any centre works as long as the same one hashes
    the keys and enters the angle (``w`` is then the true sampling probability); the mean
    keeps the buckets balanced.
Estimator
    With ``theta`` that angle, ``p = (1 - theta/pi)**K`` and ``w = 1 - (1-p)**L -
    L*p*(1-p)**(L-1)`` (probability of >= 2 collisions); logit ``= q.k*scale - log(w + 1e-4)``;
    self-normalised softmax over the candidates. No candidates: ``out = 0``, ``lse = -inf``.
    A zero ``|q|`` or ``|k - mean|`` counts as ``theta = pi/2``.

Per layer, a worker holds ``keys``, ``values`` [Hkv, capacity, D], ``norms`` [Hkv, capacity],
``mean`` [Hkv, D] and the stacked ``LSHTables``, and calls ``lsh_attention`` once per step.

Speed
-----
``lsh_attention`` runs the query heads in parallel (``prange``; each head has its own
candidates, so heads share nothing but read-only arrays). Per head the work is a few
thousand random reads: L bucket offsets, L runs of ids, and the rows of the ~1-3% sampled
keys and values. It is bound by memory latency, not bandwidth, so the kernels look up all L
buckets before walking them, prefetch rows a few candidates ahead, and collect the
candidates by scanning the uint8 collision counts 8 at a time, which yields ascending ids
(rows read in address order) and clears the scratch. The math of the correction (acos, log)
runs in a separate pass over values already loaded.

Threads: every kernel is ``nogil``; the parallel ones (``parallel=True``) run on numba's
threading layer. Calling them from several Python threads at once needs a thread-safe layer
(``omp`` or ``tbb``; numba picks one of them by default when installed, ``workqueue`` aborts).
A parallel call waits for its slowest thread: on cores shared with other busy work (the
device's torch threads on a CPU-only machine), ``numba.set_num_threads(1)`` in the calling
thread (it is per thread) can be faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "LSHTables", "build_tables", "centred_norms", "lsh_attention", "probe", "sampled_attention",
    "simhash_codes",
]

W_FLOOR = 1e-4  # MagicPIG's floor on the sampling probability: logit -= log(w + W_FLOOR)
MAX_K = 16  # codes are uint16
_ROWS_PER_CHUNK = 4096  # rows projected per matmul in simhash_codes (bounds the [rows, K*L] buffer)
_FASTMATH = {"reassoc", "contract"}  # vectorised dot products; keeps inf/nan semantics


# --------------------------------------------------------------------------- codes


@numba.njit(nogil=True, cache=True)
def _pack_signs(h, k, codes):
    # h [N, K*L] float32 projections -> codes [N, L] uint16 (bit b of table j = h[j*K + b] > 0).
    # Serial: it streams a chunk that the (multi-threaded) matmul just wrote, and a parallel
    # launch per chunk costs more than the packing.
    n, l = codes.shape
    for i in range(n):
        for j in range(l):
            c = 0
            for b in range(k):
                c |= np.int64(h[i, j * k + b] > 0) << b
            codes[i, j] = c


def _check_kl(k: int, l: int) -> None:
    if not 0 <= k <= MAX_K:
        raise ValueError(f"K (bits per table) must be in [0, {MAX_K}] for uint16 codes, got {k}")
    if l < 2:
        raise ValueError(f"L (tables) must be >= 2: a key is sampled when it collides in >= 2 tables, got {l}")


def simhash_codes(x: np.ndarray, r: np.ndarray, k: int, l: int, center: np.ndarray | None = None) -> np.ndarray:
    """SimHash codes of ``x - center``: K sign bits per table packed into uint16.

    Parameters
    ----------
    x : [..., N, D] float32 (e.g. keys ``[Hkv, n, D]``); any float array-like is converted.
    r : [D, K*L] float32, the random Gaussian projection.
    k, l : bits per table (0..16) and number of tables (>= 2).
    center : [..., D] float32 or None; subtracted from the rows of ``x`` before projecting
        (the mean of the offloaded keys, per KV head).

    Returns
    -------
    codes : [..., N, L] uint16, packed as in the module docstring.
    """
    _check_kl(k, l)
    x = np.asarray(x, dtype=np.float32)
    r = np.ascontiguousarray(r, dtype=np.float32)
    if x.ndim < 2 or r.shape != (x.shape[-1], k * l):
        raise ValueError(f"x must be [..., N, D] and r [D, K*L] = [{x.shape[-1]}, {k * l}]; got {x.shape}, {r.shape}")
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    xs = x.reshape(math.prod(lead), n, d)
    if center is not None:
        center = np.asarray(center, dtype=np.float32)
        if center.shape != (*lead, d):
            raise ValueError(f"center must be [..., D] = {(*lead, d)}, got {center.shape}")
        center = center.reshape(-1, d)
    codes = np.empty((xs.shape[0], n, l), dtype=np.uint16)
    for h in range(xs.shape[0]):
        for s in range(0, n, _ROWS_PER_CHUNK):
            rows = xs[h, s:s + _ROWS_PER_CHUNK]
            if center is not None:
                rows = rows - center[h]
            _pack_signs(rows @ r, k, codes[h, s:s + _ROWS_PER_CHUNK])
    return codes.reshape(*lead, n, l)


@numba.njit(nogil=True, parallel=True, cache=True, fastmath=_FASTMATH)
def _centred_norms(keys, mean, norms):
    h, n, d = keys.shape
    for t in prange(h * n):
        i, j = t // n, t % n
        s = 0.0
        for c in range(d):
            z = keys[i, j, c] - mean[i, c]
            s += z * z
        norms[i, j] = math.sqrt(s)


def centred_norms(keys: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Norms ``|k - mean|`` of the centred keys, for the collision probability.

    Parameters
    ----------
    keys : [Hkv, n, D] float32; mean : [Hkv, D] float32.

    Returns
    -------
    norms : [Hkv, n] float32.
    """
    keys = np.asarray(keys, dtype=np.float32)
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    if keys.ndim != 3 or mean.shape != (keys.shape[0], keys.shape[2]):
        raise ValueError(f"keys must be [Hkv, n, D] and mean [Hkv, D]; got {keys.shape}, {mean.shape}")
    norms = np.empty(keys.shape[:2], dtype=np.float32)
    _centred_norms(keys, mean, norms)
    return norms


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, slots=True)
class LSHTables:
    """L hash tables of K-bit buckets in CSR form, for one or several KV heads.

    Attributes
    ----------
    offsets : [..., L, 2**K + 1] int32; bucket ``b`` of table ``j`` is
        ``ids[..., j, offsets[..., j, b]:offsets[..., j, b + 1]]``.
    ids : [..., L, n] int32 key ids, sorted by bucket, ascending within a bucket.
    """

    offsets: np.ndarray
    ids: np.ndarray

    @property
    def k(self) -> int:
        return int(self.offsets.shape[-1] - 1).bit_length() - 1

    @property
    def l(self) -> int:
        return int(self.ids.shape[-2])

    @property
    def n(self) -> int:
        """Number of keys hashed (ids ``0..n-1``)."""
        return int(self.ids.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.ids.nbytes)


@numba.njit(nogil=True, parallel=True, cache=True)
def _build_tables(codes_t, offsets, ids):
    # codes_t [T, n] (T = heads*tables) -> counting sort per table, in parallel over tables
    t_count, n = codes_t.shape
    n_buckets = offsets.shape[1] - 1
    for t in prange(t_count):
        off = offsets[t]
        off[:] = 0
        row = codes_t[t]
        for i in range(n):
            off[row[i] + 1] += 1
        for b in range(n_buckets):
            off[b + 1] += off[b]
        cursor = off[:n_buckets].copy()
        out = ids[t]
        for i in range(n):
            b = row[i]
            out[cursor[b]] = i
            cursor[b] += 1


def build_tables(codes: np.ndarray, k: int) -> LSHTables:
    """Build the L hash tables of one or several KV heads from their keys' codes.

    Parameters
    ----------
    codes : [n, L] or [Hkv, n, L] integer codes in ``[0, 2**k)`` (``simhash_codes``).
    k : bits per table.

    Returns
    -------
    LSHTables with ``offsets`` [..., L, 2**k + 1] and ``ids`` [..., L, n], both int32.
    """
    codes = np.asarray(codes)
    if codes.ndim not in (2, 3) or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array [n, L] or [Hkv, n, L], got {codes.dtype} {codes.shape}")
    _check_kl(k, codes.shape[-1])
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << k):
        raise ValueError(f"codes must lie in [0, 2**{k}), got range [{codes.min()}, {codes.max()}]")
    if codes.shape[-2] >= 2**31:
        raise ValueError("at most 2**31 - 1 keys per table (int32 ids)")
    lead, (n, l) = codes.shape[:-2], codes.shape[-2:]
    codes_t = np.ascontiguousarray(np.swapaxes(codes, -1, -2), dtype=np.uint16).reshape(math.prod(lead) * l, n)
    offsets = np.empty((codes_t.shape[0], (1 << k) + 1), dtype=np.int32)
    ids = np.empty((codes_t.shape[0], n), dtype=np.int32)
    _build_tables(codes_t, offsets, ids)
    return LSHTables(offsets.reshape(*lead, l, (1 << k) + 1), ids.reshape(*lead, l, n))


# --------------------------------------------------------------------------- probe + attention


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to load the cache line holding ``arr[idx]`` (1-d array); no effect on results.

    The kernels below are bound by the latency of random reads (table buckets, sampled rows),
    not by bandwidth: prefetching a few items ahead keeps several reads in flight.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p.type], fnty)
        builder.call(fn, [i8p, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


_AHEAD = 8  # sampled rows prefetched ahead of use
_TWO = 0x0202020202020202  # bit 1 of every byte: set where a count (0, 1 or 2) has reached 2


@numba.njit(nogil=True, cache=True)
def _prefetch_row(row):
    for c in range(0, row.shape[0], 16):  # one hint per 64 bytes of float32
        _prefetch(row, c)
    _prefetch(row, row.shape[0] - 1)


@numba.njit(nogil=True, cache=True)
def _probe_one(offsets, ids, q_codes, lo, hi, counts, cand):
    # Candidates (>= 2 collisions, id in [lo, hi)) into cand[:m], ascending; returns m.
    # counts: uint8 scratch of a multiple of 8 entries >= n, zero on entry and on return.
    l = q_codes.shape[0]
    starts = np.empty(l, dtype=np.int64)
    ends = np.empty(l, dtype=np.int64)
    for j in range(l):  # all L bucket lookups first, so their cache misses overlap
        b = q_codes[j]
        starts[j] = offsets[j, b]
        ends[j] = offsets[j, b + 1]
        for p in range(starts[j], ends[j], 16):  # the run's cache lines (16 int32 each)
            _prefetch(ids[j], p)
    for j in range(l):
        row = ids[j]
        for p in range(starts[j], ends[j]):
            i = row[p]
            c = counts[i]
            if c < 2:  # saturate at 2: any L fits in uint8
                counts[i] = c + 1
    # Collect by scanning the counts 8 at a time: ascending ids (so the sampled rows are read
    # in address order) and the scratch is zeroed on the way.
    words = counts.view(np.uint64)
    m = 0
    for w in range(words.shape[0]):
        word = words[w]
        if word == 0:
            continue
        if word & np.uint64(_TWO):
            for i in range(max(8 * w, lo), min(8 * w + 8, hi)):
                if counts[i] == 2:
                    cand[m] = i
                    m += 1
        words[w] = 0
    return m


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _attend_one(q, keys, values, norms, mean, cand, m, k, l, scale, out):
    # Importance-corrected softmax of q over keys[cand[:m]] -> out [D] (written), returns lse.
    d = q.shape[0]
    if m == 0:
        out[:] = 0.0
        return -np.inf
    q_norm = 0.0
    q_mean = 0.0
    for c in range(d):
        q_norm += q[c] * q[c]
        q_mean += q[c] * mean[c]
    q_norm = math.sqrt(q_norm)
    # Pass 1 only reads and multiplies (rows prefetched ahead); pass 2 is the math of the
    # correction, on data in registers; pass 3 reads the value rows.
    dots = np.empty(m, dtype=np.float64)
    key_norms = np.empty(m, dtype=np.float64)
    for t in range(min(_AHEAD, m)):
        _prefetch_row(keys[cand[t]])
    for t in range(m):
        if t + _AHEAD < m:
            _prefetch_row(keys[cand[t + _AHEAD]])
        i = cand[t]
        s = 0.0
        for c in range(d):
            s += q[c] * keys[i, c]
        dots[t] = s
        key_norms[t] = norms[i]
    logits = dots  # overwritten in place
    top = -np.inf
    for t in range(m):
        s = dots[t]
        den = q_norm * key_norms[t]
        cos = (s - q_mean) / den if den > 0.0 else 0.0
        cos = min(1.0, max(-1.0, cos))
        p = (1.0 - math.acos(cos) / math.pi) ** k
        miss = (1.0 - p) ** (l - 1)
        w = 1.0 - miss * (1.0 - p) - l * p * miss
        logit = s * scale - math.log(w + W_FLOOR)
        logits[t] = logit
        top = max(top, logit)
    acc = np.zeros(d, dtype=np.float64)
    total = 0.0
    for t in range(min(_AHEAD, m)):
        _prefetch_row(values[cand[t]])
    for t in range(m):
        if t + _AHEAD < m:
            _prefetch_row(values[cand[t + _AHEAD]])
        e = math.exp(logits[t] - top)
        total += e
        row = values[cand[t]]
        for c in range(d):
            acc[c] += e * row[c]
    for c in range(d):
        out[c] = acc[c] / total
    return top + math.log(total)


@numba.njit(nogil=True, cache=True)
def _counts_scratch(n):
    # Collision counts of n keys for _probe_one: zeros, padded to whole 8-byte words.
    return np.zeros(-(-n // 8) * 8, dtype=np.uint8)


@numba.njit(nogil=True, parallel=True, cache=True)
def _lsh_attention(q, q_codes, keys, values, norms, mean, offsets, ids, lo, hi, k, scale, out, lse, n_cand):
    hq = q.shape[0]
    group = hq // keys.shape[0]
    n = ids.shape[2]
    l = ids.shape[1]
    for h in prange(hq):
        kv = h // group
        cand = np.empty(n, dtype=np.int32)
        m = _probe_one(offsets[kv], ids[kv], q_codes[h], lo, hi, _counts_scratch(n), cand)
        n_cand[h] = m
        lse[h] = _attend_one(q[h], keys[kv], values[kv], norms[kv], mean[kv], cand, m, k, l, scale, out[h])


def _key_range(lo: int, hi: int | None, n: int) -> tuple[int, int]:
    hi = n if hi is None else hi
    if not 0 <= lo <= n or not 0 <= hi <= n:
        raise ValueError(f"sampled key range [lo, hi) = [{lo}, {hi}) must lie in [0, n={n}]")
    return int(lo), int(hi)


def _check_q_codes(q_codes: np.ndarray, tables: LSHTables) -> np.ndarray:
    q_codes = np.asarray(q_codes)
    if q_codes.shape[-1:] != (tables.l,) or not (q_codes.dtype.kind in "iu" or q_codes.size == 0):
        raise ValueError(f"query codes must be integers, L={tables.l} per head; got {q_codes.dtype} {q_codes.shape}")
    if q_codes.size and (q_codes.min() < 0 or q_codes.max() >= 1 << tables.k):
        raise ValueError(f"query codes must lie in [0, 2**{tables.k}), got range [{q_codes.min()}, {q_codes.max()}]")
    return np.ascontiguousarray(q_codes, dtype=np.uint16)


def probe(tables: LSHTables, q_codes: np.ndarray, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Key ids that share the query's bucket in at least 2 of the L tables.

    Parameters
    ----------
    tables : one KV head's tables (``offsets`` [L, 2**K + 1], ``ids`` [L, n]).
    q_codes : [L] integer, the query's code per table.
    lo, hi : only ids in ``[lo, hi)`` are returned (the device holds the others); default all.

    Returns
    -------
    candidates : [m] int32, ascending.
    """
    if tables.ids.ndim != 2:
        raise ValueError(f"probe takes one KV head's tables ([L, n] ids), got ids of shape {tables.ids.shape}")
    q_codes = _check_q_codes(q_codes, tables)
    if q_codes.ndim != 1:
        raise ValueError(f"q_codes must be [L], got {q_codes.shape}")
    lo, hi = _key_range(lo, hi, tables.n)
    cand = np.empty(tables.n, dtype=np.int32)
    m = _probe_one(tables.offsets, tables.ids, q_codes, lo, hi, _counts_scratch(tables.n), cand)
    return cand[:m].copy()


def _f32(a: np.ndarray, name: str, ndim: int) -> np.ndarray:
    # Large per-key arrays are never copied: a wrong dtype or layout is the caller's to fix.
    a = np.asarray(a)
    if a.dtype != np.float32 or not a.flags.c_contiguous or a.ndim != ndim:
        raise TypeError(f"{name} must be a C-contiguous float32 array with {ndim} dims, got {a.dtype} {a.shape} "
                        f"(contiguous={a.flags.c_contiguous}); the numba kernels have no half-precision path")
    return a


def sampled_attention(
    q: np.ndarray, keys: np.ndarray, values: np.ndarray, norms: np.ndarray, mean: np.ndarray,
    candidates: np.ndarray, k: int, l: int, scale: float,
) -> tuple[np.ndarray, float]:
    """MagicPIG's importance-corrected attention of one query head over sampled keys.

    Parameters
    ----------
    q : [D] float32 query (uncentred, unnormalised).
    keys, values : [n, D] float32, C-contiguous (one KV head of the host tier).
    norms : [n] float32 ``|k - mean|`` (``centred_norms``); mean : [D] float32.
    candidates : [m] integer key ids (any order, no repeats).
    k, l : the tables' bits per table and number of tables.
    scale : softmax scale, usually ``D**-0.5``.

    Returns
    -------
    out : [D] float32; lse : float (natural log; ``-inf`` with ``out = 0`` if ``m == 0``).
    """
    _check_kl(k, l)
    keys, values = _f32(keys, "keys", 2), _f32(values, "values", 2)
    norms, mean = _f32(norms, "norms", 1), np.ascontiguousarray(mean, dtype=np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)
    cand = np.ascontiguousarray(candidates, dtype=np.int32)
    if q.shape != mean.shape or q.shape != keys.shape[1:] or values.shape != keys.shape:
        raise ValueError(f"q [D], mean [D], keys/values [n, D] disagree: {q.shape}, {mean.shape}, {keys.shape}, "
                         f"{values.shape}")
    if cand.size and (cand.min() < 0 or cand.max() >= min(len(norms), len(keys))):
        raise ValueError(f"candidate ids must lie in [0, {min(len(norms), len(keys))})")
    out = np.empty(q.shape, dtype=np.float32)
    lse = _attend_one(q, keys, values, norms, mean, cand, len(cand), k, l, float(scale), out)
    return out, float(lse)


def lsh_attention(
    q: np.ndarray, q_codes: np.ndarray, keys: np.ndarray, values: np.ndarray, norms: np.ndarray,
    mean: np.ndarray, tables: LSHTables, scale: float, lo: int = 0, hi: int | None = None,
    n_candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Probe and sampled attention for every query head of one layer, in one parallel call.

    Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (GQA). Heads run in parallel; each
    probes its own buckets (its own candidates, as its own ``w`` differs) and streams only
    its candidates' key and value rows.

    Parameters
    ----------
    q : [Hq, D] float32 queries; q_codes : [Hq, L] integer codes of the queries.
    keys, values : [Hkv, capacity, D] float32, C-contiguous (the layer's host tier).
    norms : [Hkv, >= n] float32 ``|k - mean|`` of key ids ``0..n-1`` (a capacity-sized buffer
        is fine); mean : [Hkv, D] float32, the centre the keys were hashed with.
    tables : stacked tables, ``offsets`` [Hkv, L, 2**K + 1], ``ids`` [Hkv, L, n], n <= capacity.
    scale : softmax scale.
    lo, hi : only key ids in ``[lo, hi)`` are sampled (default ``[0, n)``).
    n_candidates : optional [Hq] int32 array, filled with each head's number of candidates.

    Returns
    -------
    out : [Hq, D] float32; lse : [Hq] float32 (natural log; ``-inf`` with ``out = 0`` for a
    head without candidates).
    """
    keys, values = _f32(keys, "keys", 3), _f32(values, "values", 3)
    norms = _f32(norms, "norms", 2)
    q = np.ascontiguousarray(q, dtype=np.float32)
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    hkv, cap, d = keys.shape
    if tables.ids.ndim != 3:
        raise ValueError(f"tables must be stacked over KV heads ([Hkv, L, n] ids), got ids {tables.ids.shape}")
    q_codes = _check_q_codes(q_codes, tables)
    hq = q.shape[0]
    if (q.ndim != 2 or q.shape[1] != d or hq % hkv or values.shape != keys.shape or mean.shape != (hkv, d)
            or tables.ids.shape[0] != hkv or norms.shape[0] != hkv or norms.shape[1] < tables.n
            or q_codes.shape != (hq, tables.l)
            or tables.n > cap):
        raise ValueError(
            f"shapes disagree: q {q.shape} (Hq a multiple of Hkv), q_codes {q_codes.shape}, keys {keys.shape}, "
            f"values {values.shape}, norms {norms.shape}, mean {mean.shape}, table ids {tables.ids.shape}")
    lo, hi = _key_range(lo, hi, tables.n)
    out = np.empty((hq, d), dtype=np.float32)
    lse = np.empty(hq, dtype=np.float32)
    counts = np.empty(hq, dtype=np.int32) if n_candidates is None else n_candidates
    if counts.shape != (hq,) or counts.dtype != np.int32:
        raise ValueError(f"n_candidates must be an int32 array of shape ({hq},)")
    _lsh_attention(q, q_codes, keys, values, norms, mean, tables.offsets, tables.ids, lo, hi, tables.k,
                   float(scale), out, lse, counts)
    return out, lse
