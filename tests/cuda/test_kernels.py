"""Every public Triton launcher of ``gpu_kernels``, compiled, on CUDA tensors of realistic
shapes against the float64 oracles of the CPU tests (``make test-cuda``; skipped without a GPU).

Shapes: head_dim 64 and 128; GQA groups 4 (32/8), 8 (32/4) and SmolLM2-135M's 3 (9/3); up to
32k keys; batch 1 and 8; block tables listing a shuffled permutation of the cache's pages
(per KV head for decode); prefill chunks of 1024 and 4096 over up to 32k prior keys;
block-quantised GEMVs of SmolLM2's 3072x576 projection and 49152x576 LM head at 1 to 8 rows.
Inputs are rounded to the dtype first and the oracle runs in float64 on the rounded values.
Each test also checks that the launcher dispatched to its Triton path, and only to it.
"""

import importlib
from collections import Counter

import pytest
import torch

from gpu_kernels import (
    merge_partials, paged_decode_attention, prefill_attention, prior_attention, quant_linear,
    quest_page_scores, simhash_codes,
)
from tests.cpu_kernels.lsh_reference import simhash_reference
from tests.gpu_kernels.test_quest import _brute as quest_oracle
from tests.oracle import attention_oracle

DEVICE = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (out atol, out rtol, lse atol) against the float64 oracle. The kernels' dots are ieee fp32,
# so fp32 must stay far below TF32's ~1e-3; in bf16 and fp16 the error is that of rounding P
# before P @ V and of rounding the output. (gpu_check passed these on an H200 at 32k keys.)
TOL = {
    torch.float32: (1e-4, 1e-4, 1e-4),
    torch.bfloat16: (2e-2, 2e-2, 1e-2),
    torch.float16: (5e-3, 5e-3, 5e-3),
}
HEADS = [(32, 8, 128), (32, 4, 64), (9, 3, 64)]  # (Hq, Hkv, D): GQA 4, 8, and SmolLM2's 3
PS = 16  # the engine's default page size
Q_STD = 2.0  # queries of std 2: peaked softmax rows, not near-uniform averages
ORACLE_ROWS = 512  # query rows per oracle call: [32 heads, 512, 36k keys] float64 is ~5 GiB

# Decode, dense tables: the lengths of a batch of 1 and of 8 sequences.
DENSE_LENS = {1: [32771], 8: [1, 15, 16, 17, 1000, 4099, 16384, 32771]}
# Decode, per-KV-head tables: head h of sequence b holds PER_HEAD_LENS[(b + h) % 8] tokens.
PER_HEAD_LENS = [32768, 0, 17, 4099, 1, 31000, 16, 2049]
PER_HEAD_BATCH = 8
PREFILL_CASES = [(0, 4096), (5003, 1024), (32768, 1024), (32768, 4096)]  # (start, C)
PRIOR_CASES = [(0, 1024), (20001, 1024), (32768, 4096)]  # (n_keys, C)
N_KEYS = 32768  # keys of the merged partials and of the SimHash rows; pages * PS of Quest
MERGE_SHAPE = (8, 32, 8, 128)  # (B, Hq, Hkv, D) of the decode queries whose partials merge
LSH_K, LSH_L = 8, 75  # MagicPIG's defaults: bits per table, tables

# Each launcher's Triton path and CPU path(s): (module, function names).
PATHS = [
    ("gpu_kernels.decode", ("_decode_triton", "_decode_torch")),
    ("gpu_kernels.prefill", ("_prefill_triton", "_prefill_torch", "_prior_torch")),
    ("gpu_kernels.merge", ("_merge_triton", "_merge_torch")),
    ("gpu_kernels.quest", ("_quest_triton", "_quest_torch")),
    ("gpu_kernels.simhash", ("_simhash_triton", "_simhash_torch")),
    ("gpu_kernels.quant_gemv", ("_quant_gemv_triton", "_quant_gemv_torch")),
]


def _name(param) -> str:
    """Test id of a parameter: ``float32`` for ``torch.float32``."""
    return str(param).removeprefix("torch.")


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Calls of each launcher path by name, counted by spies that call through."""
    counts = Counter()

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for module_name, names in PATHS:
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    return counts


def _assert_took(calls: Counter, path: str) -> None:
    assert set(calls) == {path}, f"dispatch took {dict(calls)}, expected only {path}"


def _randn(shape, seed: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    """Normal values of standard deviation ``std`` on the device, rounded to ``dtype``."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=DEVICE) * std).to(dtype)


def _shuffled_pages(n_pages: int, seed: int) -> torch.Tensor:
    """A random permutation of the page ids ``0 .. n_pages-1``, int32 on the host."""
    return torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed)).to(torch.int32)


def _assert_matches(out, lse, ref_out, ref_lse, dtype) -> None:
    """``out`` (dtype) and ``lse`` (float32) match the float64 oracle within ``TOL[dtype]``."""
    atol, rtol, lse_atol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=lse_atol, rtol=0.0)  # -inf must match


# --- paged decode -------------------------------------------------------------------------


def _decode_table(lens: list[list[int]], hkv: int, per_head: bool, seed: int) -> tuple[torch.Tensor, int]:
    """Block table [B, Hkv, P] int32 on the device for ``lens`` [B][Hkv] tokens, and the pages
    of its cache.

    Each KV head (``per_head``) or each sequence's one list (expanded over the heads with stride
    0, as the dense engine passes it) takes its pages in turn from a shuffled permutation of the
    cache's pages; entries past the pages in use are -1, as the engine pads.
    """
    need = [[-(-n // PS) for n in row] for row in lens]
    heads = hkv if per_head else 1
    n_pages = max(sum(row[h] for row in need) for h in range(heads)) + 4
    table = torch.full((len(lens), heads, max(max(row) for row in need) + 2), -1, dtype=torch.int32)
    for h in range(heads):
        free, used = _shuffled_pages(n_pages, seed + h), 0
        for i, row in enumerate(need):
            table[i, h, : row[h]] = free[used : used + row[h]]
            used += row[h]
    return table.to(DEVICE).expand(-1, hkv, -1), n_pages


def _decode_oracle(q, k_cache, v_cache, table, kv_lens, scale):
    """float64 oracle of ``paged_decode_attention``: each (sequence, KV head) separately, its
    keys gathered through its page list. Returns out [B, Hq, D] and lse [B, Hq]."""
    b, hq, d = q.shape
    g = hq // k_cache.shape[0]
    out = torch.empty(b, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.empty(b, hq, dtype=torch.float64, device=q.device)
    for i in range(b):
        for h in range(k_cache.shape[0]):
            n = int(kv_lens[i, h])
            t = torch.arange(n, device=q.device)
            slots = table[i, h, t // PS].long() * PS + t % PS
            heads = slice(h * g, (h + 1) * g)
            o, l = attention_oracle(q[i, None, heads], k_cache[h, slots, None], v_cache[h, slots, None],
                                    torch.full((1,), n, device=q.device), t, scale)
            out[i, heads], lse[i, heads] = o[0], l[0]
    return out, lse


def _check_decode(calls, dtype, hq, hkv, d, lens, per_head, seed):
    table, n_pages = _decode_table(lens, hkv, per_head, seed)
    k_cache = _randn((hkv, n_pages * PS, d), seed + 1, dtype)
    v_cache = _randn((hkv, n_pages * PS, d), seed + 2, dtype)
    q = _randn((len(lens), hq, d), seed + 3, dtype, Q_STD)
    kv_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out, lse = paged_decode_attention(q, k_cache, v_cache, table, kv_lens, d**-0.5, PS)
    _assert_took(calls, "_decode_triton")
    _assert_matches(out, lse, *_decode_oracle(q, k_cache, v_cache, table, kv_lens, d**-0.5), dtype)


@pytest.mark.parametrize("batch", sorted(DENSE_LENS))
@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_paged_decode_dense_tables(calls, dtype, hq, hkv, d, batch):
    """One shuffled page list per sequence for all KV heads (stride 0); lengths from 1 token,
    across page boundaries, to 32k."""
    lens = [[n] * hkv for n in DENSE_LENS[batch]]
    _check_decode(calls, dtype, hq, hkv, d, lens, per_head=False, seed=batch + hq + d)


@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_paged_decode_per_head_tables(calls, dtype, hq, hkv, d):
    """Sparse policies' tables: every KV head lists its own shuffled pages and has its own
    length, from 0 (out 0, lse -inf) to 32k."""
    lens = [[PER_HEAD_LENS[(i + h) % 8] for h in range(hkv)] for i in range(PER_HEAD_BATCH)]
    _check_decode(calls, dtype, hq, hkv, d, lens, per_head=True, seed=100 + hq + d)


# --- prefill and prior attention ----------------------------------------------------------


def _paged_kv(hkv, d, dtype, n_keys, seed):
    """Caches [Hkv, n_slots, D] (dtype) and a block table [P] int32 that lists ``n_keys`` keys
    on a shuffled permutation of the cache's pages (4 pages unused), then two -1 entries."""
    n_used = -(-n_keys // PS)
    n_pages = n_used + 4
    table = torch.cat([_shuffled_pages(n_pages, seed)[:n_used], torch.full((2,), -1, dtype=torch.int32)])
    k_cache = _randn((hkv, n_pages * PS, d), seed + 1, dtype)
    v_cache = _randn((hkv, n_pages * PS, d), seed + 2, dtype)
    return k_cache, v_cache, table.to(DEVICE)


def _paged_oracle(q, q_pos, k_cache, v_cache, table, n_keys, scale):
    """float64 oracle of queries q [C, Hq, D] at positions q_pos [C] over the first ``n_keys``
    keys of ``table`` (key t at position t), ``ORACLE_ROWS`` query rows at a time."""
    t = torch.arange(n_keys, device=q.device)
    slots = table[t // PS].long() * PS + t % PS
    k, v = k_cache[:, slots].transpose(0, 1), v_cache[:, slots].transpose(0, 1)
    parts = [attention_oracle(q[r : r + ORACLE_ROWS], k, v, q_pos[r : r + ORACLE_ROWS], t, scale)
             for r in range(0, q.shape[0], ORACLE_ROWS)]
    return torch.cat([out for out, _ in parts]), torch.cat([lse for _, lse in parts])


@pytest.mark.parametrize("start,c", PREFILL_CASES)
@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_prefill_attention(calls, dtype, hq, hkv, d, start, c):
    """A causal chunk at ``start`` whose own keys are in the cache: the first chunk, one that
    starts mid-page, and chunks of 1024 and 4096 after 32k keys."""
    seed = start + c + hq + d
    k_cache, v_cache, table = _paged_kv(hkv, d, dtype, start + c, seed)
    q = _randn((c, hq, d), seed + 3, dtype, Q_STD)
    out, lse = prefill_attention(q, k_cache, v_cache, table, start, d**-0.5, PS)
    _assert_took(calls, "_prefill_triton")
    q_pos = torch.arange(start, start + c, device=DEVICE)
    ref = _paged_oracle(q, q_pos, k_cache, v_cache, table, start + c, d**-0.5)
    _assert_matches(out, lse, *ref, dtype)


@pytest.mark.parametrize("n_keys,c", PRIOR_CASES)
@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_prior_attention(calls, dtype, hq, hkv, d, n_keys, c):
    """Every query of a chunk over the first ``n_keys`` keys, no mask: none (the empty partial),
    an odd count, and 32k keys under a chunk of 4096."""
    seed = 1 + n_keys + c + hq + d
    k_cache, v_cache, table = _paged_kv(hkv, d, dtype, n_keys, seed)
    q = _randn((c, hq, d), seed + 3, dtype, Q_STD)
    out, lse = prior_attention(q, k_cache, v_cache, table, n_keys, d**-0.5, PS)
    _assert_took(calls, "_prefill_triton")
    q_pos = torch.full((c,), n_keys, device=DEVICE)  # after every key: the causal rule masks nothing
    ref = _paged_oracle(q, q_pos, k_cache, v_cache, table, n_keys, d**-0.5)
    _assert_matches(out, lse, *ref, dtype)


# --- merge, Quest scores, SimHash codes ---------------------------------------------------


@pytest.mark.parametrize("n_parts", [3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_merge_partials(calls, dtype, n_parts):
    """Partials of decode queries over disjoint shuffled sets of 32k keys, the first set empty,
    merge to attention over all the keys; a sequence empty in every partial gives 0 and -inf."""
    b, hq, hkv, d = MERGE_SHAPE
    q = _randn((b, hq, d), n_parts, dtype, Q_STD)
    k, v = _randn((N_KEYS, hkv, d), n_parts + 1, dtype), _randn((N_KEYS, hkv, d), n_parts + 2, dtype)
    perm = torch.randperm(N_KEYS, generator=torch.Generator().manual_seed(n_parts)).to(DEVICE)
    pos = torch.zeros(max(b, N_KEYS), dtype=torch.long, device=DEVICE)  # every key visible
    partials = []
    for keys in [perm[:0], *perm.tensor_split(n_parts - 1)]:
        out, lse = attention_oracle(q, k[keys], v[keys], pos[:b], pos[: len(keys)], d**-0.5)
        out, lse = out.to(dtype), lse.float()
        out[0], lse[0] = 0.0, float("-inf")
        partials.append((out, lse))
    out, lse = merge_partials(*partials)
    _assert_took(calls, "_merge_triton")
    ref_out, ref_lse = attention_oracle(q, k, v, pos[:b], pos[:N_KEYS], d**-0.5)
    ref_out[0], ref_lse[0] = 0.0, float("-inf")
    _assert_matches(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("hq,hkv,d", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_quest_page_scores(calls, dtype, hq, hkv, d):
    """Quest's page bounds of one query over the pages of 32k keys."""
    n_pages = N_KEYS // PS
    q = _randn((hq, d), hq + d, dtype)
    a, b = _randn((2, hkv, n_pages, d), hq + d + 1, dtype)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    scores = quest_page_scores(q, kmin, kmax)
    _assert_took(calls, "_quest_triton")
    assert scores.dtype == torch.float32 and scores.shape == (hkv, n_pages)
    # fp32 sums over D of products of the same rounded inputs (as the CPU test allows).
    ref = quest_oracle(q.cpu(), kmin.cpu(), kmax.cpu())
    torch.testing.assert_close(scores.cpu().double(), ref, atol=1e-4, rtol=1e-5)


# Small integers in every dtype; Gaussian values in fp32 and bf16, the default dtype on CUDA
# (the reference runs on the host: ~1 s per case at 32k keys x 8 heads).
SIMHASH_CASES = [(dtype, "integers") for dtype in DTYPES] + [(torch.float32, "gaussian"),
                                                             (torch.bfloat16, "gaussian")]


@pytest.mark.parametrize("hq,hkv,d", [HEADS[0], HEADS[2]])
@pytest.mark.parametrize("dtype,values", SIMHASH_CASES, ids=_name)
def test_simhash_codes(calls, dtype, values, hq, hkv, d):
    """MagicPIG's codes of 32k centred keys per KV head and of a batch of 8 queries. Small
    integers project exactly, so their codes equal the reference's bit for bit; a Gaussian
    projection within rounding of 0 may flip a bit (a few codes in a million)."""
    g = torch.Generator(DEVICE).manual_seed(hq + d)

    def draw(*shape):
        if values == "integers":
            return torch.randint(-2, 3, shape, generator=g, device=DEVICE).to(dtype)
        return torch.randn(shape, generator=g, device=DEVICE).to(dtype)

    keys, center, queries = draw(hkv, N_KEYS, d), draw(hkv, d).float(), draw(8, hq, d)
    r = draw(d, LSH_K * LSH_L).float()
    key_codes = simhash_codes(keys, r, LSH_K, LSH_L, center=center)
    query_codes = simhash_codes(queries, r, LSH_K, LSH_L)
    _assert_took(calls, "_simhash_triton")
    assert key_codes.dtype == query_codes.dtype == torch.uint16
    assert key_codes.shape == (hkv, N_KEYS, LSH_L) and query_codes.shape == (8, hq, LSH_L)
    max_differing = 0.0 if values == "integers" else 1e-4
    for codes, x, c in [(key_codes, keys, center), (query_codes, queries, None)]:
        ref = simhash_reference(x.cpu(), r.cpu(), LSH_K, LSH_L, None if c is None else c.cpu())
        differing = (codes.cpu().long() != ref).double().mean().item()
        assert differing <= max_differing, f"{differing:.2e} of the codes differ from the reference"


def test_kernels_are_compiled():
    """Under Triton's interpreter these tests would not test the compiled kernels."""
    from triton.runtime.interpreter import InterpretedFunction

    from gpu_kernels import decode, merge, prefill, quant_gemv, quest, simhash

    kernels = [decode._decode_split_kernel, merge._merge_kernel, prefill._prefill_kernel,
               quest._quest_kernel, simhash._simhash_kernel, quant_gemv._quant_gemv_kernel]
    assert not any(isinstance(kernel, InterpretedFunction) for kernel in kernels)


# --- block-quantised linear ---------------------------------------------------------------

# (rows, cols, n): SmolLM2-135M's fused gate/up projection at decode batch 1, 3 and 8, and its
# 49152x576 LM head at batch 1 and 8.
QUANT_SHAPES = [(3072, 576, 1), (3072, 576, 3), (3072, 576, 8), (49152, 576, 1), (49152, 576, 8)]


def _quant_weight(rows: int, cols: int, kind: str, seed: int):
    """Codes and scales shaped as ``cpu_kernels.quant.unpack`` gives them for ``kind``, on the
    device: Q4_0 codes -8..7 with m = 0, Q4_1 codes 0..15 with an offset, Q8_0 int8 codes with
    m = 0. Weights are ~0.05 in size, so outputs are of order 1."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    nb = cols // 32
    lo, hi, d_size = {"Q4_0": (-8, 8, 0.02), "Q4_1": (0, 16, 0.02), "Q8_0": (-128, 128, 0.001)}[kind]
    q = torch.randint(lo, hi, (rows, cols), generator=g, device=DEVICE).to(torch.int8)
    d = (torch.rand(rows, nb, generator=g, device=DEVICE) + 0.25) * d_size
    m = torch.zeros_like(d)
    if kind == "Q4_1":
        m = -8 * d + torch.randn(rows, nb, generator=g, device=DEVICE) * 0.01
    return q, d, m


@pytest.mark.parametrize("rows,cols,n", QUANT_SHAPES)
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_quant_linear(calls, dtype, kind, rows, cols, n):
    """``x @ W.T`` over a block-quantised weight against the float64 product with the
    dequantised weight, at decode's few rows of x."""
    q, d, m = _quant_weight(rows, cols, kind, seed=rows + n)
    x = _randn((n, cols), rows + n + 1, dtype)
    out = quant_linear(x, q, d, m)
    _assert_took(calls, "_quant_gemv_triton")
    assert out.dtype == dtype and out.shape == (n, rows) and out.device == x.device
    w = q.double().view(rows, -1, 32) * d.double()[..., None] + m.double()[..., None]
    ref = x.double() @ w.view(rows, cols).T
    atol, rtol, _ = TOL[dtype]  # fp32 sums of 576 products; bf16, fp16: the output's rounding
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
