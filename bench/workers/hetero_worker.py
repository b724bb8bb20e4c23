"""hetero worker: one ``LLM`` (a policy and its parameters), timed through ``generate``.

Run as ``python hetero_worker.py`` with a job on stdin (see ``_protocol``)::

    {"model": str | None, "threads": int,
     "llm": {"dtype": str, "policy": str, "policy_params": {...}, "device_kv_budget": ...,
             "prefill_chunk": int, "max_model_len": int},
     "tasks": [{"kind": "speed", "ids": [[int]] (batch), "n_decode": int, "repeats": int}]}

A batch is prefilled prompt by prompt and decoded together, as ``LLM.generate`` does.
"""

from __future__ import annotations

import torch
from _protocol import read_job, run_tasks, speed_run

from hetero import LLM, SamplingParams


def speed_once(llm: LLM, batch: list[list[int]], n_decode: int) -> dict:
    outs = llm.generate(batch, SamplingParams(max_new_tokens=n_decode, ignore_eos=True))
    last = outs[-1].stats  # its first token comes after every prefill: decode starts then
    decode_s = (n_decode - 1) / last.decode_tokens_per_s
    return speed_run(
        last.ttft_s, decode_s, len(batch), len(batch[0]), n_decode,
        device_kv_bytes=last.device_kv_bytes_peak,
        device_kv_budget=last.device_kv_budget,
        host_kv_bytes=max(o.stats.host_kv_bytes for o in outs),
        h2d_bytes_per_token=last.h2d_bytes_per_token,
        cache_hit_rate=last.cache_hit_rate,
        lsh_table_bytes=max(o.stats.policy.get("lsh_table_bytes", 0) for o in outs) or None,
    )


def main() -> None:
    import numba

    job = read_job()
    torch.set_num_threads(job["threads"])
    llm = LLM(job["model"], device="cpu", **job["llm"])

    def speed(task: dict) -> dict:
        return {"runs": [speed_once(llm, task["ids"], task["n_decode"])
                         for _ in range(task["repeats"])]}

    run_tasks(job, {"speed": speed}, {"torch": torch.__version__, "numba": numba.__version__})


if __name__ == "__main__":
    main()
