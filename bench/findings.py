"""Plain sentences drawn from the numbers: where hetero leads and where it trails."""

from __future__ import annotations

from collections import defaultdict


def _median(row: dict | None, metric: str) -> float | None:
    if not row or "error" in row or metric not in row["metrics"]:
        return None
    return row["metrics"][metric]["median"]


def decode_findings(doc: dict) -> list[str]:
    out = []
    by_ctx = defaultdict(dict)
    for r in doc["rows"]:
        if r["batch"] == 1 and (ms := _median(r, "decode_ms")) is not None:
            by_ctx[r["context"]][r["system"]] = ms
    for n in sorted(by_ctx):
        ms = by_ctx[n]
        fastest = min(ms, key=ms.get)
        parts = [f"fastest {fastest} ({ms[fastest]:.1f} ms/token)"]
        if "hetero-dense" in ms and "hf" in ms:
            parts.append(f"hetero dense {ms['hf'] / ms['hetero-dense']:.2f}x HF's speed")
        if "hetero-quest" in ms and "hetero-dense" in ms:
            parts.append(f"quest {ms['hetero-dense'] / ms['hetero-quest']:.2f}x dense's")
        if "llamacpp" in ms and "hetero-dense" in ms:
            parts.append(f"llama.cpp {ms['hetero-dense'] / ms['llamacpp']:.2f}x hetero dense's")
        out.append(f"Decode at {n} tokens: " + "; ".join(parts) + ".")
    return out


def prefill_findings(doc: dict) -> list[str]:
    top = max((r["context"] for r in doc["rows"]), default=None)
    tok_s = {r["system"]: v for r in doc["rows"]
             if r["context"] == top and (v := _median(r, "prefill_tok_s")) is not None}
    if not tok_s:
        return []
    ranked = sorted(tok_s, key=tok_s.get, reverse=True)
    return [f"Prefill at {top} tokens, fastest first: "
            + ", ".join(f"{s} {tok_s[s]:.0f} tok/s" for s in ranked) + "."]


def fidelity_findings(doc: dict) -> list[str]:
    out = []
    fractions = sorted({r["fraction"] for r in doc["rows"] if r.get("fraction") is not None})
    if not fractions:
        return out
    low = fractions[0]
    needle = {r["system"]: r["metrics"]["accuracy"]["mean"] for r in doc["rows"]
              if r["test"] == "needle" and r.get("fraction") == low and "error" not in r}
    if needle:
        out.append(f"Passkey at the smallest budget ({100 * low:g}% of the context per sparse "
                   "layer): " + ", ".join(f"{s} {100 * a:.0f}%" for s, a in needle.items()) + ".")
    err = defaultdict(dict)
    for r in doc["rows"]:
        if r["test"] == "attention_error" and "error" not in r and not r.get("labels"):  # not speed-only
            err[(r["context"], r["fraction"])][r["system"]] = r["metrics"]["attention_error"]["median"]
    ratios = [e["hetero-quest"] / e["hetero-streaming"] for e in err.values()
              if "hetero-quest" in e and e.get("hetero-streaming")]
    if ratios:
        out.append(f"Attention error of quest is {min(ratios):.2f}–{max(ratios):.2f}x that of "
                   "streaming at the same budget (lower is better).")
    ppl_rows = [r for r in doc["rows"] if r["test"] == "perplexity" and "error" not in r]
    first = min((r["context"] for r in ppl_rows), default=None)
    ppl = {r["system"]: r["metrics"]["perplexity_delta"]["median"] for r in ppl_rows
           if r["context"] == first and r.get("fraction") == low}
    if ppl:
        out.append(f"Perplexity change at the {100 * low:g}% budget, {first} tokens: "
                   + ", ".join(f"{s} {d:+.2f}" for s, d in ppl.items()) + ".")
    return out


def memory_findings(doc: dict) -> list[str]:
    top = max((r["context"] for r in doc["rows"]), default=None)
    dev = {r["system"]: v for r in doc["rows"]
           if r["context"] == top and (v := _median(r, "device_kv_bytes")) is not None}
    if "hetero-dense" not in dev or "hetero-quest" not in dev:
        return []
    return [f"Device KV at {top} tokens: quest holds {dev['hetero-quest'] / dev['hetero-dense']:.1%} "
            "of what dense holds; the rest lives on the host tier."]


def findings(docs: dict) -> list[str]:
    out = []
    for name, fn in (("decode", decode_findings), ("prefill", prefill_findings),
                     ("fidelity", fidelity_findings), ("memory", memory_findings)):
        if name in docs:
            out += fn(docs[name])
    return out
