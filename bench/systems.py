"""The systems compared: hetero's policies, HF transformers, kvpress presses, llama.cpp.

A ``System`` knows its family (which worker runs it, in which environment) and how to turn
a speed point into that worker's job. Sparse systems get the same KV budget: hetero's
``quest`` and ``streaming`` attend ``token_budget`` tokens in each sparse layer (the first
``dense_layers`` stay exact), and a kvpress press keeps the same total share of the KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.plan import Plan
from hetero.config import ModelConfig
from hetero.policies import make_policy

FAMILIES = {  # family -> (peer that provides it, worker script)
    "hetero": ("hf", "hetero_worker.py"),  # our own venv, like HF
    "hf": ("hf", "hf_worker.py"),
    "kvpress": ("kvpress", "kvpress_worker.py"),
    "llamacpp": ("llamacpp", "llamacpp_worker.py"),
}
N_LAYERS = 30  # the embedded SmolLM2-135M; used only to share budgets fairly


@dataclass(frozen=True, slots=True)
class System:
    """One thing timed: ``family`` picks the worker, ``params`` its settings."""

    name: str
    family: str
    label: str
    params: dict = field(default_factory=dict, hash=False, compare=False)
    sparse: bool = False  # attends a budget, not the whole KV
    batched: bool = True  # can decode several sequences together

    @property
    def peer(self) -> str:
        return FAMILIES[self.family][0]

    @property
    def script(self) -> str:
        return FAMILIES[self.family][1]


def kv_share(sparse_fraction: float, dense_layers: int, n_layers: int = N_LAYERS) -> float:
    """Share of all KV a hetero sparse policy touches per step: ``dense_layers`` layers whole,
    the others ``sparse_fraction`` of it."""
    f = min(1.0, sparse_fraction)
    return (dense_layers + (n_layers - dense_layers) * f) / n_layers


def hetero(policy: str, weights: str = "dense", **params) -> System:
    """hetero with ``policy`` and its ``params``; ``weights`` as ``LLM(weights=...)`` (a
    quantised system is named ``hetero-<policy>-<weights>``)."""
    sparse = policy != "dense"
    budget = params.get("token_budget") or (params.get("n_sink", 0) + params.get("n_local", 0))
    label = f"hetero {policy}" + (f" ({budget} tok/step)" if sparse and budget else "")
    name = f"hetero-{policy}"
    if weights != "dense":
        name, label = f"{name}-{weights}", f"{label}, {weights} weights"
    return System(name, "hetero", label, {"policy": policy, **params, "weights": weights}, sparse=sparse)


def policy_params(system: System) -> dict:
    """The policy parameters of a hetero system."""
    return {k: v for k, v in system.params.items() if k not in ("policy", "weights")}


def hetero_sparse(policy: str, token_budget: int, dense_layers: int, n_local: int = 64,
                  weights: str = "dense") -> System:
    """``quest`` or ``streaming`` attending ``token_budget`` tokens in each sparse layer."""
    if policy == "quest":
        return hetero("quest", weights, token_budget=token_budget, n_sink=4,
                      n_local=min(n_local, token_budget - 4), dense_layers=dense_layers)
    if policy == "streaming":
        return hetero("streaming", weights, n_sink=4, n_local=max(1, token_budget - 4),
                      dense_layers=dense_layers)
    raise ValueError(f"no sparse hetero system {policy!r}")


def kvpress(press: str) -> System:
    return System(f"kvpress-{press}", "kvpress", f"kvpress {press}", {"press": press},
                  sparse=True, batched=False)


HF = System("hf", "hf", "HF transformers (dense)")
LLAMACPP = System("llamacpp", "llamacpp", "llama.cpp (Q4_1 GGUF)", batched=False)


def speed_systems(plan: Plan) -> list[System]:
    """Every system of the decode, prefill and memory workloads."""
    return [
        hetero("dense"),
        hetero("dense", "quantized"),  # the GGUF's Q4_1 blocks, as llama.cpp reads them
        hetero_sparse("quest", plan.token_budget, plan.dense_layers),
        hetero_sparse("quest", plan.token_budget, plan.dense_layers, weights="quantized"),
        hetero_sparse("streaming", plan.token_budget, plan.dense_layers),
        hetero("magicpig", dense_layers=plan.dense_layers),  # its keys touched are measured
        HF,
        LLAMACPP,
        *(kvpress(p) for p in plan.speed_presses),
    ]


def device_kv_budget(system: System, plan: Plan, cfg: ModelConfig, n_tokens: int,
                     batch: int = 1, page_size: int | None = None, itemsize: int = 4) -> int:
    """Bytes of device KV budget a hetero system needs for ``batch`` sequences of up to
    ``n_tokens``, with a 10% margin: the whole KV for ``dense``, the policy's resident set
    (``Policy.device_pages``) for the sparse ones. A budget sized to the run is what a user
    sets; a far larger one only costs page-allocator time."""
    policy = make_policy(system.params["policy"], **policy_params(system))
    page_size = page_size or policy.page_size  # the LLM's page size when none is given
    n_pages = -(-n_tokens // page_size)
    if system.sparse:
        pages = policy.device_pages(cfg, n_tokens, page_size, plan.prefill_chunk) * batch
    else:
        pages = cfg.n_layers * n_pages * batch
    pages = int(1.1 * pages) + 2 * cfg.n_layers
    return pages * 2 * cfg.n_kv_heads * page_size * cfg.head_dim * itemsize


def hetero_llm_args(system: System, plan: Plan, cfg: ModelConfig, n_tokens: int,
                    batch: int = 1) -> dict:
    """Keyword arguments of ``hetero.LLM`` (beside the model) for ``system``."""
    return {"dtype": plan.dtype, "policy": system.params["policy"], "policy_params": policy_params(system),
            "weights": system.params.get("weights", "dense"),
            "device_kv_budget": device_kv_budget(system, plan, cfg, n_tokens, batch),
            "prefill_chunk": plan.prefill_chunk, "max_model_len": n_tokens}


def speed_job(system: System, plan: Plan, model: dict, threads: int, batch: list[list[int]],
              n_decode: int, repeats: int, cfg: ModelConfig | None = None) -> dict:
    """The worker job that times ``batch`` (prompts of equal length) on ``system``
    (``cfg``, the model's configuration, sizes hetero's device budget)."""
    n = len(batch[0])
    task = {"kind": "speed", "ids": batch, "n_decode": n_decode, "repeats": repeats}
    if system.family == "hetero":
        llm = hetero_llm_args(system, plan, cfg, n + n_decode + 16, len(batch))
        return {"model": model["source"], "threads": threads, "llm": llm, "tasks": [task]}
    if system.family == "hf":
        chunk = plan.hf_prefill_chunk or n
        return {"model_dir": model["hf_dir"], "threads": threads, "dtype": plan.dtype,
                "prefill_chunk": chunk, "tasks": [task]}
    if system.family == "kvpress":
        keep = kv_share(plan.token_budget / n, plan.dense_layers)
        task.update(press=system.params["press"], keep=keep)
        return {"model_dir": model["hf_dir"], "threads": threads, "dtype": plan.dtype,
                "tasks": [task]}
    if system.family == "llamacpp":
        return {"model_path": model["gguf"], "threads": threads, "n_ctx": n + n_decode + 64,
                "tasks": [task]}
    raise ValueError(f"unknown system family {system.family!r}")


def speed_kv_share(system: System, plan: Plan, context: int) -> float:
    """Share of the context's KV a system's decode step reads."""
    if not system.sparse:
        return 1.0
    return kv_share(plan.token_budget / context, plan.dense_layers)
