"""Ask a question about a long real document with the embedded model; print answer and stats.

    python examples/long_context_qa.py [--doc FILE] [--question TEXT]
"""

import argparse

from hetero import LLM, SamplingParams
from hetero.device import format_size

ap = argparse.ArgumentParser()
ap.add_argument("--doc", default="/usr/share/common-licenses/GPL-3")
ap.add_argument("--question", default="Which license is this document, and who published it?")
args = ap.parse_args()

with open(args.doc, encoding="utf-8") as f:
    document = f.read()
llm = LLM()  # the embedded SmolLM2-135M-Instruct, dense attention, default device budget
prompt = f"{document}\n\nAnswer briefly from the document above.\nQuestion: {args.question}"
(out,) = llm.generate(prompt, SamplingParams(max_new_tokens=64), chat=True, progress=True)
s = out.stats
print(f"Q: {args.question}\nA: {out.text.strip()}\n")
print(f"prompt {s.prompt_tokens} tokens | time to first token {s.ttft_s:.1f} s | "
      f"decode {s.decode_tokens_per_s:.1f} tok/s | device KV peak {format_size(s.device_kv_bytes_peak)} "
      f"of budget {format_size(s.device_kv_budget)}")
