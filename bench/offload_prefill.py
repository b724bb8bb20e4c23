"""Time to first token of offloading sequences against dense in place, side by side.

    python -m bench.offload_prefill [--quick] [--contexts 8192 16384] [--repeats 3 1] [--out FILE]

An offloading sequence is prefilled layer by layer with one layer's whole KV on the device
(``hetero.engine``); this measures what that costs against dense attention with the whole
KV on the device, at the same length, on the embedded model and real text. Systems:

- ``dense in place``: the whole KV fits the budget (nothing moves);
- ``dense over budget``: a budget of the resident set plus one layer (it offloads);
- ``quest``, ``streaming``: 1024 tokens per step in each sparse layer, 2 dense layers, with
  the budgets the bench gives them (``bench.systems.device_kv_budget``).

Each system has its own ``LLM`` (loaded once); repeats interleave the systems so drift in
the machine's load hits them alike. A point is ``generate(max_new_tokens=1)``'s TTFT; the
table gives medians and each system's ratio to dense in place at that length.
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

SYSTEMS = ("dense in place", "dense over budget", "quest", "streaming")


def _llms(n_tokens: int) -> dict:
    """One LLM per system for prompts of ``n_tokens`` (plus the token generated)."""
    from hetero import LLM
    from hetero.policies import make_policy

    plan, cap = FULL, n_tokens + 16
    with LLM(device="cpu", max_model_len=cap, device_kv_budget="1MiB") as probe:
        cfg, chunk, ps, page_bytes = probe.config, probe.engine.prefill_chunk, probe.store.page_size, probe.store.page_bytes
    specs = {"dense in place": hetero("dense"),
             "quest": hetero_sparse("quest", plan.token_budget, plan.dense_layers),
             "streaming": hetero_sparse("streaming", plan.token_budget, plan.dense_layers)}
    args = {name: dict(policy=s.params["policy"], device_kv_budget=device_kv_budget(s, plan, cfg, cap),
                       policy_params=policy_params(s))
            for name, s in specs.items()}
    # the resident set and one layer's whole KV: it offloads, and prefills layer by layer
    pages = make_policy("dense").device_pages(cfg, cap, ps, chunk)
    assert pages < cfg.n_layers * -(-cap // ps)
    args["dense over budget"] = dict(policy="dense", device_kv_budget=pages * page_bytes)
    return {name: LLM(device="cpu", max_model_len=cap, prefill_chunk=chunk, **args[name]) for name in SYSTEMS}


def run(contexts: list[int], repeats: list[int]) -> list[dict]:
    from bench.corpus import real_token_ids
    from hetero import SamplingParams

    rows = []
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for n, reps in zip(contexts, repeats):
        llms = _llms(n)
        ids = real_token_ids(next(iter(llms.values())).tokenizer, n)
        times = {name: [] for name in SYSTEMS}
        stats = {}
        for rep in range(reps):
            for name in SYSTEMS:
                (out,) = llms[name].generate(ids, one)
                times[name].append(out.stats.ttft_s)
                stats[name] = out.stats
                print(f"{n} {name} #{rep + 1}: {out.stats.ttft_s:.2f} s (load {os.getloadavg()[0]:.2f})",
                      file=sys.stderr)
        base = statistics.median(times["dense in place"])
        for name in SYSTEMS:
            s = stats[name]
            rows.append({"system": name, "context": n, "repeats": reps, "ttft_s": times[name],
                         "ttft_median_s": statistics.median(times[name]),
                         "ratio_to_dense_in_place": statistics.median(times[name]) / base,
                         "offloaded": s.host_kv_bytes > 0, "d2h_bytes": s.d2h_bytes, "h2d_bytes": s.h2d_bytes,
                         "device_kv_bytes_peak": s.device_kv_bytes_peak, "device_kv_budget": s.device_kv_budget})
        for llm in llms.values():
            llm.close()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| context | system | repeats | TTFT s (median) | × dense in place | offloaded | "
             "device KV peak / budget MiB | host→device MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['system']} | {r['repeats']} | {r['ttft_median_s']:.2f} | "
                     f"{r['ratio_to_dense_in_place']:.2f} | {'yes' if r['offloaded'] else 'no'} | "
                     f"{r['device_kv_bytes_peak'] / 2**20:.1f} / {r['device_kv_budget'] / 2**20:.1f} | "
                     f"{r['h2d_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.offload_prefill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2k tokens, one repeat (about a minute)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None, help="default 8192 16384")
    ap.add_argument("--repeats", type=int, nargs="+", default=None,
                    help="repeats per context (default 3 at 8k, 1 beyond)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/offload_prefill.json"))
    args = ap.parse_args(argv)
    contexts = args.contexts or ([2048] if args.quick else [8192, 16384])
    repeats = args.repeats or [1 if args.quick or n > 8192 else 3 for n in contexts]
    if len(repeats) == 1:
        repeats = repeats * len(contexts)
    if len(repeats) != len(contexts) or min(repeats) < 1 or min(contexts) < 256:
        ap.error("give one repeat count (>= 1) per context (>= 256 tokens), or one for all")
    rows = run(contexts, repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
