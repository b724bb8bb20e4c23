"""The public facade: ``LLM(...).generate(prompts, SamplingParams)`` and friends. ``LLM``
builds the parts (model, store, engine, policy, backend); ``hetero.scheduler`` runs requests."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from hetero.backend import check_backend
from hetero.cache import KVStore
from hetero.config import is_integer
from hetero.device import Device, check_kv_budget, default_kv_budget, parse_size, resolve_device
from hetero.engine import Engine
from hetero.kvcache import KVCache, check_policy, config_hash
from hetero.loader import load_checkpoint, read_gguf_blocks
from hetero.model import Transformer
from hetero.outputs import LogprobsOutput, Output
from hetero.policies import make_policy
from hetero.quant import quantize_linears, quantize_weights
from hetero.sampling import SamplingParams
from hetero.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Prompt tokens per prefill step by device type. On an H200 (1B Llama shape, bf16, 32k) dense
# prefill took 0.91 s at chunk 1024, 0.65 s at 4096 and 0.58 s at 8192 (per-chunk launches
# and weight reads amortise); 4096 takes most of that gain while a chunk's activations stay
# small beside the weights. On the CPU larger chunks gain nothing measurable.
PREFILL_CHUNK = {"cpu": 1024, "cuda": 4096}
WEIGHTS = ("dense", "quantized", "q4_0", "q4_1", "q8_0")
LONG_CONTEXT = 1 << 20  # max_model_len of a policy that reads past the trained context
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLM:
    """A Llama-family model with a paged KV store under a device budget.

    Parameters
    ----------
    model : path to an HF directory or a GGUF file; None loads the embedded SmolLM2-135M.
    device : "auto" (CUDA if present, else CPU), "cpu" or "cuda".
    dtype : "float32", "bfloat16", "float16" or a torch dtype; None picks float32 on CPU and
        bfloat16 on CUDA.
    policy : decode-attention policy, a name in the registry ``hetero.policies.POLICIES``
        (``"dense"``, exact, by default); ``policy_params`` are the fields of its dataclass.
    device_kv_budget : bytes (or "2GiB") of device memory for KV; None = a default share.
    page_size : tokens per KV page (a power of two); None = the policy's (``Policy.page_size``:
        8 for quest's small selections, which miss less at that granularity, else 16).
    prefill_chunk : prompt tokens per prefill step (a multiple of ``page_size``); None = 1024
        on the CPU, 4096 on CUDA (``PREFILL_CHUNK``).
    max_model_len : longest prompt + generation; None = the model's trained context, or
        ``LONG_CONTEXT`` for a policy with bounded positions (``actqkv``), which reads past it.
        Set above the trained context for another policy, it runs there, with a warning:
        positions it was not trained on degrade the output.
    backend : where CPU workers run, a name registered under the entry points
        ``hetero.backends`` (``hetero.backend.backend_names()``): "local" (a thread pool of
        ``os.cpu_count()`` threads) or "ray" (Ray actors: ``orchestrator.ray_backend``).
    ray_address : with backend "ray": None starts a local Ray instance (loopback only, no
        dashboard); "host:port" or "auto" joins a running cluster.
    weights : "dense" (every weight in ``dtype``); "quantized": a GGUF's block-quantised
        linear layers (Q4_0, Q4_1, Q8_0) stay in their blocks and run through a numba GEMV
        (``hetero.quant``); or "q4_0", "q4_1", "q8_0": any model's linear layers quantised
        to that format at load. Decode rows run a GEMV over the codes (numba on the CPU,
        float32 only; Triton on CUDA).
    """

    def __init__(
        self, model: str | None = None, device: str = "auto", dtype: str | torch.dtype | None = None,
        policy: str = "dense", policy_params: dict | None = None,
        device_kv_budget: int | str | None = None, page_size: int | None = None,
        prefill_chunk: int | None = None, max_model_len: int | None = None,
        backend: str = "local", ray_address: str | None = None, weights: str = "dense",
    ):
        # everything that needs no model is checked before the model loads
        if ray_address is not None and backend != "ray":
            raise ValueError(f"ray_address is for backend='ray', not {backend!r}")
        backend_options = {} if ray_address is None else {"address": ray_address}
        make_backend = check_backend(backend, backend_options)
        if page_size is not None:
            _check_int("page_size", page_size, 1)
            if page_size & (page_size - 1):
                raise ValueError(f"page_size must be a power of two, got {page_size}")
        if max_model_len is not None:
            _check_int("max_model_len", max_model_len, 2)
        if policy_params is not None and not isinstance(policy_params, dict):
            raise TypeError(f"policy_params must be a dict, got {type(policy_params).__name__}")
        self.policy = make_policy(policy, **(policy_params or {}))
        page_size = self.policy.page_size if page_size is None else page_size
        if prefill_chunk is not None:
            _check_int("prefill_chunk", prefill_chunk, page_size)
        dev = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, dev)
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
        if weights != "dense" and dev.type == "cpu" and self.dtype != torch.float32:
            raise ValueError(f"weights={weights!r} computes in float32 on the CPU: use dtype='float32', "
                             "or weights='dense'")
        budget = default_kv_budget(dev) if device_kv_budget is None else parse_size(device_kv_budget)
        check_kv_budget(budget, dev)

        ckpt = load_checkpoint(model, self.dtype)
        self._source = model  # what a chain prefill's workers load
        self.config, self.tokenizer, self.model_name = ckpt.config, ckpt.tokenizer, ckpt.name
        with torch.device("meta"):
            net = Transformer(self.config)
        net = net.to_empty(device=dev).to(self.dtype)
        net.load_hf_state_dict(ckpt.state_dict)
        if weights == "quantized":
            if not Path(ckpt.source).is_file():
                raise ValueError(f"weights='quantized' keeps a GGUF's blocks; {ckpt.source} is an HF "
                                 f"directory: quantise it at load with weights='q8_0' (or 'q4_0', 'q4_1')")
            if not quantize_linears(net, read_gguf_blocks(ckpt.source, self.config)):
                raise ValueError(f"{ckpt.source} holds no Q4_0, Q4_1 or Q8_0 linear weights: use "
                                 f"weights='q8_0' to quantise at load, or weights='dense'")
        elif weights != "dense":
            quantize_linears(net, quantize_weights(ckpt.state_dict, weights.upper()))
        self.weights = weights
        self.model = net.eval().requires_grad_(False)
        trained = self.config.max_position_embeddings
        if max_model_len is None:
            max_model_len = LONG_CONTEXT if self.policy.bounded_positions else trained
        self.max_model_len = max_model_len
        if max_model_len > trained and not self.policy.bounded_positions:
            logger.warning("max_model_len %d exceeds the %d tokens %s was trained on: quality "
                           "may drop", self.max_model_len, trained, self.model_name)
        self.device = Device(dev)
        self.store = KVStore(self.config, self.device, self.dtype, page_size, budget)
        chunk = PREFILL_CHUNK[dev.type] if prefill_chunk is None else prefill_chunk
        engine = Engine(self.model, self.store, self.policy, chunk)
        self.backend = make_backend(**backend_options)
        try:
            self.policy.bind(self.backend, self.store)
        except BaseException:
            self.backend.close()
            raise
        self.scheduler = Scheduler(engine, self.tokenizer, self.max_model_len, self.model_name)

    @property
    def engine(self) -> Engine:
        """The engine the scheduler runs requests on (its ``attention_hooks`` and
        ``step_hooks`` let a bench observe decode steps)."""
        return self.scheduler.engine

    @property
    def eos_ids(self) -> set[int]:
        """Token ids that end a generation (the model's and the tokenizer's)."""
        return self.scheduler.eos_ids

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | None = None,
                 chat: bool = False, progress: bool = False,
                 kv_cache: KVCache | str | os.PathLike | None = None) -> list[Output]:
        """Generate for one prompt or a batch decoded together; one Output per prompt.

        A prompt is text, or a list of token ids used as they are.

        ``kv_cache`` (a :class:`~hetero.kvcache.KVCache` from :meth:`prefill`, or the path of
        a KV file): each prompt is a question about that document, tokenised on its own
        without BOS and prefilled on top of the saved KV, which is loaded into the store like
        any sequence's (under the device budget, offloading as the policy decides); the
        document is not recomputed. ``chat`` must match the KV's: a document prefilled with
        ``chat=True`` opened a user turn, which the question closes. ``Output.stats``
        counts the question's tokens as the prompt's.
        """
        return self.scheduler.generate(prompts, params, chat, progress, _load_kv(kv_cache))

    def prefill(self, prompt: str | list[int], workers: int = 1, chat: bool = False,
                progress: bool = False) -> KVCache:
        """Prefill a document once and return its KV, to answer many questions about it
        (``generate(question, kv_cache=...)``; ``KVCache.save`` writes it to a file).

        ``prompt``: text (with the tokenizer's BOS), or token ids used as they are.
        ``chat``: the document opens a user turn of the chat template (the text before the
        user's message, then the document), which a question with ``chat=True`` closes.
        ``workers`` > 1: a chain prefill (KV-Runahead) over that many worker processes of
        the backend (``CPUBackend.chain_prefill``); 1 runs in this process. Every policy but
        ``actqkv`` can save its KV.
        """
        _check_int("workers", workers, 1)
        if workers == 1:
            return self.scheduler.prefill(prompt, chat, progress)
        self.scheduler._check_open()
        check_policy(self.policy)
        if self.weights != "dense":
            raise ValueError(f"a chain prefill's workers load dense weights, this LLM has weights="
                             f"{self.weights!r}: use workers=1, or weights='dense'")
        ids = self.scheduler.encode(prompt, chat, part="document")
        result = self.backend.chain_prefill(self._source, self.dtype, ids, workers,
                                            progress=_chain_bar(workers, self.config.n_layers) if progress else None)
        return result.kv_cache(self.model_name, config_hash(self.config), self.store.page_size, chat)

    def stream(self, prompt: str, params: SamplingParams | None = None, chat: bool = False,
               kv_cache: KVCache | str | os.PathLike | None = None) -> Iterator[str]:
        """Yield the text of one prompt's generation piece by piece as it is decoded.

        ``kv_cache``: the prompt is a question about that saved document, as in
        :meth:`generate`. The request is admitted (and checked) at the first ``next``; its
        pages are freed when it ends, fails, or the generator is closed or dropped."""
        return self.scheduler.stream(prompt, params, chat, _load_kv(kv_cache))

    def logprobs(self, text: str) -> LogprobsOutput:
        """Per-token log-probabilities of ``text`` under the model (for perplexity)."""
        return self.scheduler.logprobs(text)

    def decode_logprobs(self, context: str | list[int], continuation: list[int]) -> list[float]:
        """Log-probabilities of ``continuation[1:]`` scored through the policy's decode
        attention (teacher forcing), for the perplexity a sparse policy gives: prefill is
        exact under every policy, so :meth:`logprobs` cannot show its error.

        ``context`` (text, or token ids) is prefilled; then decode step ``i`` is fed
        ``continuation[i]`` (token ids, at least two) instead of a sampled token and records
        log p(``continuation[i + 1]``): ``len(continuation) - 1`` values. The sequence's
        pages are released on every exit."""
        return self.scheduler.decode_logprobs(context, continuation)

    def memory_report(self) -> dict:
        """Device KV budget, use and peak, host KV bytes, cumulative link traffic, and under
        ``"policy"`` the policy's figures of the live sequences (``Policy.stats``: magicpig's
        LSH table bytes, in all and per layer)."""
        return {**asdict(self.store.memory_report()), "policy": self.policy.stats()}

    def close(self) -> None:
        """Free every sequence and the CPU workers; the LLM refuses work afterwards. Closing
        twice is a no-op."""
        if self.scheduler.closed:
            return
        try:
            self.scheduler.close()
        finally:
            self.backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_kv(kv_cache):
    """``kv_cache`` as given, or the KV file at that path loaded."""
    return KVCache.load(kv_cache) if isinstance(kv_cache, (str, os.PathLike)) else kv_cache


def _chain_bar(workers: int, n_layers: int):
    """A chain prefill's progress on stderr: layers done in all, and per worker."""
    from tqdm.auto import tqdm

    bar = tqdm(total=workers * n_layers, desc=f"prefill ({workers} workers)", unit="layer")
    done = [0] * workers

    def progress(worker: int, layers_done: int, total: int) -> None:
        bar.update(layers_done - done[worker])
        done[worker] = layers_done
        bar.set_postfix_str(" ".join(f"w{i} {d}/{total}" for i, d in enumerate(done)), refresh=False)
        if sum(done) == workers * total:
            bar.close()

    return progress


def _check_int(name: str, value, least: int) -> None:
    if not is_integer(value) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
