"""Decode ms/token of quest (offloading) against dense, side by side in one run.

    python -m bench.sparse_decode [--quick] [--weights dense|quantized|both] [--out FILE]

Points: dense in place at 1k, 4k and 8k; quest at 4k, 8k and 32k with the bench's budget
(1024 tokens per step in each sparse layer, 2 dense layers; a device KV budget sized to its
resident set, so it offloads). A point is the median decode step of ``generate`` (32 new
tokens, the first step left out), repeated 3 times with a fresh prefill (once at 32k,
where a prefill takes minutes on 2 cores); the table gives the median over repeats and the
ratios the design asks for: quest at 32k against dense at 1k, quest against dense at the
same length.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from bench.plan import FULL
from bench.systems import device_kv_budget, hetero, hetero_sparse, policy_params

FULL_POINTS = [("dense", 1024, 3), ("dense", 4096, 3), ("dense", 8192, 3),
               ("quest", 4096, 3), ("quest", 8192, 3), ("quest", 32768, 1)]
QUICK_POINTS = [("dense", 1024, 1), ("dense", 2048, 1), ("quest", 2048, 1)]


def point(policy: str, n: int, repeats: int, new_tokens: int = 32, weights: str = "dense") -> dict:
    from bench.corpus import real_token_ids
    from hetero import LLM, SamplingParams
    from hetero.probe import time_decode_steps

    system = hetero("dense") if policy == "dense" else hetero_sparse("quest", FULL.token_budget, FULL.dense_layers)
    cap = n + new_tokens + 16
    with LLM(device="cpu", max_model_len=cap, device_kv_budget="1MiB") as probe:
        cfg = probe.config
    params = policy_params(system)
    llm = LLM(device="cpu", policy=policy, policy_params=params, max_model_len=cap,
              device_kv_budget=device_kv_budget(system, FULL, cfg, cap), weights=weights)
    ids = real_token_ids(llm.tokenizer, n)
    medians, offloaded = [], False
    with llm, time_decode_steps(llm) as steps:
        for _ in range(repeats):
            steps.clear()
            (out,) = llm.generate(ids, SamplingParams(max_new_tokens=new_tokens + 1, ignore_eos=True))
            medians.append(1e3 * statistics.median(steps[1:]))
            offloaded = out.stats.host_kv_bytes > 0
            print(f"{policy} {n} ({weights} weights): {medians[-1]:.1f} ms/token "
                  f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    return {"policy": policy, "context": n, "weights": weights, "repeats": repeats, "ms_per_token": medians,
            "median_ms": statistics.median(medians), "offloaded": offloaded}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sparse_decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1k-2k, one repeat (about a minute)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/sparse_decode.json"))
    ap.add_argument("--weights", choices=("dense", "quantized", "both"), default="dense",
                    help="the linear layers' weights (LLM(weights=...)); both: every point twice")
    args = ap.parse_args(argv)
    kinds = ["dense", "quantized"] if args.weights == "both" else [args.weights]
    rows = [point(*p, weights=w) for p in (QUICK_POINTS if args.quick else FULL_POINTS) for w in kinds]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    ms = {(r["policy"], r["context"], r["weights"]): r["median_ms"] for r in rows}
    print("| policy | context | weights | ms/token (median) | repeats | offloaded | × dense at 1k | "
          "× dense at the same length |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:  # ratios against dense with the same weights
        same = ms.get(("dense", r["context"], r["weights"]))
        vs_same = f"{r['median_ms'] / same:.2f}" if same else "-"
        print(f"| {r['policy']} | {r['context']} | {r['weights']} | {r['median_ms']:.1f} | {r['repeats']} | "
              f"{'yes' if r['offloaded'] else 'no'} | {r['median_ms'] / ms[('dense', 1024, r['weights'])]:.2f} | "
              f"{vs_same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
