"""Dense path against HF transformers, side by side in one run: prefill tok/s, decode ms/token.

Same model (the embedded SmolLM2-135M by default, identical fp32 weights), same threads, same
real text (Debian's license texts), same machine; systems alternate on every repeat so noise
hits both. Prints a Markdown table of medians (min-max) and writes JSON with ``--out``.

    python -m bench.dense_vs_hf [--lengths 1024 8192 16384] [--repeats 3] [--decode 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hetero import LLM, SamplingParams
from hetero.loader import hf_reference_dir

TEXT_DIR = Path("/usr/share/common-licenses")


def real_token_ids(tokenizer, n: int) -> list[int]:
    """``n`` token ids of real English text (the license texts, repeated as needed)."""
    text = "\n\n".join(p.read_text(errors="replace") for p in sorted(TEXT_DIR.iterdir()) if p.is_file())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids * (n // len(ids) + 1))[:n]


def run_hetero(llm: LLM, ids: list[int], n_decode: int) -> tuple[float, float]:
    params = SamplingParams(max_new_tokens=n_decode, ignore_eos=True)
    (out,) = llm.generate(ids, params)
    s = out.stats
    return s.prompt_tokens / s.ttft_s, 1000.0 / s.decode_tokens_per_s


@torch.inference_mode()
def run_hf(model, ids: list[int], n_decode: int) -> tuple[float, float]:
    from transformers import DynamicCache

    x = torch.tensor([ids])
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    for _ in range(n_decode - 1):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), 1000.0 * (t2 - t1) / (n_decode - 1)


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32, help="tokens decoded per run")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    longest = max(args.lengths) + args.decode
    llm = LLM(args.model, device="cpu", dtype="float32", max_model_len=longest)
    hf = AutoModelForCausalLM.from_pretrained(
        hf_reference_dir(args.model), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": llm.model_name,
        "lengths": {},
    }
    for n in args.lengths:
        ids = real_token_ids(llm.tokenizer, n)
        runs = {"hetero": [], "hf": []}
        for _ in range(args.repeats):
            runs["hetero"].append(run_hetero(llm, ids, args.decode))
            runs["hf"].append(run_hf(hf, ids, args.decode))
        results["lengths"][n] = {
            system: {"prefill_tok_s": summary([r[0] for r in rs]), "decode_ms": summary([r[1] for r in rs])}
            for system, rs in runs.items()
        }
    print(f"\nModel {results['model']}, fp32, {results['machine']['threads']} threads, "
          f"medians of {args.repeats} (min-max)\n")
    print("| context | prefill tok/s hetero | prefill tok/s HF | ratio | decode ms/tok hetero | decode ms/tok HF | ratio |")
    print("|---|---|---|---|---|---|---|")
    for n, r in results["lengths"].items():
        h, f = r["hetero"], r["hf"]
        cell = lambda s: f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"  # noqa: E731
        print(f"| {n} | {cell(h['prefill_tok_s'])} | {cell(f['prefill_tok_s'])} | "
              f"{h['prefill_tok_s']['median'] / f['prefill_tok_s']['median']:.2f}x | "
              f"{cell(h['decode_ms'])} | {cell(f['decode_ms'])} | "
              f"{f['decode_ms']['median'] / h['decode_ms']['median']:.2f}x faster |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
