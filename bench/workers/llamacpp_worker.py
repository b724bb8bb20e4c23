"""llama.cpp worker (runs in the llama-cpp-python venv): loads the GGUF file as it is
(quantised weights, f16 KV cache by default), greedy decode of one sequence.

Run as ``python llamacpp_worker.py`` with a job on stdin (see ``_protocol``)::

    {"model_path": str, "threads": int, "n_ctx": int,
     "tasks": [{"kind": "speed", "ids": [[int]], "n_decode": int, "repeats": int}]}
"""

from __future__ import annotations

import llama_cpp
from _protocol import Timer, read_job, run_tasks, speed_run


def kv_bytes(llm: llama_cpp.Llama, n_tokens: int) -> int:
    """f16 K and V of ``n_tokens`` tokens (llama.cpp's default cache type)."""
    meta, arch = llm.metadata, llm.metadata.get("general.architecture", "llama")
    n_layer = int(meta[f"{arch}.block_count"])
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(meta.get(f"{arch}.attention.key_length",
                            int(meta[f"{arch}.embedding_length"]) // n_head))
    return 2 * n_layer * n_kv * head_dim * 2 * n_tokens


def speed_once(llm: llama_cpp.Llama, ids: list[int], n_decode: int) -> dict:
    llm.reset()
    with Timer() as t_pre:
        llm.eval(ids)
        tok = llm.sample(temp=0.0, repeat_penalty=1.0)
    with Timer() as t_dec:
        for _ in range(n_decode - 1):
            llm.eval([tok])
            tok = llm.sample(temp=0.0, repeat_penalty=1.0)
    return speed_run(t_pre.s, t_dec.s, 1, len(ids), n_decode,
                     device_kv_bytes=kv_bytes(llm, llm.n_ctx()), host_kv_bytes=0)


def main() -> None:
    job = read_job()
    llm = llama_cpp.Llama(
        model_path=job["model_path"], n_ctx=job["n_ctx"], n_threads=job["threads"],
        n_threads_batch=job["threads"], n_batch=512, logits_all=False, verbose=False,
    )

    def speed(task: dict) -> dict:
        if len(task["ids"]) != 1:
            raise ValueError("llama-cpp-python's Llama decodes one sequence at a time")
        return {"runs": [speed_once(llm, task["ids"][0], task["n_decode"])
                         for _ in range(task["repeats"])]}

    run_tasks(job, {"speed": speed}, {"llama_cpp_python": llama_cpp.__version__})


if __name__ == "__main__":
    main()
