"""The chain prefill's cost model fitted on this machine, and the bounds it gives.

One decoder layer of the model's shape (random weights: the time does not depend on their
values) runs a part of ``n`` tokens after ``c`` earlier ones exactly as a chain worker runs
it (``orchestrator.chain_part.part_attention`` over a buffer of ``c + n`` keys), at the three
sizes of ``SIZES``, with the threads one worker gets (alone: the workers' contention for
the cores scales ``a`` and ``b`` alike, and the cuts depend only on ``b / a``);
``orchestrator.partition.fit_cost_model`` fits ``a`` and ``b``. That takes about a second for
SmolLM2-135M on one thread. The fit is cached as JSON in ``$HETERO_CACHE_DIR/runahead/``
(else under ``$XDG_CACHE_HOME/hetero`` or ``~/.cache/hetero``), keyed on the config hash
(``hetero.kvcache.config_hash``), dtype, device and threads: a later run on the same
machine reads it (``refit=True`` measures again).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import statistics
import time
from pathlib import Path

import torch

from hetero.config import ModelConfig
from hetero.kvcache import config_hash
from hetero.loader import hf_reference_dir
from hetero.model import Block, Rope
from orchestrator.chain_part import PAGE, part_attention
from orchestrator.partition import CostModel, even_bounds, fit_cost_model, fitted_bounds

logger = logging.getLogger(__name__)

# (n, c) of the timed parts: attention-light, attention-heavy, and a longer part between
SIZES = ((512, 0), (512, 3584), (1536, 1024))
PARTITIONS = ("fitted", "even")


def model_config(source: str | None) -> ModelConfig:
    """The config of the model ``source`` names (``load_checkpoint``'s argument), read
    without its weights."""
    with open(Path(hf_reference_dir(source)) / "config.json", encoding="utf-8") as f:
        return ModelConfig.from_hf(json.load(f))


def measure_layer(cfg: ModelConfig, dtype: torch.dtype, threads: int,
                  sizes: tuple[tuple[int, int], ...] = SIZES, repeats: int = 3) -> list[tuple[int, int, float]]:
    """``(n, c, seconds)``: the median time of one layer over a part of ``n`` tokens after
    ``c`` earlier ones, per size, on ``threads`` torch threads (the process's thread count is
    restored afterwards)."""
    gen = torch.Generator().manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.device("meta"):
            block = Block(cfg, 0)
        block = block.to_empty(device="cpu").to(dtype).requires_grad_(False)
        for p in block.parameters():
            p.normal_(0, 0.02, generator=gen)
        rope, scale, samples = Rope(cfg), cfg.head_dim**-0.5, []
        with torch.inference_mode():
            for n, c in sizes:
                rows = -(-(c + n) // PAGE) * PAGE
                kb = torch.randn((rows, cfg.n_kv_heads, cfg.head_dim), generator=gen).to(dtype)
                vb = torch.randn(kb.shape, generator=gen).to(dtype)
                x = torch.randn((n, cfg.hidden_size), generator=gen).to(dtype)
                cos, sin = rope.tables(torch.arange(c, c + n), dtype, c + n)

                def attend(_: int, q, k, v, c=c, n=n, kb=kb, vb=vb):
                    kb[c:c + n], vb[c:c + n] = k, v
                    return part_attention(q, kb, vb, c, scale)

                times = []
                for _ in range(repeats + 1):  # the first one warms up
                    t = time.perf_counter()
                    block(x, cos, sin, attend)
                    times.append(time.perf_counter() - t)
                samples.append((n, c, statistics.median(times[1:])))
    finally:
        torch.set_num_threads(previous)
    return samples


def cost_model(cfg: ModelConfig, dtype: torch.dtype, threads: int, refit: bool = False) -> CostModel:
    """The fitted cost model of one layer on ``threads`` threads: from the cache, or measured
    (:func:`measure_layer`), fitted and cached (a cache that cannot be written is logged)."""
    key = f"{config_hash(cfg)}-{str(dtype).removeprefix('torch.')}-cpu-t{threads}"
    path = _cache_dir() / f"{key}.json"
    if not refit:
        try:
            fit = json.loads(path.read_text())
            return CostModel(fit["a"], fit["b"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none yet, or unreadable: measure
    samples = measure_layer(cfg, dtype, threads)
    model = fit_cost_model(samples)
    logger.info("chain prefill cost model on %d thread(s): a=%.3g s/token, b=%.3g s/pair (from %s)",
                threads, model.a, model.b, samples)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"a": model.a, "b": model.b, "samples": samples, "threads": threads,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.warning("cannot cache the chain prefill's cost model in %s: %s", path.parent, e)
    return model


def plan_bounds(cfg: ModelConfig, dtype: torch.dtype, n_tokens: int, workers: int, partition: str,
                threads: int, refit: bool = False) -> list[int]:
    """The chain's bounds for a prompt of ``n_tokens``: ``partition`` "fitted" (equal time
    under :func:`cost_model`) or "even"."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {', '.join(map(repr, PARTITIONS))}, got {partition!r}")
    if partition == "even" or workers == 1:
        return even_bounds(n_tokens, workers)
    even_bounds(n_tokens, workers)  # its checks, before anything is measured
    return fitted_bounds(n_tokens, workers, cost_model(cfg, dtype, threads, refit))


def _cache_dir() -> Path:
    """Beside the converted-GGUF cache (``hetero.model_cache``)."""
    root = os.environ.get("HETERO_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hetero")
    return Path(root) / "runahead"
