"""kvpress worker (runs in the kvpress venv): prefill-time KV compression with a press, then
greedy decode over the compressed cache. Presses keep ``keep`` of the context's KV in every
layer (``compression_ratio = 1 - keep``); the question or continuation is never compressed.

Run as ``python kvpress_worker.py`` with a job on stdin (see ``_protocol``)::

    {"model_dir": str, "threads": int, "dtype": "float32",
     "tasks": [{"kind": "speed", "ids": [[int]], "n_decode": int, "repeats": int,
                "press": str, "keep": float},
               {"kind": "needle", "context_ids": [int], "question_ids": [int],
                "max_new_tokens": int, "press": str, "keep": float},
               {"kind": "nll", "context_ids": [int], "target_ids": [int],
                "press": str | None, "keep": float}]}

``press`` is one of ``PRESSES`` (None or ``keep >= 1``: no compression, plain HF).
"""

from __future__ import annotations

import contextlib

import torch
from _protocol import Timer, read_job, run_tasks, speed_run
from transformers import AutoModelForCausalLM, DynamicCache

import kvpress

PRESSES = {
    "streaming_llm": kvpress.StreamingLLMPress,
    "snapkv": kvpress.SnapKVPress,
    "knorm": kvpress.KnormPress,
    "expected_attention": kvpress.ExpectedAttentionPress,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def press_context(model, name: str | None, keep: float):
    if name is None or keep >= 1.0:
        return contextlib.nullcontext()
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; known: {sorted(PRESSES)}")
    return PRESSES[name](compression_ratio=1.0 - keep)(model)


def prefill(model, ids: list[int], press: str | None, keep: float):
    """Compressed cache and the greedy first token [1, 1] of ``ids``."""
    cache = DynamicCache()
    with press_context(model, press, keep):
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def forward(model, ids: torch.Tensor, cache: DynamicCache, position: int):
    """Logits [1, n, V] of ``ids`` [1, n] placed at ``position`` (the cache may be shorter
    than the context it holds, so positions are given, as kvpress's pipeline does)."""
    pos = torch.arange(position, position + ids.shape[1])[None]
    return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True).logits


def cache_bytes(cache: DynamicCache) -> int:
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)


@torch.inference_mode()
def speed_once(model, ids: list[int], n_decode: int, press: str, keep: float) -> dict:
    with Timer() as t_pre:
        cache, tok = prefill(model, ids, press, keep)
    kept = cache_bytes(cache)
    with Timer() as t_dec:
        for i in range(n_decode - 1):
            tok = forward(model, tok, cache, len(ids) + i)[:, -1].argmax(-1, keepdim=True)
    return speed_run(t_pre.s, t_dec.s, 1, len(ids), n_decode, device_kv_bytes=kept,
                     host_kv_bytes=0)


@torch.inference_mode()
def needle(model, task: dict) -> dict:
    ctx, question = task["context_ids"], task["question_ids"]
    cache, _ = prefill(model, ctx, task["press"], task["keep"])
    logits = forward(model, torch.tensor([question]), cache, len(ctx))
    out = [int(logits[0, -1].argmax())]
    pos = len(ctx) + len(question)
    for i in range(task["max_new_tokens"] - 1):
        logits = forward(model, torch.tensor([[out[-1]]]), cache, pos + i)
        out.append(int(logits[0, -1].argmax()))
    return {"token_ids": out}


@torch.inference_mode()
def nll(model, task: dict) -> dict:
    """Mean negative log-likelihood of ``target_ids[1:]`` after the compressed context (the
    first target token is predicted by the prefill, before any compression)."""
    ctx, target = task["context_ids"], task["target_ids"]
    cache, _ = prefill(model, ctx, task["press"], task["keep"])
    logits = forward(model, torch.tensor([target]), cache, len(ctx))[0, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    nlls = -logp.gather(1, torch.tensor(target[1:])[:, None])[:, 0]
    return {"nll": float(nlls.mean()), "n_tokens": len(target) - 1}


def main() -> None:
    import transformers

    job = read_job()
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(
        job["model_dir"], dtype=DTYPES[job["dtype"]], attn_implementation="sdpa"
    ).eval()

    def speed(task: dict) -> dict:
        if len(task["ids"]) != 1:
            raise ValueError("the kvpress worker decodes one sequence at a time")
        runs = [speed_once(model, task["ids"][0], task["n_decode"], task["press"], task["keep"])
                for _ in range(task["repeats"])]
        return {"runs": runs}

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "kvpress": getattr(kvpress, "__version__", None) or _dist_version("kvpress")}
    run_tasks(job, {"speed": speed, "needle": lambda t: needle(model, t),
                    "nll": lambda t: nll(model, t)}, versions)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
