"""Decode ms per step of magicpig with the local and the ray backend side by side, and the
ray backend's overhead per decode step (one actor call per sparse layer and step, whatever
the batch; a step decodes one token of each of ``--batch`` prompts).

    python -m bench.ray_overhead [--contexts 8192 16384] [--batch 1] [--new-tokens 32] [--out FILE]

Every point runs in a fresh process (its own Ray instance for ``ray``), on the embedded
model and real text, with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp-wait`` says otherwise
(spinning torch threads starve the actors: see ``orchestrator.ray_backend``). A step's time
is the wall time of one ``Engine.decode`` call (``hetero.probe.time_decode_steps``); the
first two steps (which wait for the tables' builds) are left out of the median. The
machine's load average is recorded with each point.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKENDS = ("local", "ray")


def point(backend: str, context: int, new_tokens: int, batch: int = 1) -> dict:
    """Time one generation of ``batch`` prompts (different text each) in this process."""
    from bench.corpus import real_token_ids
    from hetero import LLM, SamplingParams
    from hetero.probe import time_decode_steps

    with LLM(device="cpu", policy="magicpig", backend=backend, device_kv_budget="256MiB",
             max_model_len=context + new_tokens + 16) as llm:
        ids = [real_token_ids(llm.tokenizer, context, offset=i * 997) for i in range(batch)]
        load = os.getloadavg()[0]
        with time_decode_steps(llm) as steps:
            out = llm.generate(ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))[-1]
        row = {"backend": backend, "context": context, "batch": batch, "steps": len(steps),
               "decode_ms_per_step": 1e3 * statistics.median(steps[2:]),
               "ttft_s": out.stats.ttft_s, "load_before": load, "load_after": os.getloadavg()[0],
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
        if backend == "ray":
            import ray

            w = llm.backend.workers[0].actor  # the round trip of an empty call
            rtt = []
            for _ in range(200):
                t = time.perf_counter()
                ray.get(w.key_counts.remote())
                rtt.append(time.perf_counter() - t)
            row["empty_call_ms"] = 1e3 * statistics.median(rtt)
            row["calls_per_step"] = sum(len(w.layers) for w in llm.backend.workers)
        return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ray_overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--omp-wait", default="PASSIVE", help="OMP_WAIT_POLICY of the points ('' = unset)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/ray_overhead.json"))
    ap.add_argument("--point", nargs=2, metavar=("BACKEND", "CONTEXT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.point:
        print(json.dumps(point(args.point[0], int(args.point[1]), args.new_tokens, args.batch)))
        return 0
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if args.omp_wait:
        env["OMP_WAIT_POLICY"] = args.omp_wait
    rows = []
    for context in args.contexts:
        for backend in BACKENDS:
            p = subprocess.run([sys.executable, "-m", "bench.ray_overhead", "--new-tokens", str(args.new_tokens),
                                "--batch", str(args.batch), "--point", backend, str(context)],
                               env=env, capture_output=True, text=True)
            if p.returncode:
                sys.stderr.write(p.stderr[-3000:])
                return 1
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("| context | batch | local ms/step | ray ms/step | overhead ms/step | ray calls/step | empty call ms | load |")
    print("|---|---|---|---|---|---|---|---|")
    for context in args.contexts:
        loc, ray_ = (next(r for r in rows if r["context"] == context and r["backend"] == b) for b in BACKENDS)
        print(f"| {context} | {args.batch} | {loc['decode_ms_per_step']:.1f} | {ray_['decode_ms_per_step']:.1f} | "
              f"{ray_['decode_ms_per_step'] - loc['decode_ms_per_step']:.1f} | {ray_['calls_per_step']} | "
              f"{ray_['empty_call_ms']:.2f} | {loc['load_before']:.2f} / {ray_['load_before']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
