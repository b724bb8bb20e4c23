"""HF transformers worker: dense ``DynamicCache``, sdpa, greedy; prefill in chunks.

Run as ``python hf_worker.py`` with a job on stdin (see ``_protocol``)::

    {"model_dir": str, "threads": int, "dtype": "float32", "prefill_chunk": int,
     "tasks": [{"kind": "speed", "ids": [[int]] (batch of equal lengths), "n_decode": int,
                "repeats": int}]}

Each sequence of a batch is prefilled on its own (as a server admits requests), then the
caches are stacked and decoded together.
"""

from __future__ import annotations

import torch
from _protocol import Timer, read_job, run_tasks, speed_run
from transformers import AutoModelForCausalLM, DynamicCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prefill(model, ids: list[int], chunk: int) -> tuple[DynamicCache, torch.Tensor]:
    """KV cache and greedy first token [1, 1] of one prompt."""
    cache = DynamicCache()
    x = torch.tensor([ids])
    for start in range(0, len(ids), chunk):
        out = model(input_ids=x[:, start : start + chunk], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    return cache, out.logits[:, -1].argmax(-1, keepdim=True)


def stack(caches: list[DynamicCache]) -> DynamicCache:
    """One cache holding the batch of single-sequence caches (equal lengths)."""
    if len(caches) == 1:
        return caches[0]
    merged = DynamicCache()
    for i in range(len(caches[0].layers)):
        merged.update(torch.cat([c.layers[i].keys for c in caches]),
                      torch.cat([c.layers[i].values for c in caches]), i)
    return merged


def cache_bytes(cache: DynamicCache) -> int:
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)


@torch.inference_mode()
def speed_once(model, batch: list[list[int]], n_decode: int, chunk: int) -> dict:
    with Timer() as t_pre:
        pairs = [prefill(model, ids, chunk) for ids in batch]
        cache = stack([c for c, _ in pairs])
        tok = torch.cat([t for _, t in pairs])
    with Timer() as t_dec:
        for _ in range(n_decode - 1):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return speed_run(t_pre.s, t_dec.s, len(batch), len(batch[0]), n_decode,
                     device_kv_bytes=cache_bytes(cache), host_kv_bytes=0)


def main() -> None:
    import transformers

    job = read_job()
    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(
        job["model_dir"], dtype=DTYPES[job["dtype"]], attn_implementation="sdpa"
    ).eval()

    def speed(task: dict) -> dict:
        runs = [speed_once(model, task["ids"], task["n_decode"], job["prefill_chunk"])
                for _ in range(task["repeats"])]
        return {"runs": runs}

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    run_tasks(job, {"speed": speed}, versions)


if __name__ == "__main__":
    main()
