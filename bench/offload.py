"""KV offload under a device budget: decode speed, traffic and fidelity, side by side in one run.

Speed: decode ms/token of ``quest`` (KV offloaded, small device budget) at long contexts
against ``dense`` (all KV on the device) at the same context and against ``dense`` at 1k,
with host->device bytes per token as a share of the full KV and device bytes against the
budget. Fidelity: mean relative attention-output error against exact attention for
``quest`` and ``streaming`` at the same token budget on real text (first two layers exact
in both, errors over the others). Embedded SmolLM2-135M, fp32, real text.

    python -m bench.offload [--contexts 16384 32768] [--fidelity 4096 8192 16384] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.dense_vs_hf import real_token_ids
from bench.fidelity import attention_error
from hetero import LLM, SamplingParams
from hetero.device import format_size


def decode_run(llm: LLM, ids: list[int], n_decode: int) -> dict:
    (out,) = llm.generate(ids, SamplingParams(max_new_tokens=n_decode, ignore_eos=True))
    s = out.stats
    full_kv = (len(ids) + n_decode) * llm.config.kv_bytes_per_token(llm.dtype.itemsize)
    return {
        "context": len(ids),
        "decode_ms": 1000.0 / s.decode_tokens_per_s,
        "h2d_bytes_per_token": s.h2d_bytes_per_token,
        "h2d_share_of_full_kv": s.h2d_bytes_per_token / full_kv,
        "cache_hit_rate": s.cache_hit_rate,
        "device_kv_bytes_peak": s.device_kv_bytes_peak,
        "device_kv_budget": s.device_kv_budget,
        "full_kv_bytes": full_kv,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--fidelity", type=int, nargs="*", default=[4096, 8192, 16384])
    ap.add_argument("--token-budget", type=int, default=1024)
    ap.add_argument("--quest-budget", default="400MiB", help="device KV budget for quest")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1, help="decode runs per point (median)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    longest = max([1024, *args.contexts, *args.fidelity]) + args.decode + 1

    def make(policy: str, budget=None, **params) -> LLM:
        return LLM(device="cpu", policy=policy, policy_params=params, device_kv_budget=budget,
                   max_model_len=longest)

    dense = make("dense")
    quest = make("quest", args.quest_budget, token_budget=args.token_budget)
    text_ids = real_token_ids(dense.tokenizer, max([1024, *args.contexts, *args.fidelity]))

    def median_run(llm, n):
        runs = [decode_run(llm, text_ids[:n], args.decode) for _ in range(args.repeats)]
        return min(runs, key=lambda r: abs(r["decode_ms"] - statistics.median(x["decode_ms"] for x in runs)))

    speed = [{"policy": "dense", **median_run(dense, 1024)}]
    for n in args.contexts:
        speed.append({"policy": "dense", **median_run(dense, n)})
        speed.append({"policy": "quest", **median_run(quest, n)})
    base = speed[0]["decode_ms"]

    fidelity = []
    for n in args.fidelity:
        ids = text_ids[:n]
        q = attention_error(make("quest", "1GiB", token_budget=args.token_budget, dense_layers=2),
                            ids, skip_layers=2)
        s = attention_error(make("streaming", "1GiB", n_local=args.token_budget - 4, dense_layers=2),
                            ids, skip_layers=2)
        fidelity.append({"context": n, "token_budget": args.token_budget, "quest": q, "streaming": s})

    print(f"\nDecode, embedded SmolLM2-135M fp32, {torch.get_num_threads()} threads, "
          f"quest token_budget {args.token_budget}\n")
    print("| policy | context | decode ms/tok | vs dense @1k | h2d/token | share of full KV | "
          "page-cache hits | device KV peak / budget |")
    print("|---|---|---|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['policy']} | {r['context']} | {r['decode_ms']:.1f} | {r['decode_ms'] / base:.2f}x | "
              f"{format_size(int(r['h2d_bytes_per_token']))} | {100 * r['h2d_share_of_full_kv']:.2f}% | "
              f"{100 * r['cache_hit_rate']:.0f}% | {format_size(r['device_kv_bytes_peak'])} / "
              f"{format_size(r['device_kv_budget'])} (full KV {format_size(r['full_kv_bytes'])}) |")
    if fidelity:
        print("\n| context | token budget | quest attention error | streaming attention error |")
        print("|---|---|---|---|")
        for r in fidelity:
            print(f"| {r['context']} | {r['token_budget']} | {r['quest']:.3f} | {r['streaming']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"speed": speed, "fidelity": fidelity}, indent=2))


if __name__ == "__main__":
    main()
