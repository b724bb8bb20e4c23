"""The kernels workload: the CPU sampled-attention kernel (``cpu_kernels.lsh_attention``)
against the machine's copy bandwidth, its physical limit.

A magicpig run over real text records the queries and codes its CPU workers received at
every decode step and sparse layer; afterwards each call is timed again alone, on one
thread (as the local backend runs it), over the tables the run built. Bytes per call
count what the kernel must read: per query head the L bucket offsets and id runs it
probes, and the key and value rows (plus a norm) of each candidate it samples. The copy
bandwidth is ``numpy.copyto`` of a buffer far larger than the caches on one thread,
counting the bytes read and written. The tables of every sparse layer are then built
again, one layer at a time on one thread: the build time that a magicpig request's prompt
ends with (its first decode steps wait for builds still running).
"""

from __future__ import annotations

import time

import numba
import numpy as np

from bench.results import summary
from bench.session import Session
from bench.systems import System, hetero, hetero_llm_args

COPY_BYTES = 256 * 2**20
COPY = System("copy", "hetero", "numpy copy, one thread (the limit)")
KERNEL = System("lsh_attention", "hetero", "cpu_kernels.lsh_attention, one thread")


def copy_bandwidth(repeats: int = 5, n_bytes: int = COPY_BYTES) -> list[float]:
    """GB/s of one-thread copies of ``n_bytes`` (read + write counted)."""
    src = np.ones(n_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        runs.append(2 * n_bytes / (time.perf_counter() - t) / 1e9)
    return runs


def _call_bytes(st, q_codes: np.ndarray, counts: np.ndarray) -> int:
    """Bytes one ``lsh_attention`` call reads: offsets and id runs of the probed buckets,
    and K, V rows and norms of the candidates (every query head)."""
    hkv, n_tables = st.tables.offsets.shape[:2]
    hq = q_codes.shape[0]
    kv = np.arange(hq) // (hq // hkv)
    off = st.tables.offsets[kv[:, None], np.arange(n_tables), q_codes.astype(np.int64)]
    nxt = st.tables.offsets[kv[:, None], np.arange(n_tables), q_codes.astype(np.int64) + 1]
    d = st.keys.shape[2]
    return int(8 * hq * n_tables + 4 * (nxt - off).sum() + counts.sum() * (2 * d * 4 + 4))


def _time_calls(backend, calls: list, host_tier) -> dict:
    """Time ``lsh_attention`` on each recorded call, over the tables the workers hold, and
    each layer's table build (one numba thread, as a worker runs)."""
    from cpu_kernels import lsh_attention

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    times, rates, shares, per_key = [], [], [], []
    try:
        for i, (seq_id, layer, q, q_codes) in enumerate(calls):
            worker = backend.worker(layer)
            st = worker.state[(seq_id, layer)]
            counts = np.empty(q.shape[0], dtype=np.int32)
            args = (q, q_codes, st.keys, st.values, st.norms, st.mean, st.tables, worker.scale,
                    st.lo, st.hi)
            if i == 0:  # compile; later calls read other layers' rows, not cached ones
                lsh_attention(*args, n_candidates=counts)
            t = time.perf_counter()
            lsh_attention(*args, n_candidates=counts)
            dt = time.perf_counter() - t
            times.append(dt * 1e6)
            rates.append(_call_bytes(st, q_codes, counts) / dt / 1e9)
            shares.append(float(counts.mean()) / (st.hi - st.lo))
            per_key.append(st.nbytes / (st.keys.shape[0] * (st.hi - st.lo)))
        builds = []  # each sparse layer's tables again, as the prefill built them
        for seq_id, layer in sorted({(s, layer) for s, layer, _, _ in calls}):
            worker = backend.worker(layer)
            st = worker.state[(seq_id, layer)]
            t = time.perf_counter()
            worker.build(host_tier(seq_id, layer, st.keys, st.values, st.lo, st.hi))
            builds.append(1e3 * (time.perf_counter() - t))
    finally:
        numba.set_num_threads(threads)
    return {"times": times, "rates": rates, "shares": shares, "per_key": per_key, "builds": builds}


def kernel_rows(session: Session, n: int, bar) -> list[dict]:
    """Time every recorded worker call of a magicpig run over ``n`` tokens of real text."""
    from hetero import LLM, SamplingParams
    from hetero.backend import HostTier
    from hetero.probe import hooked

    plan, steps = session.plan, session.plan.error_steps
    system = hetero("magicpig", dense_layers=plan.dense_layers)
    llm = LLM(device="cpu", **hetero_llm_args(system, plan, session.config, n + steps + 16))
    policy, backend, calls = llm.policy, llm.backend, []
    timed: dict = {}

    def record(layer, q, step_plan, out):  # the queries the workers receive
        if layer >= policy.dense_layers:
            for b, seq_id in enumerate(step_plan.step.seq_ids):
                codes = policy.hash(layer, q[b : b + 1].float())[0]
                calls.append((seq_id, layer, q[b].float().numpy().copy(), codes.numpy().copy()))

    def time_calls(_):  # after each step; the last one times, while the tables are live
        if len(calls) == steps * (llm.config.n_layers - policy.dense_layers):
            timed.update(_time_calls(backend, calls, HostTier))

    try:
        with hooked(llm.engine.attention_hooks, record), hooked(llm.engine.step_hooks, time_calls):
            llm.generate(session.text_ids(n), SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
    finally:
        llm.close()
    times, rates, shares, per_key, builds = (timed[k] for k in ("times", "rates", "shares", "per_key", "builds"))
    bar.update()
    d = session.config.head_dim
    return [{"system": KERNEL.name, "test": "bandwidth", "context": n, "labels": [],
             "calls": len(calls),
             "metrics": {"us_per_call": summary(times), "gb_per_s": summary(rates),
                         "sampled_share": summary(shares),
                         "build_ms_per_layer": summary(builds),
                         "build_s_all_layers": summary([sum(builds) / 1e3]),
                         "table_bytes_per_key": summary(per_key),
                         "kv_bytes_per_key": summary([2.0 * d * 4])}}]


def kernels(session: Session) -> dict:
    """Copy bandwidth and the sampled-attention kernel's bandwidth at each kernel context."""
    plan = session.plan
    with session.bar(1 + len(plan.kernel_contexts), "kernels") as bar:
        bar.set_postfix_str("copy bandwidth")
        rows = [{"system": COPY.name, "test": "bandwidth", "labels": [],
                 "metrics": {"gb_per_s": summary(copy_bandwidth())}}]
        bar.update()
        for n in plan.kernel_contexts:
            bar.set_postfix_str(f"lsh_attention {n} tok")
            rows += kernel_rows(session, n, bar)
    doc = session.doc("kernels", [COPY, KERNEL], {})
    doc["rows"] = rows
    return doc
