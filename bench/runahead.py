"""Chain prefill (KV-Runahead) against one process: time to first token with 1, 2 and 4
workers, fitted parts against an even split.

    python -m bench.runahead [--quick] [--lengths 8k,16k] [--workers 1,2,4] [--repeats 3,1]
                             [--model PATH] [--out DIR]
    hetero bench runahead [--quick] [--contexts N ...] [--repeats N] [--out DIR]

Per length, on real text (``bench.corpus.real_token_ids``) and the embedded model (float32,
CPU), the systems:

- ``one process``: ``LLM.generate(max_new_tokens=1)``'s TTFT, dense, one process with all
  the machine's threads (the model loaded before);
- ``chain N`` (N = 1) and ``chain N fitted`` / ``chain N even``: ``orchestrator.chain.Chain``
  with N workers on the machine's cores over N threads each, parts from the fitted cost
  model (``orchestrator.calibrate``) or even. TTFT: the prompt handed to the loaded,
  connected workers until the launcher holds the last token's logits (the workers' start-up
  is reported apart, as the one process's model load is not timed either).

Each chain's workers start once for the run and the repeats interleave the systems, so drift
in the machine's load hits them alike. Per point: TTFT; each worker's busy and wait seconds
and the largest over the smallest busy time; the KV's largest difference from ``chain 1``
and whether the first token is the one process's. Writes ``DIR/runahead.json``
(``bench.results``; the table under ``tables``) and prints the table in Markdown. On 2 cores
the workers share two cores: the chain can only win what one process leaves idle; the
design is for several devices or nodes. ``hetero bench all`` leaves this workload out.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.corpus import real_token_ids
from bench.results import int_list, machine, new_doc, summary, write_doc

logger = logging.getLogger(__name__)

ONE = "one process"


@dataclass(frozen=True)
class Spec:
    """What a run measures; ``repeats`` per length (the last one for longer lists)."""

    lengths: tuple[int, ...] = (8192, 16384)
    workers: tuple[int, ...] = (1, 2, 4)
    repeats: tuple[int, ...] = (3, 1)

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError("lengths must be at least 64 tokens")
        if not self.workers or min(self.workers) < 1 or max(self.workers) > min(self.lengths):
            raise ValueError("workers must be between 1 and the shortest length")
        if not self.repeats or min(self.repeats) < 1:
            raise ValueError("repeats must be >= 1")

    def reps(self, i: int) -> int:
        return self.repeats[min(i, len(self.repeats) - 1)]

    def systems(self) -> list[tuple[str, int, str]]:
        """``(name, workers, partition)`` of every chain system."""
        return [(f"chain {w}" if w == 1 else f"chain {w} {p}", w, p)
                for w in sorted(set(self.workers)) for p in (("even",) if w == 1 else ("fitted", "even"))]


DEFAULT = Spec()
QUICK = replace(DEFAULT, lengths=(2048,), workers=(1, 2), repeats=(1,))


def measure(spec: Spec, model: str | None = None, quick: bool = False, save=None) -> dict:
    """Run ``spec`` on ``model`` (None: the embedded one): the result document with its
    table under ``tables``; ``save(doc)``, if given, is called after each length."""
    import torch

    from hetero import LLM, SamplingParams
    from orchestrator.calibrate import model_config, plan_bounds
    from orchestrator.chain import Chain, threads_per_worker

    dtype, cfg = torch.float32, model_config(model)
    systems = spec.systems()
    with LLM(model, device="cpu", dtype=dtype, max_model_len=max(spec.lengths) + 16) as llm:
        doc = new_doc("runahead", quick, machine(),
                      {"name": llm.model_name, "source": model, "trained_context": cfg.max_position_embeddings,
                       "n_layers": cfg.n_layers},
                      {**asdict(spec), "dtype": "float32", "device": "cpu"})
        doc["systems"][ONE] = _system(f"hetero dense, one process, {torch.get_num_threads()} threads")
        chains = {}
        try:
            for name, w, part in systems:
                doc["systems"][name] = _system(f"chain prefill, {w} worker(s) x {threads_per_worker(w)} "
                                               f"thread(s), {part} parts")
                if w not in chains:
                    chains[w] = Chain(model, dtype, w)
                    chains[w].start()
                    print(f"chain {w}: workers started in {chains[w].startup_s:.1f} s", file=sys.stderr)
                    warm = real_token_ids(llm.tokenizer, 64 * w)  # first-call costs, untimed
                    chains[w].prefill(warm, [64 * i for i in range(w + 1)])
            llm.generate(real_token_ids(llm.tokenizer, 64), SamplingParams(max_new_tokens=1))
            for i, n in enumerate(sorted(spec.lengths)):
                ids = real_token_ids(llm.tokenizer, n)
                bounds = {name: plan_bounds(cfg, dtype, n, w, part, threads_per_worker(w))
                          for name, w, part in systems}
                runs: dict = {ONE: [], **{name: [] for name, _, _ in systems}}
                first, kv_diff, ref = {}, {}, None  # ref: the fewest workers' first KV
                for rep in range(spec.reps(i)):
                    (out,) = llm.generate(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
                    runs[ONE].append(out.stats.ttft_s)
                    first[ONE] = out.token_ids[0]
                    _note(n, ONE, rep, out.stats.ttft_s)
                    for name, w, part in systems:
                        r = chains[w].prefill(ids, bounds[name], partition=part)
                        _note(n, name, rep, r.ttft_s, r)
                        first[name] = r.first_token
                        if rep == 0:
                            ref = r if ref is None else ref
                            kv_diff[name] = _max_diff(r, ref)
                        runs[name].append(replace(r, k=[], v=[]))  # the timings; the KV goes
                ref = None
                doc["rows"] += _rows(n, runs, first, kv_diff, chains, systems)
                doc["tables"] = tables(doc)
                if save:
                    save(doc)
        finally:
            for chain in chains.values():
                chain.close()
    doc["tables"] = tables(doc)
    return doc


def _system(label: str) -> dict:
    return {"family": "hetero", "label": label, "params": {}, "status": "ok", "reason": "", "versions": {}}


def _note(n: int, name: str, rep: int, ttft: float, r=None) -> None:
    more = "" if r is None else (f", busy {' '.join(f'{b:.1f}' for b in r.busy_s)} s, wait "
                                 f"{' '.join(f'{w:.1f}' for w in r.wait_s)} s, parts {r.bounds}")
    print(f"{n} {name} #{rep + 1}: TTFT {ttft:.2f} s{more}", file=sys.stderr)


def _max_diff(r, ref) -> float:
    """Largest |K - K_ref|, |V - V_ref| over the layers."""
    return max(max(float((a - b).abs().max()) for a, b in zip(r.k, ref.k)),
               max(float((a - b).abs().max()) for a, b in zip(r.v, ref.v)))


def _rows(n: int, runs: dict, first: dict, kv_diff: dict, chains: dict, systems: list) -> list[dict]:
    rows = [{"system": ONE, "context": n, "workers": 0, "labels": [],
             "metrics": {"ttft_s": summary(runs[ONE])}, "first_token": first[ONE]}]
    for name, w, part in systems:
        rs = runs[name]
        busy = [statistics.median(r.busy_s[i] for r in rs) for i in range(w)]
        wait = [statistics.median(r.wait_s[i] for r in rs) for i in range(w)]
        rows.append({"system": name, "context": n, "workers": w, "partition": part, "labels": [],
                     "bounds": rs[0].bounds, "busy_s": busy, "wait_s": wait,
                     "startup_s": chains[w].startup_s, "kv_max_abs_diff": kv_diff[name],
                     "first_token": first[name], "same_first_token": first[name] == first[ONE],
                     "metrics": {"ttft_s": summary([r.ttft_s for r in rs]),
                                 "busy_ratio": summary([r.imbalance for r in rs]),
                                 "kv_s": summary([r.kv_s for r in rs])}})
    return rows


def tables(doc: dict) -> dict:
    """One row per (length, system): TTFT, its ratio to the one process's, per-worker busy
    and wait, max/min busy, KV difference from chain 1, same first token."""
    out = []
    for n in sorted({r["context"] for r in doc["rows"]}):
        rows = [r for r in doc["rows"] if r["context"] == n]
        base = next(r for r in rows if r["system"] == ONE)["metrics"]["ttft_s"]["median"]
        for r in rows:
            ttft = r["metrics"]["ttft_s"]["median"]
            out.append({"context": n, "system": r["system"], "workers": r["workers"], "ttft_s": ttft,
                        "vs_one_process": ttft / base, "bounds": r.get("bounds"), "busy_s": r.get("busy_s"),
                        "wait_s": r.get("wait_s"),
                        "busy_ratio": r["metrics"].get("busy_ratio", {}).get("median"),
                        "kv_max_abs_diff": r.get("kv_max_abs_diff"), "same_first_token": r.get("same_first_token")})
    return {"ttft": out}


def markdown(doc: dict) -> str:
    """The table of ``doc["tables"]`` in Markdown."""
    lines = ["| length | system | TTFT s | × one process | parts | busy s per worker | max/min busy | "
             "wait s per worker | KV max abs diff vs chain 1 | same first token |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def nums(xs):
        return "" if xs is None else " / ".join(f"{x:.1f}" for x in xs)

    for t in doc["tables"]["ttft"]:
        parts = "" if t["bounds"] is None else " ".join(str(e - s) for s, e in zip(t["bounds"], t["bounds"][1:]))
        ratio = "" if t["busy_ratio"] is None else f"{t['busy_ratio']:.2f}"
        diff = "" if t["kv_max_abs_diff"] is None else f"{t['kv_max_abs_diff']:.1e}"
        same = "" if t["same_first_token"] is None else ("yes" if t["same_first_token"] else "no")
        lines.append(f"| {t['context']} | {t['system']} | {t['ttft_s']:.2f} | {t['vs_one_process']:.2f} | "
                     f"{parts} | {nums(t['busy_s'])} | {ratio} | {nums(t['wait_s'])} | {diff} | {same} |")
    return "\n".join(lines)


def run(spec: Spec, out_dir: Path, quick: bool = False, model: str | None = None) -> Path:
    """Measure, write ``out_dir/runahead.json`` (after every length too), print the table."""
    doc = measure(spec, model, quick, save=lambda d: write_doc(d, out_dir))
    path = write_doc(doc, out_dir)
    print(markdown(doc))
    return path


_ints = int_list


def main(argv: list[str] | None = None) -> int:
    from bench.cli import out_dir

    ap = argparse.ArgumentParser(prog="python -m bench.runahead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2k tokens, 1 and 2 workers, one repeat (a few minutes)")
    ap.add_argument("--lengths", type=_ints, default=None, help="e.g. 8k,16k (default)")
    ap.add_argument("--workers", type=_ints, default=None, help="e.g. 1,2,4 (default)")
    ap.add_argument("--repeats", type=_ints, default=None,
                    help="repeats per length, the last for the rest (default 3,1)")
    ap.add_argument("--model", default=None, help="model path (default: the embedded one)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default bench/out/quick or full)")
    args = ap.parse_args(argv)
    spec = QUICK if args.quick else DEFAULT
    try:
        overrides = {"lengths": args.lengths, "workers": args.workers, "repeats": args.repeats}
        spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as e:
        ap.error(str(e))
    print(run(spec, out_dir(args), args.quick, args.model))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
