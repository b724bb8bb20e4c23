"""Second GPU probe: HF transformers' offloaded cache as the offload peer, and where a quest
decode step's time goes on the GPU (torch.profiler). Reuses gpu_check's helpers.

    PYTHONPATH=. python tools/gpu_check/gpu_probe2.py --out DIR [--dry]   # from the repository root

The quest run uses the default prefill chunk (4096 on CUDA); the first run (before hetero's
layer-major offloading prefill) needed prefill_chunk=64 there.
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
res = {"started": time.time()}


def save():
    (out_dir / "gpu_probe2.json").write_text(json.dumps(gc.clean(res), indent=1, default=str))


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
                     "tb": traceback.format_exc()[-2500:]}
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(gc.clean(res[name]), default=str)[:600]}", flush=True)
    save()


geo = gc.geo_p4(args.dry)
tok = gc.load_tokenizer()
contexts = [512, 1024] if args.dry else [8192, 32768, 131072]
n_new = 5 if args.dry else 33
ids_all = gc.text_ids(tok, contexts[-1])
mdir = Path("/tmp/probe2_model") if args.dry else Path("/dev/shm/probe2_model")
state = {}


def build():
    state["hf"] = gc.build_llama_dir(mdir, tok, geo, dev, dtype, seed=3, attn="sdpa")
    sync()
    return {"geo": geo}


step("build", build)


def hf_offloaded(n):
    def run():
        model = state["hf"]
        ids = torch.tensor([ids_all[:n]], device=dev)
        with torch.inference_mode():
            model.generate(ids[:, :256], max_new_tokens=2, do_sample=False, cache_implementation="offloaded")
            sync()
            t = time.time()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, cache_implementation="offloaded")
            sync()
            ttft = time.time() - t
            t = time.time()
            o = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                               cache_implementation="offloaded")
            sync()
            wall = time.time() - t
        steps = o.shape[1] - n - 1
        peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
        return {"context": n, "ttft_s": ttft, "decode_ms_per_token": (wall - ttft) / max(steps, 1) * 1e3,
                "steps": steps, "torch_max_allocated": peak}
    return run


for n in contexts:
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step(f"hf_offloaded_ctx{n}", hf_offloaded(n))


def quest_profile():
    from hetero import LLM, SamplingParams

    state.pop("hf", None)
    if dev == "cuda":
        torch.cuda.empty_cache()
    n = contexts[0]
    llm = LLM(str(mdir), device=dev, dtype=dname, policy="quest", policy_params={"token_budget": 512 if not args.dry else 128},
              device_kv_budget=(1 << 30) if not args.dry else "64MiB",
              max_model_len=n + 256)
    llm.generate(ids_all[:n // 4], SamplingParams(max_new_tokens=3, ignore_eos=True))
    sync()
    t = time.time()
    (out,) = llm.generate(ids_all[:n], SamplingParams(max_new_tokens=n_new, ignore_eos=True))
    sync()
    plain = {"wall_s": time.time() - t, "ttft_s": out.stats.ttft_s,
             "decode_ms_per_token": 1e3 / out.stats.decode_tokens_per_s}
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    m = contexts[0] // 2

    def prof_run(k):
        with profile(activities=acts) as prof:
            t = time.time()
            llm.generate(ids_all[:m], SamplingParams(max_new_tokens=k, ignore_eos=True))
            sync()
            wall = time.time() - t
        ka = prof.key_averages()
        attr = None
        if dev == "cuda":
            attr = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
        d = {}
        for e in ka:
            d[e.key] = (e.count, e.self_cpu_time_total / 1e3, (getattr(e, attr) / 1e3) if attr else 0.0)
        return wall, d

    w1, d1 = prof_run(1)
    w9, d9 = prof_run(9)
    diff = []
    for key, (c, cpu, gpu) in d9.items():
        c0, cpu0, gpu0 = d1.get(key, (0, 0.0, 0.0))
        diff.append({"op": key[:90], "calls_per_step": (c - c0) / 8, "cpu_ms_per_step": (cpu - cpu0) / 8,
                     "gpu_ms_per_step": (gpu - gpu0) / 8})
    cpu_top = sorted(diff, key=lambda r: r["cpu_ms_per_step"], reverse=True)[:25]
    gpu_top = sorted(diff, key=lambda r: r["gpu_ms_per_step"], reverse=True)[:20]
    total_gpu = sum(r["gpu_ms_per_step"] for r in diff)
    launches = sum(r["calls_per_step"] for r in diff if "LaunchKernel" in r["op"] or "cuLaunch" in r["op"])
    return {"plain": plain, "context_profiled": m, "wall_per_decode_step_ms_profiled": (w9 - w1) / 8 * 1e3,
            "gpu_kernel_ms_per_step": total_gpu, "kernel_launches_per_step": launches,
            "cpu_top": cpu_top, "gpu_top": gpu_top}


step("quest_profile", quest_profile)
res["elapsed_s"] = time.time() - res["started"]
save()
print("done", flush=True)
