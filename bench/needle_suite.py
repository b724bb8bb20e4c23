"""The needle suite: every sparse policy at shares of the keys touched, dense as the
reference and oracle token top-k as the bound, over the prompts of ``bench.needles``.

Each prompt's document is prefilled once (dense, exact) and its KV shared: every policy that
can load a saved KV answers the question on top of it (``LLM.stream(question,
kv_cache=...)``: the question is prefilled exactly, every decoded token goes through the
policy, and decoding stops at the answer). actqkv keeps no saved KV and prefills each prompt
itself (the raw ones, up to ``Spec.actqkv_max_length``). A cell is a (template, haystack,
format, length) with one trial per depth; it counts only where dense answers >= ``counted``
of them. Past the model's trained context (``PAST``) only actqkv runs, and its cells count
without a reference.

    python -m bench.needle_suite [--quick | --past] [--lengths 1536,8k] [--policies quest,streaming]
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.needles import FORMATS, HAYSTACKS, TEMPLATES, needle_suite
from bench.results import int_list, machine, new_doc, write_doc

log = logging.getLogger(__name__)
SPARSE = ("quest", "streaming", "magicpig", "actqkv")


@dataclass(frozen=True, slots=True)
class Spec:
    """What one run covers: ``cells`` maps a length to the (templates, haystacks, formats)
    asked at it; oracle top-k and every sparse policy run at each of ``fractions`` of the
    keys (magicpig's and actqkv's parameters chosen for it, their keys touched measured)."""

    cells: dict = field(default_factory=lambda: {
        1536: (tuple(TEMPLATES), tuple(HAYSTACKS), FORMATS),
        8192: (tuple(TEMPLATES), ("licenses",), ("raw",)),
    })
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3)
    policies: tuple[str, ...] = SPARSE
    # actqkv keeps no saved KV: it prefills every prompt itself (~6 s at 1.5k), so it runs
    # on the raw prompts up to this length
    actqkv_max_length: int = 1536
    dense_layers: int = 2
    counted: int = 4


DEFAULT = Spec()
QUICK = replace(DEFAULT, cells={1536: (tuple(TEMPLATES), ("licenses", "code"), ("raw",))},
                depths=(0.1, 0.5, 0.9), fractions=(0.1,), policies=("quest", "streaming"), counted=2)
# past the embedded model's 8k trained context only actqkv runs (the others refuse such a
# prompt), with no dense reference: each 16k prompt's own prefill takes ~30 s, so one fraction
PAST = replace(DEFAULT, cells={16384: (tuple(TEMPLATES), ("licenses",), ("raw",))}, fractions=(0.1,),
               policies=("actqkv",), actqkv_max_length=16384)


@dataclass(frozen=True, slots=True, eq=False)
class Contender:
    """A system of the suite: ``policy`` with ``params`` at ``fraction`` of the keys (None:
    its defaults) and pages of ``page_size`` tokens (None: the policy's); ``topk`` > 0
    decodes dense with oracle top-k of that many keys."""

    name: str
    policy: str
    params: dict
    fraction: float | None = None
    topk: int = 0
    page_size: int | None = None

    @property
    def shared(self) -> bool:
        return self.policy != "actqkv"


# magicpig's (lsh_k, lsh_l) by the share of the offloaded keys they sample, measured on the
# embedded model (needle prompts at 1.5k; 0.01-0.015 higher at 8k): a fraction of the keys
# takes the pair whose share is closest to what its sinks and window leave over.
MAGICPIG_SHARES = {(8, 65): 0.056, (8, 75): 0.070, (8, 85): 0.083, (8, 100): 0.103, (7, 75): 0.165,
                   (7, 85): 0.196, (7, 110): 0.265, (7, 120): 0.295}


def magicpig_params(fraction: float, n: int, dense_layers: int) -> dict:
    """magicpig's parameters for ``fraction`` of ``n`` keys: its 4 sinks and 64 local
    tokens, and the sampled share of the rest from :data:`MAGICPIG_SHARES`."""
    exact = 4 + 64
    share = (fraction * n - exact) / (n - exact)
    k, l = min(MAGICPIG_SHARES, key=lambda kl: abs(MAGICPIG_SHARES[kl] - share))
    return {"lsh_k": k, "lsh_l": l, "n_sink": 4, "n_local": 64, "dense_layers": dense_layers}


def actqkv_params(fraction: float, n: int) -> dict:
    """actqkv's parameters for ``fraction`` of ``n`` keys: 16 sinks, 64 local tokens and a
    fixed number of 16-token blocks (no cut-off below it) for the rest."""
    blocks = max(1, round((fraction * n - 80) / 16))
    return {"n_sink": 16, "n_local": 64, "top_blocks": blocks, "min_blocks": blocks}


def contenders(spec: Spec, n: int, past: bool = False) -> list[Contender]:
    """Dense, and at each fraction of ``spec`` for prompts of ``n`` tokens oracle top-k (the
    bound) and every sparse policy of ``spec``; at the smallest fraction, where quest picks
    8-token pages, quest on 16-token pages too ("quest-p16", as it ran before the suite's
    finding). ``past`` the trained context: actqkv alone."""
    from hetero.policies.quest import QuestPolicy

    dl = spec.dense_layers
    if past:
        return [Contender("actqkv", "actqkv", actqkv_params(f, n), f) for f in spec.fractions
                if "actqkv" in spec.policies and n <= spec.actqkv_max_length]
    out = [Contender("dense", "dense", {})]
    for f in spec.fractions:
        budget = max(int(f * n), 40)
        out.append(Contender("oracle-topk", "dense", {}, f, topk=budget))
        if "quest" in spec.policies:
            quest = {"token_budget": budget, "dense_layers": dl}
            out.append(Contender("quest", "quest", quest, f))
            if f == min(spec.fractions) and QuestPolicy(**quest).page_size != 16:
                out.append(Contender("quest-p16", "quest", quest, f, page_size=16))
        if "streaming" in spec.policies:
            out.append(Contender("streaming", "streaming", {"n_local": budget - 4, "dense_layers": dl}, f))
        if "magicpig" in spec.policies:
            out.append(Contender("magicpig", "magicpig", magicpig_params(f, n, dl), f))
        if "actqkv" in spec.policies and n <= spec.actqkv_max_length:
            out.append(Contender("actqkv", "actqkv", actqkv_params(f, n), f))
    return out


def _llm(c: Contender, max_len: int, model: str | None):
    from hetero import LLM

    return LLM(model, device="cpu", policy=c.policy, policy_params=c.params, max_model_len=max_len,
               page_size=c.page_size)


def _answer(llm, c: Contender, prompt, kv, dense_layers: int) -> str:
    """The text generated for one prompt, up to the answer: decoding stops once the text
    holds it (a hit is a substring, so later tokens cannot undo it)."""
    from hetero import SamplingParams
    from hetero.probe import TopKAttention, hooked

    chat = prompt.format == "chat"
    # the answer is one sentence (~14 tokens); a raw continuation goes on to a new paragraph
    params = SamplingParams(max_new_tokens=24, stop=["\n\n"])
    hook = TopKAttention(c.topk, dense_layers) if c.topk else None
    with hooked(llm.engine.attention_hooks, hook) if hook else nullcontext():
        stream = (llm.stream(prompt.question, params, chat=chat, kv_cache=kv) if c.shared
                  else llm.stream(prompt.document + prompt.question, params, chat=chat))
        text = ""
        for piece in stream:
            text += piece
            if prompt.hit(text):
                break
        stream.close()
    return text


def _touched(llm, before, n: int) -> float | None:
    """Share of the ``n`` keys a magicpig or actqkv run read per step since ``before``
    (``Policy.key_counts``: actqkv counts all it attends, magicpig what its workers read of
    the offloaded keys, to which its sinks and window are added)."""
    read, seen = (a - b for a, b in zip(llm.policy.key_counts(), before))
    if not seen:
        return None
    if llm.policy.name == "magicpig":
        exact = llm.policy.n_sink + llm.policy.n_local
        return (exact + read / seen * (n - exact)) / n
    return read / seen


def measure(spec: Spec, progress: bool = True, model: str | None = None) -> dict:
    """Run every cell of ``spec`` on ``model`` (None: the embedded one); the result
    document (rows per contender and cell)."""
    from tqdm import tqdm

    from hetero import LLM

    rows, timing = [], {}
    lengths = sorted(spec.cells)
    for n in lengths:
        templates, haystacks, formats = spec.cells[n]
        # the reference's KV loads into every shared contender, whatever its page size
        reference = LLM(model, device="cpu", policy="dense", max_model_len=n + 64)
        model_name = reference.model_name
        prompts = needle_suite(reference.tokenizer, [n], spec.depths, templates, haystacks, formats)
        cs = contenders(spec, n, past=n > reference.config.max_position_embeddings)
        llms = {c: _llm(c, n + 64, model) for c in cs if not c.topk and c.policy != "dense"}
        llms.update({c: reference for c in cs if c.policy == "dense"})
        hits, texts, touched = defaultdict(list), defaultdict(list), defaultdict(list)
        runs = [(p, [c for c in cs if c.shared or p.format == "raw"]) for p in prompts]
        bar = tqdm(total=sum(len(x) for _, x in runs), desc=f"needles {n}", disable=not progress, unit="run")
        seconds = defaultdict(float)
        for p, p_cs in runs:
            t0 = time.perf_counter()
            kv = reference.prefill(p.document, chat=p.format == "chat") if any(c.shared for c in p_cs) else None
            seconds["prefill"] += time.perf_counter() - t0
            for c in p_cs:
                t0 = time.perf_counter()
                llm = llms[c]
                before = llm.policy.key_counts() if c.policy in ("magicpig", "actqkv") else None
                text = _answer(llm, c, p, kv, spec.dense_layers)
                if before is not None:
                    touched[c, p.cell].append(_touched(llm, before, p.length))
                hits[c, p.cell].append(float(p.hit(text)))
                texts[c, p.cell].append(text)
                seconds[c.name] += time.perf_counter() - t0
                bar.update()
            del kv
        bar.close()
        for (c, cell), h in hits.items():
            t, hay, fmt, length = cell
            tc = [x for x in touched.get((c, cell), []) if x is not None]
            rows.append({"system": c.name, "fraction": c.fraction, "params": c.params, "template": t,
                         "haystack": hay, "format": fmt, "context": length, "hits": int(sum(h)), "trials": len(h),
                         "keys_touched": sum(tc) / len(tc) if tc else None, "texts": texts[c, cell]})
        timing[str(n)] = {k: round(v, 1) for k, v in seconds.items()}
        log.info("needles %d: seconds %s", n, timing[str(n)])
        for llm in {id(x): x for x in llms.values()}.values():
            llm.close()
        del llms, reference
        gc.collect()
    doc = new_doc("needles", False, machine(), {"name": model_name}, {"spec": _spec_dict(spec)})
    doc["seconds"] = timing  # per length: the reference's prefills and each system's answers
    doc["systems"] = {name: {"status": "ok"} for name in {r["system"] for r in rows}}
    doc["rows"] = rows
    doc["tables"] = tables(rows, spec.counted)
    return doc


def _spec_dict(spec: Spec) -> dict:
    return {"cells": {str(n): [list(x) for x in v] for n, v in spec.cells.items()}, "depths": list(spec.depths),
            "fractions": list(spec.fractions), "policies": list(spec.policies), "dense_layers": spec.dense_layers,
            "counted": spec.counted}


def tables(rows: list[dict], counted: int) -> dict:
    """Accuracy per system × fraction over the counted cells and the cells past the trained
    context (where dense does not run): in all, per template, per haystack, per format, per
    length; and the target check: in every counted cell, the best sparse system at the
    smallest fraction answers at least dense's hits minus one."""
    cell = lambda r: (r["template"], r["haystack"], r["format"], r["context"])  # noqa: E731
    dense = {cell(r): r["hits"] for r in rows if r["system"] == "dense"}
    past = {cell(r) for r in rows} - set(dense)
    ok = {c for c, h in dense.items() if h >= counted}
    acc, touched = defaultdict(lambda: [0, 0]), defaultdict(list)
    for r in rows:
        if cell(r) not in ok | past:
            continue
        if r.get("keys_touched") is not None:
            touched[r["system"], r["fraction"]].append(r["keys_touched"])
        for key in ("all", f"template={r['template']}", f"haystack={r['haystack']}", f"format={r['format']}",
                    f"length={r['context']}"):
            a = acc[r["system"], r["fraction"], key]
            a[0] += r["hits"]
            a[1] += r["trials"]
    fractions = sorted({r["fraction"] for r in rows if r["fraction"] is not None})
    best = []
    for c in sorted(ok):
        sparse = [r for r in rows if cell(r) == c and r["system"] not in ("dense", "oracle-topk")
                  and (r["fraction"] == fractions[0] or r["fraction"] is None)]
        top = max(sparse, key=lambda r: r["hits"], default=None)
        best.append({"cell": list(c), "dense": dense[c], "best": top and top["system"],
                     "best_hits": top and top["hits"], "met": top is not None and top["hits"] >= dense[c] - 1})
    return {"counted_cells": sorted(map(list, ok)), "all_cells": sorted(map(list, dense)),
            "past_cells": sorted(map(list, past)),
            "keys_touched": [{"system": s, "fraction": f, "mean": sum(x) / len(x)} for (s, f), x in touched.items()],
            "accuracy": [{"system": s, "fraction": f, "group": k, "hits": h, "trials": n}
                         for (s, f, k), (h, n) in sorted(acc.items(), key=lambda x: (x[0][0], x[0][1] or 0, x[0][2]))],
            "target": best}


def markdown(doc: dict) -> str:
    """Accuracy (hits/trials over the counted cells) per system × fraction × group."""
    t = doc["tables"]
    groups = sorted({a["group"] for a in t["accuracy"]}, key=lambda g: (g != "all", g))
    systems = sorted({(a["system"], a["fraction"]) for a in t["accuracy"]}, key=lambda s: (s[1] or 0, s[0]))
    table = {(a["system"], a["fraction"], a["group"]): f"{a['hits']}/{a['trials']}" for a in t["accuracy"]}
    touched = {(k["system"], k["fraction"]): k["mean"] for k in t.get("keys_touched", [])}
    past = f"; past the trained context (no dense): {len(t['past_cells'])}" if t.get("past_cells") else ""
    lines = [f"counted cells: {len(t['counted_cells'])} of {len(t['all_cells'])}{past}", "",
             "| system | keys | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]
    for s, f in systems:
        keys = "all" if f is None else f"{f:.0%}"
        if (s, f) in touched:
            keys += f" ({touched[s, f]:.1%} measured)"
        lines.append(f"| {s} | {keys} | " + " | ".join(table.get((s, f, g), "") for g in groups) + " |")
    missed = [b for b in t["target"] if not b["met"]]
    lines += ["", f"target (best sparse at the smallest fraction >= dense - 1): {len(t['target']) - len(missed)} "
              f"of {len(t['target'])} counted cells"]
    lines += [f"- missed: {b['cell']} dense {b['dense']}, best {b['best']} {b['best_hits']}" for b in missed]
    return "\n".join(lines)


def run(spec: Spec, out: Path, progress: bool = True, quick: bool = False) -> Path:
    """Measure ``spec``, write ``out/needles.json`` and print the accuracy table."""
    doc = measure(spec, progress)
    doc["quick"] = quick
    path = write_doc(doc, out)
    print(markdown(doc))
    return path


def main(argv: list[str] | None = None) -> int:
    from bench.cli import out_dir

    ap = argparse.ArgumentParser(prog="python -m bench.needle_suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1.5k tokens, 6 cells of 3 depths, 10%% of keys")
    ap.add_argument("--past", action="store_true", help="actqkv at 16k, past the trained context (~13 min)")
    ap.add_argument("--lengths", type=int_list, default=None, help="only these lengths of the plan")
    ap.add_argument("--policies", default=None, help="sparse policies, comma-separated (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default bench/out/quick or full)")
    args = ap.parse_args(argv)
    spec = QUICK if args.quick else PAST if args.past else DEFAULT
    if args.lengths:
        spec = replace(spec, cells={n: v for n, v in spec.cells.items() if n in args.lengths})
    if args.policies:
        spec = replace(spec, policies=tuple(args.policies.split(",")))
    print(run(spec, out_dir(args), quick=args.quick))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
