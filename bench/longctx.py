"""Long-context passkey retrieval and speed: actqkv against quest, streaming and dense.

    python -m bench.longctx [--quick] [--lengths 16k,32k,...] [--policies ...] [--depths ...]
                            [--dense-max-len N] [--progress] [--out DIR]
    hetero bench longctx [--quick] [--contexts N ...] [--out DIR]

A passkey (``bench.corpus.needle_cases``) hidden at several depths of the passkey task's
repeated filler (``FILLER``), each prompt about ``length`` tokens, then the question; greedy decode of ``n_decode + 1`` tokens with ``ignore_eos``: a
trial is correct when the key's digits appear in the output. Lengths 16k-128k; 5 depths
(0.1-0.9) each; one trial per (length, depth): about 75 minutes on 2 cores. ``actqkv`` runs at every length (it reads
past the model's trained context); ``quest`` and ``streaming`` up to 16k (their exact
prefill is quadratic: ~5 min per 32k prompt on 2 cores), ``dense`` up to
``--dense-max-len`` (8k): those get ``max_model_len`` explicitly and their rows beyond the
trained context are labelled so.

Per (policy, length): prefill s (the request's TTFT) and its growth from the policy's
shortest length, decode ms/token (median step, the first left out, ``hetero.probe``),
host->device bytes per decoded token, device KV peak against the budget, accuracy per
depth; decode is also given against dense at 1k, timed just before each length (a shared
machine's speed drifts over the hour of the run). Writes
``DIR/longctx.json`` (``bench.results``; the derived tables under ``tables``) and prints
the tables in Markdown. ``hetero bench all`` leaves this workload out (hours on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.corpus import needle_cases, real_token_ids
from bench.plan import FULL
from bench.results import int_list, machine, new_doc, summary, write_doc
from bench.systems import System, hetero, hetero_llm_args, hetero_sparse

logger = logging.getLogger(__name__)

BEYOND = "beyond trained context"
REF_STEPS = 32  # decode steps of the dense reference


@dataclass(frozen=True)
class Spec:
    """What a run measures."""

    lengths: tuple[int, ...] = (16384, 32768, 65536, 131072)
    policies: tuple[str, ...] = ("actqkv", "quest", "streaming", "dense")
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    # quest and streaming prefill exactly (quadratic): ~5 min per 32k prompt on 2 cores, so
    # 5 depths x 2 policies at 32k alone would take the hour this workload is given
    sparse_max_len: int = 16384
    dense_max_len: int = 8192
    trials: int = 1
    n_decode: int = 8
    ref_context: int = 1024  # dense decode reference
    token_budget: int = FULL.token_budget
    dense_layers: int = FULL.dense_layers
    actqkv_params: dict = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError("lengths must be at least 64 tokens")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise ValueError("depths must be in [0, 1]")
        if self.n_decode < 2 or self.trials < 1:
            raise ValueError("n_decode must be >= 2 and trials >= 1")

    def runs(self, policy: str, n: int) -> bool:
        cap = {"dense": self.dense_max_len, "quest": self.sparse_max_len,
               "streaming": self.sparse_max_len}.get(policy)
        return cap is None or n <= cap

    def system(self, policy: str) -> System:
        if policy in ("quest", "streaming"):
            return hetero_sparse(policy, self.token_budget, self.dense_layers)
        return hetero(policy, **(self.actqkv_params if policy == "actqkv" else {}))


DEFAULT = Spec()
QUICK = replace(DEFAULT, lengths=(4096, 16384), policies=("actqkv", "streaming"), depths=(0.1, 0.5))


# The passkey task of the long-context papers (Mohtashami and Jaggi; InfLLM's and ActQKV's
# passkey and InfiniteBench use it): the needle in a repeated filler. In real text the embedded
# model misses the key with full attention already at 4k tokens (1 of 3 depths found), so a
# haystack of real text would measure the model, not the policy.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompts(tokenizer, n: int, depths: tuple[float, ...], seed: int = 0) -> list[tuple]:
    """``(NeedleCase, token ids)`` per depth, each prompt ``n`` tokens give or take a filler
    group (~20): the needle
    (``bench.corpus.needle_cases``) at each depth of the repeated ``FILLER``, then the
    question."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    (bare,) = needle_cases([0.0], seed=seed, hay="")
    room = n - len(ids(bare.context)) - len(ids(bare.question))
    per_unit = len(ids(FILLER * 64)) / 64  # tokens per filler sentence group, in a run of them
    hay = FILLER * max(1, round(room / per_unit))
    return [(c, ids(c.context) + ids(c.question)) for c in needle_cases(list(depths), seed=seed, hay=hay)]


def extends_context(policy: str) -> bool:
    """Whether ``policy`` reads past the trained context by design (bounded positions:
    actqkv); the others get ``max_model_len`` explicitly and are labelled beyond it."""
    from hetero.policies import POLICIES

    return getattr(POLICIES.get(policy), "bounded_positions", False)


def _llm(spec: Spec, model, system: System, cfg, n_tokens: int):
    """An LLM for ``system`` and prompts up to ``n_tokens`` (generation included); a policy
    that extends the context sets its own ``max_model_len``."""
    from hetero import LLM

    args = hetero_llm_args(system, FULL, cfg, n_tokens)
    if extends_context(system.params["policy"]):
        del args["max_model_len"]
    return LLM(model, device=spec.device, **args)


def _generate(llm, steps: list, ids: list[int], n_decode: int, progress: bool):
    """One greedy request of ``n_decode + 1`` tokens (EOS ignored): its output and the
    median decode step in ms (the first step left out)."""
    from hetero import SamplingParams

    steps.clear()
    (out,) = llm.generate(ids, SamplingParams(max_new_tokens=n_decode + 1, ignore_eos=True),
                          progress=progress)
    return out, 1e3 * statistics.median(steps[1:])


def _point(spec: Spec, model, system: System, cfg, n: int, cases: list, labels: list,
           progress: bool) -> list[dict]:
    """Every trial of ``system`` at length ``n``: one needle row per trial and a speed row."""
    from hetero.probe import time_decode_steps

    policy, rows, runs = system.params["policy"], [], []
    cap = max(len(ids) for _, ids in cases) + spec.n_decode + 16
    with _llm(spec, model, system, cfg, cap) as llm, time_decode_steps(llm) as steps:
        for case, ids in cases:
            out, ms = _generate(llm, steps, ids, spec.n_decode, progress)
            hit = case.key in out.text
            runs.append((out.stats, ms))
            rows.append({"system": system.name, "test": "needle", "context": n, "depth": case.depth,
                         "prompt_tokens": len(ids), "key": case.key, "output": out.text,
                         "labels": labels, "metrics": {"accuracy": summary([float(hit)])}})
            print(f"{policy} {n} @{case.depth}: {'ok' if hit else 'miss'} {out.text!r}, prefill "
                  f"{out.stats.ttft_s:.1f} s, {ms:.1f} ms/token (load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr)
    return rows + [_speed_row(system, n, labels, runs)]


def _speed_row(system: System, n: int, labels: list, runs: list, test: str = "speed") -> dict:
    metrics = {"ttft_s": [s.ttft_s for s, _ in runs], "decode_ms": [ms for _, ms in runs],
               "h2d_bytes_per_token": [s.h2d_bytes_per_token for s, _ in runs],
               "device_kv_bytes": [s.device_kv_bytes_peak for s, _ in runs],
               "device_kv_budget": [s.device_kv_budget for s, _ in runs]}
    return {"system": system.name, "test": test, "context": n, "labels": labels,
            "offloaded": any(s.host_kv_bytes > 0 for s, _ in runs),
            "metrics": {k: summary(v) for k, v in metrics.items()}}


def _reference(spec: Spec, model, cfg, tokenizer, before: int) -> dict:
    """Dense decode ms/token at ``ref_context`` tokens of real text, timed just before the
    points at length ``before``."""
    from hetero.probe import time_decode_steps

    system, n = hetero("dense"), spec.ref_context
    with _llm(spec, model, system, cfg, n + REF_STEPS + 16) as llm, time_decode_steps(llm) as steps:
        out, ms = _generate(llm, steps, real_token_ids(tokenizer, n), REF_STEPS, False)
    print(f"dense {n} (reference before {before}): {ms:.1f} ms/token", file=sys.stderr)
    return {**_speed_row(system, n, [], [(out.stats, ms)], test="reference"), "before": before}


def measure(spec: Spec, model: str | None = None, progress: bool = False, quick: bool = False,
            save=None) -> dict:
    """Run ``spec`` on ``model`` (None: the embedded one): the result document, with the
    derived tables under ``tables``. ``save(doc)``, if given, is called after each point."""
    from hetero import LLM
    from hetero.policies import POLICIES

    with LLM(model, device=spec.device, device_kv_budget="1MiB") as probe:
        cfg, tokenizer, name = probe.config, probe.tokenizer, probe.model_name
    trained = cfg.max_position_embeddings
    systems = {p: spec.system(p) for p in spec.policies}
    doc = new_doc("longctx", quick, machine(),
                  {"name": name, "source": model, "trained_context": trained, "n_layers": cfg.n_layers},
                  {**asdict(spec), "ref_steps": REF_STEPS})
    for p, s in {**systems, "dense": hetero("dense")}.items():
        known = p in POLICIES
        doc["systems"][s.name] = {"family": "hetero", "label": s.label, "params": s.params,
                                  "status": "ok" if known else "missing",
                                  "reason": "" if known else "not in hetero.policies.POLICIES",
                                  "versions": {}}
    for n in sorted(spec.lengths):
        doc["rows"].append(_reference(spec, model, cfg, tokenizer, n))
        cases = [c for t in range(spec.trials)
                 for c in passkey_prompts(tokenizer, n, spec.depths, seed=t)]
        for p, system in systems.items():
            if p not in POLICIES or not spec.runs(p, n):
                continue
            labels = [BEYOND] if n > trained and not extends_context(p) else []
            try:
                doc["rows"] += _point(spec, model, system, cfg, n, cases, labels, progress)
            except Exception as e:  # one failed point, not the run
                logger.error("%s at %d tokens failed: %s", p, n, e)
                doc["rows"].append({"system": system.name, "test": "speed", "context": n,
                                    "labels": labels, "metrics": {}, "error": f"{type(e).__name__}: {e}"})
            doc["tables"] = tables(doc)
            if save:
                save(doc)
    doc["tables"] = tables(doc)
    return doc


def tables(doc: dict) -> dict:
    """The accuracy table (system x length: correct/total, and per depth) and the speed
    table (prefill s and its growth, decode ms/token and its ratio to dense at 1k timed
    before that length, h2d bytes/token, device KV peak and budget) from the document's
    rows; ``reference_ms`` is the median of the dense references."""
    order = list(doc["systems"])  # each system's lengths together, shortest first
    rows = sorted(doc["rows"], key=lambda r: (order.index(r["system"]), r["context"]))
    refs = {r.get("before"): r["metrics"]["decode_ms"]["median"] for r in rows if r["test"] == "reference"}
    ref = statistics.median(refs.values())
    accuracy, speed, first = [], [], {}
    for r in rows:
        if r["test"] != "speed":
            continue
        key, med = (r["system"], r["context"]), {k: v["median"] for k, v in r["metrics"].items()}
        hits = [x for x in rows if x["test"] == "needle" and (x["system"], x["context"]) == key]
        by_depth: dict = {}  # depth -> [correct, total]
        for x in hits:
            counts = by_depth.setdefault(str(x["depth"]), [0, 0])
            counts[0] += int(x["metrics"]["accuracy"]["median"])
            counts[1] += 1
        point = {"system": r["system"], "context": r["context"], "labels": r["labels"]}
        accuracy.append({**point, "correct": sum(c for c, _ in by_depth.values()), "total": len(hits),
                         "by_depth": by_depth, "error": r.get("error")})
        if "error" in r:
            speed.append({**point, "error": r["error"]})
            continue
        base = first.setdefault(r["system"], (r["context"], med["ttft_s"]))
        speed.append({**point, "prefill_s": med["ttft_s"], "prefill_growth": med["ttft_s"] / base[1],
                      "tokens_growth": r["context"] / base[0], "decode_ms": med["decode_ms"],
                      "dense_ref_ms": refs.get(r["context"], ref),
                      "decode_vs_dense_ref": med["decode_ms"] / refs.get(r["context"], ref),
                      "h2d_bytes_per_token": med["h2d_bytes_per_token"],
                      "device_kv_peak": med["device_kv_bytes"], "device_kv_budget": med["device_kv_budget"]})
    return {"reference_ms": ref, "accuracy": accuracy, "speed": speed}


def markdown(doc: dict) -> str:
    """Both tables of ``doc["tables"]`` in Markdown."""
    t, ref_n = doc["tables"], next(r for r in doc["rows"] if r["test"] == "reference")["context"]
    lines = ["| system | length | correct | per depth | labels |", "|---|---|---|---|---|"]
    for a in t["accuracy"]:
        depths = " ".join(f"{d}: {c}/{n}" for d, (c, n) in a["by_depth"].items()) or a["error"]
        lines.append(f"| {a['system']} | {a['context']} | {a['correct']}/{a['total']} | {depths} | "
                     f"{', '.join(a['labels'])} |")
    lines += ["", f"dense at {ref_n} tokens: {t['reference_ms']:.1f} ms/token (median; each length's "
              "own in the table)", "",
              "| system | length | prefill s | prefill × (tokens ×) | decode ms/token | "
              f"dense {ref_n} ms | × dense {ref_n} | h2d B/token | device KV peak / budget MiB | labels |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in t["speed"]:
        if "error" in s:
            lines.append(f"| {s['system']} | {s['context']} | error: {s['error']} |" + " |" * 7)
            continue
        lines.append(f"| {s['system']} | {s['context']} | {s['prefill_s']:.1f} | {s['prefill_growth']:.2f} "
                     f"({s['tokens_growth']:.0f}) | {s['decode_ms']:.1f} | {s['dense_ref_ms']:.1f} | "
                     f"{s['decode_vs_dense_ref']:.2f} | "
                     f"{s['h2d_bytes_per_token']:.0f} | {s['device_kv_peak'] / 2**20:.1f} / "
                     f"{s['device_kv_budget'] / 2**20:.1f} | {', '.join(s['labels'])} |")
    return "\n".join(lines)


def run(spec: Spec, out_dir: Path, progress: bool = False, quick: bool = False,
        model: str | None = None) -> Path:
    """Measure, write ``out_dir/longctx.json`` (after every point too), print the tables."""
    doc = measure(spec, model, progress, quick, save=lambda d: write_doc(d, out_dir))
    path = write_doc(doc, out_dir)
    print(markdown(doc))
    return path


_lengths = int_list


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> int:
    from bench.cli import out_dir

    ap = argparse.ArgumentParser(prog="python -m bench.longctx", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="4k and 16k, 2 depths, actqkv and streaming (well under 15 minutes on 2 cores)")
    ap.add_argument("--lengths", type=_lengths, default=None, help="e.g. 2048,4096 or 16k,32k")
    ap.add_argument("--policies", type=lambda s: tuple(s.split(",")), default=None,
                    help="comma-separated (default actqkv,quest,streaming,dense)")
    ap.add_argument("--depths", type=_floats, default=None, help="e.g. 0.1,0.5,0.9 at every length")
    ap.add_argument("--trials", type=int, default=None, help="trials per (length, depth); default 1")
    ap.add_argument("--token-budget", type=int, default=None,
                    help="quest's tokens per decode step (default 1024; actqkv reads ~2.6k)")
    ap.add_argument("--dense-max-len", type=int, default=None,
                    help="longest length dense runs at (default 8192: off beyond the trained context)")
    ap.add_argument("--actqkv-param", action="append", default=[], metavar="NAME=VALUE",
                    help="a policy_params entry of actqkv (repeatable)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--progress", action="store_true", help="a progress bar over each prefill")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default bench/out/quick or full)")
    args = ap.parse_args(argv)
    spec = QUICK if args.quick else DEFAULT
    try:
        from hetero.policies import parse_policy_params

        pairs = [p.split("=", 1) for p in args.actqkv_param]
        actqkv = parse_policy_params("actqkv", pairs) if pairs else {}
        overrides = {"lengths": args.lengths, "policies": args.policies, "depths": args.depths,
                     "trials": args.trials, "dense_max_len": args.dense_max_len,
                     "token_budget": args.token_budget}
        spec = replace(spec, actqkv_params=actqkv, device=args.device,
                       **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        ap.error(str(e))
    print(run(spec, out_dir(args), args.progress, args.quick))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
