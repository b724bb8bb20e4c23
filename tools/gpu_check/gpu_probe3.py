"""Third GPU probe: where hetero's dense in-place prefill time goes on the GPU (it trailed HF
transformers 2.4-3.8x at 32k-128k), by prefill chunk size and with torch.profiler.

    PYTHONPATH=. python tools/gpu_check/gpu_probe3.py --out DIR [--dry]   # from the repository root
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--dry", action="store_true")
args = ap.parse_args()
if args.dry:
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import gpu_check as gc  # noqa: E402

out_dir = Path(args.out)
out_dir.mkdir(parents=True, exist_ok=True)
dev = "cpu" if args.dry else "cuda"
dtype = torch.float32 if args.dry else torch.bfloat16
dname = "float32" if args.dry else "bfloat16"
res = {}


def save():
    (out_dir / "gpu_probe3.json").write_text(json.dumps(gc.clean(res), indent=1, default=str))


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def step(name, fn):
    t = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: start", flush=True)
    try:
        r = fn()
        res[name] = {"ok": True, "s": time.time() - t, **(r or {})}
    except Exception as e:
        res[name] = {"ok": False, "s": time.time() - t, "error": f"{type(e).__name__}: {e}"[:800],
                     "tb": traceback.format_exc()[-2000:]}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(gc.clean(res[name]), default=str)[:1500]}", flush=True)
    save()


geo = gc.geo_p4(args.dry)
tok = gc.load_tokenizer()
n = 2048 if args.dry else 32768
ids = gc.text_ids(tok, n)
mdir = Path("/tmp/probe3_model") if args.dry else Path("/dev/shm/probe3_model")
state = {}


def build():
    state["hf"] = gc.build_llama_dir(mdir, tok, geo, dev, dtype, seed=3, attn="sdpa")
    sync()
    return {}


step("build", build)


def hf_prefill():
    model = state["hf"]
    x = torch.tensor([ids], device=dev)
    with torch.inference_mode():
        model(x[:, :1024])
        sync()
        t = time.time()
        model(x, logits_to_keep=1)
        sync()
    return {"ttft_s": time.time() - t}


step("hf_prefill_oneshot", hf_prefill)
state.pop("hf", None)
if dev == "cuda":
    torch.cuda.empty_cache()

from hetero import LLM, SamplingParams  # noqa: E402

llms = {}
for chunk in ([256, 512] if args.dry else [1024, 4096, 8192]):
    def run(chunk=chunk):
        llm = LLM(str(mdir), device=dev, dtype=dname, device_kv_budget="6GiB" if not args.dry else "256MiB",
                  max_model_len=n + 64, prefill_chunk=chunk)
        llm.generate(ids[:chunk * 2], SamplingParams(max_new_tokens=1, ignore_eos=True))
        sync()
        t = time.time()
        (o,) = llm.generate(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
        sync()
        wall = time.time() - t
        llms[chunk] = llm
        return {"chunk": chunk, "wall_s": wall, "ttft_s": o.stats.ttft_s}
    step(f"hetero_prefill_chunk{chunk}", run)
    if chunk in llms and chunk != (256 if args.dry else 1024):
        del llms[chunk]
        if dev == "cuda":
            torch.cuda.empty_cache()


def profile_default():
    from torch.profiler import ProfilerActivity, profile
    chunk = 256 if args.dry else 1024
    llm = llms[chunk]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        t = time.time()
        llm.generate(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
        sync()
        wall = time.time() - t
    ka = prof.key_averages()
    attr = None
    if dev == "cuda":
        attr = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    rows = [{"op": e.key[:100], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_gpu_ms": (getattr(e, attr) / 1e3) if attr else 0.0} for e in ka]
    cpu_top = sorted(rows, key=lambda r: r["self_cpu_ms"], reverse=True)[:25]
    gpu_top = sorted(rows, key=lambda r: r["self_gpu_ms"], reverse=True)[:25]
    kernels = [r for r in rows if not r["op"].startswith(("aten::", "cuda", "cu", "Buffer", "Activity"))]
    return {"profiled_wall_s": wall, "gpu_kernel_ms_total": sum(r["self_gpu_ms"] for r in kernels),
            "cpu_top": cpu_top, "gpu_top": gpu_top}


step("profile_chunk_default", profile_default)
print("done", flush=True)
