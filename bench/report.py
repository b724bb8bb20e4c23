"""``report.md`` from the result documents: one table per workload, and what they say."""

from __future__ import annotations

from collections import defaultdict

from hetero.device import format_size

SPEED_ONLY = "†"


def _cell(s: dict | None, fmt: str = "{:.1f}") -> str:
    if not s:
        return "–"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt.format(s["median"])
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def _size(s: dict | None) -> str:
    return format_size(int(s["median"])) if s else "–"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _label(doc: dict, system: str) -> str:
    return doc["systems"].get(system, {}).get("label", system)


def _ctx(doc: dict, n: int) -> str:
    speed_only = n > (doc["model"].get("trained_context") or n)
    return f"{n}{SPEED_ONLY if speed_only else ''}"


def _index(doc: dict, *keys: str) -> dict:
    """Rows by (system, *keys) (rows with errors kept under their keys too)."""
    return {(r["system"], *(r.get(k) for k in keys)): r for r in doc["rows"]}


def _systems(doc: dict) -> list[str]:
    seen = [r["system"] for r in doc["rows"]]
    return sorted(set(seen), key=seen.index)


def _err_or(row: dict | None, text: str) -> str:
    if row is None:
        return "–"
    return "error" if "error" in row else text


def _load_warning(m: dict) -> str:
    load = m.get("load_average_1m")
    if load is None or load <= m["threads"] + 0.5:
        return ""
    return (f" **The machine was busy when the run started (1-minute load {load:.1f} on "
            f"{m['logical_cpus']} CPUs): timings are skewed by other work.**")


# -- sections ------------------------------------------------------------------------------


def header(docs: dict) -> list[str]:
    doc = next(iter(docs.values()))
    m, model = doc["machine"], doc["model"]
    lines = [
        "# hetero bench report", "",
        f"{'Quick run (small lengths, 1 repeat)' if doc['quick'] else 'Full run'}, {doc['created']}. "
        f"Machine: {m['cpu']}, {m['cores']} cores / {m.get('logical_cpus')} logical CPUs, "
        f"{m['threads']} threads for every system, {format_size(m.get('ram_bytes', 0))} RAM"
        f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; Python {m.get('python')}, "
        f"torch {m['torch']}, numba {m['numba']}, transformers {m.get('transformers')}."
        + _load_warning(m),
        f"Model: {model['name']} (trained context {model.get('trained_context')}); hetero, HF "
        f"and kvpress run its weights dequantised to {doc['settings'].get('dtype')}, llama.cpp "
        f"runs the GGUF file as stored (Q4_1 weights, f16 KV). Text: Debian's license texts. "
        f"Cells: median (min–max) over repeated runs; {SPEED_ONLY} = beyond the trained "
        f"context: speed only.", "",
        "## Systems", "",
    ]
    systems = {}
    for d in docs.values():
        for name, s in d["systems"].items():
            systems.setdefault(name, s)
    rows = []
    for name, s in systems.items():
        info = s["reason"] if s["status"] != "ok" else ", ".join(
            f"{k} {v}" for k, v in sorted((s.get("versions") or {}).items()))
        rows.append([name, s["label"], s["status"], info or ""])
    return lines + _table(["system", "what", "status", "versions / reason"], rows)


def decode_section(doc: dict) -> list[str]:
    s = doc["settings"]
    rows_1 = [r for r in doc["rows"] if r["batch"] == 1]
    contexts = sorted({r["context"] for r in rows_1})
    idx = _index(doc, "context", "batch")
    lines = ["## Decode", "",
             f"ms per token ({s['n_decode']} tokens decoded after the prompt; sparse systems "
             f"read {s['token_budget']} tokens per sparse layer, the first {s['dense_layers']} "
             f"layers exact; kvpress keeps the same share of all KV). A decode step's time is "
             f"the whole decode over the tokens after the first; for magicpig that includes "
             f"waiting for LSH table builds still running (see CPU kernels).", ""]
    rows = []
    for name in _systems(doc):
        cells = [_err_or(idx.get((name, n, 1)), _cell(idx.get((name, n, 1), {}).get("metrics", {}).get("decode_ms")))
                 for n in contexts]
        if any(c != "–" for c in cells):
            rows.append([_label(doc, name), *cells])
    lines += _table(["system", *(_ctx(doc, n) for n in contexts)], rows)
    batches = sorted({r["batch"] for r in doc["rows"]})
    bc = s["batch_context"]
    if len(batches) > 1:
        lines += [f"Batch throughput at {bc} tokens of context: decode tokens/s of the whole batch.", ""]
        rows = []
        for name in _systems(doc):
            cells = [_err_or(idx.get((name, bc, b)),
                             _cell(idx.get((name, bc, b), {}).get("metrics", {}).get("decode_tok_s")))
                     for b in batches]
            if sum(c != "–" for c in cells) > 1:
                rows.append([_label(doc, name), *cells])
        lines += _table(["system", *(f"batch {b}" for b in batches)], rows)
    rows = []
    for r in rows_1:
        m = r["metrics"]
        if r["system"].startswith("hetero") and "h2d_bytes_per_token" in m:
            rows.append([_label(doc, r["system"]), _ctx(doc, r["context"]),
                         f"{_size(m.get('device_kv_bytes'))} / {_size(m.get('device_kv_budget'))}",
                         _size(m.get("host_kv_bytes")), _size(m.get("h2d_bytes_per_token")),
                         f"{100 * m['cache_hit_rate']['median']:.0f}%" if "cache_hit_rate" in m else "–"])
    if rows:
        lines += ["Offload (hetero): device KV peak against the budget, host KV, host→device bytes "
                  "per decoded token, page-cache hits.", ""]
        lines += _table(["system", "context", "device KV peak / budget", "host KV",
                         "h2d per token", "page-cache hits"], rows)
    return lines


def prefill_section(doc: dict) -> list[str]:
    doc = {**doc, "rows": [r for r in doc["rows"] if r.get("batch", 1) == 1]}
    contexts = sorted({r["context"] for r in doc["rows"]})
    idx = _index(doc, "context")
    rows = []
    for name in _systems(doc):
        cells = []
        for n in contexts:
            r = idx.get((name, n))
            m = (r or {}).get("metrics", {})
            cells.append(_err_or(r, f"{_cell(m.get('prefill_tok_s'), '{:.0f}')} tok/s · "
                                    f"{_cell(m.get('ttft_s'), '{:.2f}')} s"))
        rows.append([_label(doc, name), *cells])
    return (["## Prefill", "", "Prompt tokens per second and time to first token.", ""]
            + _table(["system", *(_ctx(doc, n) for n in contexts)], rows))


def fidelity_section(doc: dict) -> list[str]:
    fractions = sorted({r["fraction"] for r in doc["rows"]
                        if r.get("fraction") is not None and not r["test"].endswith("_matched")})
    cols = ["exact", *(f"{100 * f:g}%" for f in fractions)]
    by_test = defaultdict(list)
    for r in doc["rows"]:
        by_test[r["test"]].append(r)
    lines = ["## Fidelity", "",
             "Budgets: share of the context each sparse layer reads (hetero keeps the first "
             f"{doc['settings']['dense_layers']} layers exact; a kvpress press keeps the same "
             "share of all KV, given in each cell as 'KV x%').", ""]

    def grid(rows, fmt, keys=("system",)) -> list[list[str]]:
        groups = {}
        for r in rows:
            groups.setdefault(tuple(r.get(k) for k in keys), {})[r.get("fraction")] = r
        out = []
        for key, by_f in groups.items():
            cells = []
            for f in [None, *fractions]:
                r = by_f.get(f)
                cells.append(_err_or(r, fmt(r) if r and "error" not in r else ""))
            out.append([_label(doc, key[0]), *(str(k) for k in key[1:]), *cells])
        return out

    share = lambda r: "" if r["fraction"] is None else f" (KV {100 * r['kv_fraction']:.0f}%)"  # noqa: E731
    if rows := by_test.get("needle"):
        n = rows[0].get("context")
        depths = ", ".join(f"{d:g}" for d in doc["settings"].get("needle_depths", []))
        lines += [f"Passkey accuracy (needle at depths {depths} of prompts of ~{n} tokens).", ""]
        lines += _table(["system", *cols], grid(
            rows, lambda r: f"{100 * r['metrics']['accuracy']['mean']:.0f}%{share(r)}"))
    if rows := by_test.get("attention_error"):
        lines += ["Attention-output error against exact attention, ||o − o_exact|| / ||o_exact|| "
                  "in the sparse layers: median (min–max) over decode steps.", ""]
        lines += _table(["system", "context", *cols], grid(
            rows, lambda r: _cell(r["metrics"]["attention_error"], "{:.3f}"), ("system", "context")))
    if rows := by_test.get("attention_error_matched"):
        lines += _matched_tables(doc, rows)
    if rows := by_test.get("perplexity"):
        lines += ["Perplexity of a real continuation scored through decode attention (teacher "
                  "forced), and its change against the same family's exact run.", ""]
        lines += _table(["system", "context", *cols], grid(
            rows, lambda r: f"{r['metrics']['perplexity']['median']:.2f} "
                            f"(Δ {r['metrics']['perplexity_delta']['median']:+.2f})",
            ("system", "context")))
    return lines


MATCHED_NOTES = {  # the system whose keys touched set the others' budget -> what its table shows
    "hetero-magicpig": "Sampling against top-k at equal keys touched: magicpig at its defaults, and "
                       "the others given the keys it touched per query head (sinks and window "
                       "included). Oracle top-k picks each head's keys by their true scores.",
    "hetero-actqkv": "Bounded positions and block retrieval against top-k at equal keys touched, "
                     "within the trained context: actqkv at its defaults, and the others given "
                     "the keys it touched per query head and layer (sinks, window and the blocks "
                     "each head kept). actqkv keeps no layer dense; its error is over the same "
                     "layers as the others'. With every block selected it reads every key: its "
                     "error is the bounded positions' alone.",
}


def _matched_tables(doc: dict, rows: list[dict]) -> list[str]:
    """One table per system whose keys touched set the others' budget (a row's ``matched``;
    magicpig's in documents that do not name it): per context, that system first (and its
    variants), then the others at its keys touched."""
    lines = []
    by_ref = defaultdict(lambda: defaultdict(dict))  # matched -> context -> system -> row
    for r in rows:
        by_ref[r.get("matched", "hetero-magicpig")][r["context"]][r["system"]] = r
    for ref, by_ctx in by_ref.items():
        systems = sorted({name for by_sys in by_ctx.values() for name in by_sys},
                         key=lambda name: (name != ref, not name.startswith(ref), name))
        table = []
        for n, by_sys in sorted(by_ctx.items()):
            touched = by_sys[ref]["keys_touched"]
            table.append([str(n), f"{touched} ({100 * touched / n:.1f}%)", *(
                _err_or(by_sys.get(name), _cell((by_sys.get(name) or {}).get("metrics", {})
                                                .get("attention_error"), "{:.3f}"))
                for name in systems)])
        lines += [MATCHED_NOTES.get(ref, f"At the keys {_label(doc, ref)} touched."), ""]
        lines += _table(["context", "keys touched", *(_label(doc, name) for name in systems)], table)
    return lines


def memory_section(doc: dict) -> list[str]:
    rows = []
    for r in doc["rows"]:
        if r.get("batch", 1) != 1:
            continue
        m = r["metrics"]
        rows.append([_label(doc, r["system"]), _ctx(doc, r["context"]),
                     *(["error"] * 4 if "error" in r else [
                         _size(m.get("device_kv_bytes")), _size(m.get("host_kv_bytes")),
                         _size(m.get("lsh_table_bytes")) if "lsh_table_bytes" in m else "n/a",
                         _size(m.get("peak_rss_bytes"))])])
    return (["## Memory", "",
             "KV bytes on the device (peak; for HF and kvpress the cache tensors, for "
             "llama.cpp its f16 cache for the context), KV bytes on the host tier, LSH table "
             "bytes (n/a: no LSH policy ran), and the worker process's peak RSS (weights "
             "included).", ""]
            + _table(["system", "context", "device KV", "host KV", "LSH tables", "peak RSS"], rows))


def kernels_section(doc: dict) -> list[str]:
    copy = next((r for r in doc["rows"] if r["system"] == "copy"), None)
    limit = copy["metrics"]["gb_per_s"]["median"] if copy else None
    rows = []
    for r in doc["rows"]:
        if r["system"] == "copy":
            continue
        m = r["metrics"]
        gbs = m["gb_per_s"]["median"]
        rows.append([str(r["context"]), _cell(m["us_per_call"], "{:.0f}"),
                     _cell(m["gb_per_s"], "{:.2f}"),
                     f"{100 * gbs / limit:.0f}%" if limit else "–",
                     f"{100 * m['sampled_share']['median']:.2f}%",
                     f"{m['table_bytes_per_key']['median']:.0f} / {m['kv_bytes_per_key']['median']:.0f}",
                     _cell(m.get("build_ms_per_layer"), "{:.0f}"), _cell(m.get("build_s_all_layers"))])
    head = [f"One-thread copy bandwidth (numpy, read + write): {_cell(copy['metrics']['gb_per_s'], '{:.1f}')} "
            "GB/s." if copy else "Copy bandwidth not measured.", ""]
    return (["## CPU kernels", "",
             "MagicPIG's sampled attention (`cpu_kernels.lsh_attention`, one thread, as the "
             "local backend runs it) timed alone on every call of a real decode: bytes it must "
             "read (probed bucket runs, candidates' K and V rows) per second, against the "
             "copy bandwidth; keys sampled per query head; LSH state against fp32 KV, bytes "
             "per offloaded key and KV head; the tables' build per layer and for all sparse "
             "layers (one thread; the local backend builds on every core, each layer as it "
             "finishes the prompt's last chunk, and a layer's first decode step waits for its "
             "build).", "", *head]
            + _table(["context", "µs per call (all heads)", "GB/s", "of copy", "sampled",
                      "LSH / KV bytes per key", "build ms per layer", "build s, all layers"], rows))


def render(docs: dict, findings: list[str] | None = None) -> str:
    """The Markdown report for the documents present (keys are workload names)."""
    if not docs:
        raise ValueError("no result documents to report on")
    lines = header(docs)
    for name, section in (("decode", decode_section), ("prefill", prefill_section),
                          ("fidelity", fidelity_section), ("memory", memory_section),
                          ("kernels", kernels_section)):
        if name in docs:
            lines += section(docs[name])
    if findings:
        lines += ["## What the numbers say", "", *(f"- {f}" for f in findings), ""]
    return "\n".join(lines)
