"""The public facade: ``LLM(...).generate(prompts, SamplingParams)`` and friends."""

from __future__ import annotations

import itertools
import logging
import numbers
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from hetero.backend import CPUBackend
from hetero.cache import KVStore, OutOfPages
from hetero.device import Device, check_kv_budget, default_kv_budget, format_size, parse_size, resolve_device
from hetero.engine import Engine
from hetero.loader import load_checkpoint
from hetero.model import Transformer
from hetero.outputs import Detokenizer, LogprobsOutput, Output, RequestStats
from hetero.policies import make_policy
from hetero.sampling import SamplingParams, make_generator, sample

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
# Prompt tokens per prefill step by device type. On an H200 (1B Llama shape, bf16, 32k) dense
# prefill took 0.91 s at chunk 1024, 0.65 s at 4096 and 0.58 s at 8192 (per-chunk launches
# and weight reads amortise); 4096 takes most of that gain while a chunk's activations stay
# small beside the weights. On the CPU larger chunks gain nothing measurable.
PREFILL_CHUNK = {"cpu": 1024, "cuda": 4096}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class _Request:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # generation cap: max_new_tokens, or less at the context limit
    detok: Detokenizer
    generator: torch.Generator | None
    t_start: float
    output_ids: list[int]
    t_first: float = 0.0
    t_end: float = 0.0
    finish_reason: str | None = None


class LLM:
    """A Llama-family model with a paged KV store under a device budget.

    Parameters
    ----------
    model : path to an HF directory or a GGUF file; None loads the embedded SmolLM2-135M.
    device : "auto" (CUDA if present, else CPU), "cpu" or "cuda".
    dtype : "float32", "bfloat16", "float16" or a torch dtype; None picks float32 on CPU and
        bfloat16 on CUDA.
    policy : decode-attention policy: "dense" (exact; offloads and streams only when the KV
        outgrows the budget), "streaming" (sinks + local window), "quest" (page top-k) or
        "magicpig" (LSH sampling by CPU workers); ``policy_params`` are its parameters
        (``n_sink``, ``n_local``, ``dense_layers``, ``token_budget`` for quest, ``lsh_k``,
        ``lsh_l``, ``seed`` for magicpig, ``stream_pages`` for dense).
    device_kv_budget : bytes (or "2GiB") of device memory for KV; None = a default share.
    page_size : tokens per KV page (a power of two).
    prefill_chunk : prompt tokens per prefill step (a multiple of ``page_size``); None = 1024
        on the CPU, 4096 on CUDA (``PREFILL_CHUNK``).
    max_model_len : longest prompt + generation; None = the model's trained context.
    backend : "local" (CPU workers on a thread pool of ``os.cpu_count()`` threads) or "ray"
        (CPU workers as Ray actors: ``orchestrator.ray_backend``).
    ray_address : with backend "ray": None starts a local Ray instance (loopback only, no
        dashboard); "host:port" or "auto" joins a running cluster.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        policy: str = "dense",
        policy_params: dict | None = None,
        device_kv_budget: int | str | None = None,
        page_size: int = 16,
        prefill_chunk: int | None = None,
        max_model_len: int | None = None,
        backend: str = "local",
        ray_address: str | None = None,
    ):
        self._closed = True  # until construction succeeds
        # everything that needs no model is checked before the model loads
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
        if ray_address is not None and backend != "ray":
            raise ValueError(f"ray_address is for backend='ray', not {backend!r}")
        if backend == "ray":
            from orchestrator.ray_address import check_address

            check_address(ray_address)
        _check_int("page_size", page_size, 1)
        if page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if prefill_chunk is not None:
            _check_int("prefill_chunk", prefill_chunk, page_size)
        if max_model_len is not None:
            _check_int("max_model_len", max_model_len, 2)
        if policy_params is not None and not isinstance(policy_params, dict):
            raise TypeError(f"policy_params must be a dict, got {type(policy_params).__name__}")
        self.policy = make_policy(policy, **(policy_params or {}))
        dev = resolve_device(device)
        self.dtype = _resolve_dtype(dtype, dev)
        budget = default_kv_budget(dev) if device_kv_budget is None else parse_size(device_kv_budget)
        check_kv_budget(budget, dev)
        ckpt = load_checkpoint(model, self.dtype)
        self.config, self.tokenizer, self.model_name = ckpt.config, ckpt.tokenizer, ckpt.name
        with torch.device("meta"):
            net = Transformer(self.config)
        net = net.to_empty(device=dev).to(self.dtype)
        net.load_hf_state_dict(ckpt.state_dict)
        self.model = net.eval().requires_grad_(False)
        trained = self.config.max_position_embeddings
        self.max_model_len = trained if max_model_len is None else max_model_len
        if self.max_model_len > trained:
            logger.warning(
                "max_model_len %d exceeds the %d tokens %s was trained on: quality may drop",
                self.max_model_len, trained, self.model_name,
            )
        self.device = Device(dev)
        self.store = KVStore(self.config, self.device, self.dtype, page_size, budget)
        chunk = PREFILL_CHUNK[dev.type] if prefill_chunk is None else prefill_chunk
        self.engine = Engine(self.model, self.store, self.policy, chunk)
        self.backend = _make_backend(backend, ray_address)
        try:
            self.policy.bind(self.backend, self.store)
        except BaseException:
            self.backend.close()
            raise
        self.eos_ids = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._ids = itertools.count()
        self._snap_start = self._snap_decode = self._snapshot()
        self._decoded = 0
        self._closed = False

    # -- public API ----------------------------------------------------------------------

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        chat: bool = False,
        progress: bool = False,
    ) -> list[Output]:
        """Generate for one prompt or a batch decoded together; one Output per prompt.

        A prompt is text, or a list of token ids used as they are.
        """
        reqs = self._admit(_prompt_list(prompts), params, chat)
        try:
            for _ in self._run(reqs, progress):
                pass
            return [self._finish(r) for r in reqs]
        finally:  # on any exit: an error, Ctrl-C
            self._release(reqs)

    def stream(
        self, prompt: str, params: SamplingParams | None = None, chat: bool = False
    ) -> Iterator[str]:
        """Yield the text of one prompt's generation piece by piece as it is decoded.

        The request is admitted (and checked) at the first ``next``; its pages are freed
        when it ends, fails, or the generator is closed or dropped."""
        (req,) = self._admit([prompt], params, chat)
        try:
            for _ in self._run([req], progress=False):
                if piece := req.detok.delta():
                    yield piece
            if piece := req.detok.delta(final=True):
                yield piece
        finally:  # also on GeneratorExit: close() or garbage collection
            self._release([req])

    def logprobs(self, text: str) -> LogprobsOutput:
        """Per-token log-probabilities of ``text`` under the model (for perplexity)."""
        self._check_open()
        ids = self._encode(text, chat=False)
        if len(ids) < 2:
            raise ValueError("logprobs needs a text of at least two tokens")
        seq, _, _ = self._place(len(ids))
        try:
            logprobs = self.engine.prefill(seq, ids, score=True)
        finally:
            self.engine.release(seq)
        return LogprobsOutput(ids, logprobs.tolist())

    def memory_report(self) -> dict:
        """Device KV budget, use and peak, host KV bytes, cumulative link traffic, and the
        CPU workers' LSH table bytes (in all and per layer) of the live sequences."""
        per_layer = self.backend.table_bytes()
        lsh = [per_layer.get(layer, 0) for layer in range(self.config.n_layers)]
        return {**asdict(self.store.memory_report()), "lsh_table_bytes": sum(lsh),
                "lsh_table_bytes_per_layer": lsh}

    def close(self) -> None:
        """Free every sequence and the CPU workers; the LLM refuses work afterwards. Closing
        twice is a no-op."""
        if self._closed:
            return
        self._closed = True
        try:
            for seq in list(self.store.tables):
                self.engine.release(seq)
        finally:
            self.backend.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this LLM is closed: create a new one")

    def _encode(self, prompt: str | list[int], chat: bool) -> list[int]:
        if isinstance(prompt, (list, tuple)) and prompt and all(_is_index(t) for t in prompt):
            if chat:
                raise ValueError("chat=True needs a text prompt, not token ids")
            ids = [int(t) for t in prompt]
            if not all(0 <= t < self.config.vocab_size for t in ids):
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        elif not isinstance(prompt, str) or not prompt:
            raise ValueError(f"a prompt must be a non-empty string or a list of token ids, got "
                             f"{_describe(prompt)}")
        else:
            self._check_length(prompt)
            if chat:
                if not self.tokenizer.chat_template:
                    raise ValueError(f"{self.model_name} has no chat template: call without chat")
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
                )
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, the context limit is {self.max_model_len}: "
                f"shorten it or pass a larger max_model_len"
            )
        return ids

    def _check_length(self, text: str) -> None:
        """Raise before tokenising all of a text far longer than the context: its pieces are
        counted one by one, stopping as soon as they are too many (a split can add at most
        one token per piece, which the count allows for)."""
        piece = 16 * self.max_model_len  # characters: tokens are rarely longer than 16
        if len(text) <= 2 * piece:
            return
        n = 0
        for i, start in enumerate(range(0, len(text), piece)):
            n += len(self.tokenizer(text[start : start + piece], add_special_tokens=False)["input_ids"])
            if n - i >= self.max_model_len:
                raise ValueError(
                    f"prompt has more than {self.max_model_len} tokens (counted up to character "
                    f"{start + piece} of {len(text)}), the context limit is {self.max_model_len}: "
                    f"shorten it or pass a larger max_model_len"
                )

    def _admit(self, prompts: list, params: SamplingParams | None, chat: bool) -> list[_Request]:
        """Check and tokenise every prompt, then reserve KV for each: everything about a
        request is checked before a page is taken, and on any failure the pages taken so far
        are freed."""
        self._check_open()
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(chat, bool):
            raise TypeError(f"chat must be True or False, got {chat!r}")
        if not prompts:
            raise ValueError("no prompts given")
        encoded = [self._encode(p, chat) for p in prompts]
        generators = [make_generator(params, self.device.device) for _ in encoded]
        self.store.allocator.peak_used = self.store.allocator.n_used
        self._snap_start = self._snapshot()
        # a batch whose offloading prompts cannot each hold a layer's whole KV while they
        # are prefilled streams their layers' KV instead
        for whole_layers in (True, False):
            reqs, committed, transient = [], 0, 0
            try:
                for ids, generator in zip(encoded, generators):
                    cap = min(params.max_new_tokens, self.max_model_len - len(ids))
                    seq, need, extra = self._place(len(ids) + cap, committed, transient,
                                                   len(reqs) + 1, whole_layers)
                    reqs.append(_Request(seq, ids, params, cap, Detokenizer(self.tokenizer, params.stop),
                                         generator, time.perf_counter(), []))
                    committed, transient = committed + need, max(transient, extra)
                return reqs
            except BaseException as e:
                self._release(reqs)
                if not (whole_layers and isinstance(e, OutOfPages) and len(encoded) > 1):
                    raise

    def _release(self, reqs: list[_Request]) -> None:
        """Free the pages (and the policy's state) of every request still holding them: the
        one release path, run on every exit."""
        for r in reqs:
            if r.seq_id in self.store.tables:
                self.engine.release(r.seq_id)

    def _place(self, n: int, committed: int = 0, transient: int = 0, n_seqs: int = 1,
               whole_layers: bool = True) -> tuple[int, int, int]:
        """Admit a sequence of up to ``n`` tokens beside sequences admitted before it that
        were promised ``committed`` more device pages and, at most ``transient`` pages
        while they are prefilled (prefills run one at a time). It offloads if its policy
        says so, and is prefilled layer by layer then: with one layer's whole KV on the
        device if that fits (and ``whole_layers``), else streaming the layer's prior KV.

        Returns its id, the device pages it was promised beyond those it took now, and its
        prefill's transient pages."""
        store, cfg, ps, policy = self.store, self.config, self.store.page_size, self.policy
        free, chunk = store.allocator.n_free, self.engine.prefill_chunk
        full = cfg.n_layers * -(-n // ps)
        offload = policy.offloads(committed + transient + full <= free, n, ps)
        stream, need, extra = False, full, 0
        if offload:  # its prefill holds more than its steady pages, one sequence at a time
            need = policy.steady_pages(cfg, n, ps)
            extra = max(transient, policy.prefill_pages(cfg, n, ps, chunk) - need)
            if not whole_layers or committed + need + extra > free:  # a layer does not fit
                stream = True
                extra = max(transient, policy.prefill_pages(cfg, n, ps, chunk, stream_prefill=True) - need)
        if committed + need + extra > free:
            what = "resident set and one prefill chunk" if offload else "KV"
            raise OutOfPages(
                f"device_kv_budget {format_size(store.budget)} cannot hold the {what} of "
                f"{n_seqs} sequence(s) of up to {n} tokens with policy {policy.name!r} "
                f"({format_size((committed + need + extra) * store.page_bytes)} needed, "
                f"{format_size(free * store.page_bytes)} free): raise device_kv_budget, "
                f"shorten the prompt or max_new_tokens, or send fewer prompts"
            )
        if stream:
            logger.info("one layer's KV of %d tokens does not fit the free device budget: its "
                        "prefill streams the layer's offloaded KV back chunk by chunk", n)
        seq = next(self._ids)
        store.prepare(committed + need + extra)
        store.admit(seq, n, offload, policy.dense_layers, stream_prefill=stream)  # dense layers' pages
        if offload:  # its other pages are taken as it runs: keep them promised
            return seq, need - (free - store.allocator.n_free), extra
        store.reserve(seq, n)  # taken now: n_free already counts them
        return seq, 0, 0

    def _run(self, reqs: list[_Request], progress: bool) -> Iterator[None]:
        """Prefill every request, then decode the live ones together; yields per token."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(r.prompt_ids) for r in reqs), desc="prefill", unit="tok")
        try:
            for r in reqs:
                logits = self.engine.prefill(r.seq_id, r.prompt_ids, progress=bar and bar.update)
                self._accept(r, sample(logits, r.params, r.generator))
                yield
            if bar is not None:
                bar.close()
            self._snap_decode, self._decoded = self._snapshot(), 0
            live = [r for r in reqs if r.finish_reason is None]
            while live:
                self._decoded += len(live)
                logits = self.engine.decode([r.seq_id for r in live], [r.output_ids[-1] for r in live])
                for r, row in zip(live, logits):
                    self._accept(r, sample(row, r.params, r.generator))
                yield
                live = [r for r in live if r.finish_reason is None]
        finally:  # the caller frees the requests' pages (LLM._release)
            if bar is not None:
                bar.close()

    def _accept(self, r: _Request, token: int) -> None:
        if not r.output_ids:
            r.t_first = time.perf_counter()
        r.output_ids.append(token)
        if token in self.eos_ids and not r.params.ignore_eos:
            r.finish_reason = "stop"
            r.output_ids.pop()  # EOS is not part of the answer
        else:
            r.detok.add(r.output_ids)
            if r.detok.stopped:
                r.finish_reason = "stop"
            elif len(r.output_ids) >= r.max_tokens:
                r.finish_reason = "length"
        if r.finish_reason is not None:
            r.t_end = time.perf_counter()

    def _snapshot(self) -> tuple[int, int, int, int]:
        t, st = self.device.traffic, self.store
        return t.h2d_bytes, t.d2h_bytes, st.cache_hits, st.cache_misses

    def _finish(self, r: _Request) -> Output:
        mem = self.store.memory_report()
        lsh_bytes = sum(self.backend.table_bytes(r.seq_id).values())
        self._release([r])
        now = self._snapshot()
        h2d, d2h = (a - b for a, b in zip(now[:2], self._snap_start[:2]))
        h2d_dec, d2h_dec, hits, misses = (a - b for a, b in zip(now, self._snap_decode))
        n = len(r.output_ids)
        decode_s = r.t_end - r.t_first
        stats = RequestStats(
            prompt_tokens=len(r.prompt_ids),
            generated_tokens=n,
            ttft_s=r.t_first - r.t_start,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            device_kv_bytes_peak=mem.device_kv_bytes_peak,
            device_kv_budget=mem.device_kv_budget,
            host_kv_bytes=mem.host_kv_bytes,
            h2d_bytes=h2d,
            d2h_bytes=d2h,
            h2d_bytes_per_token=h2d_dec / max(self._decoded, 1),
            d2h_bytes_per_token=d2h_dec / max(self._decoded, 1),
            cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
            lsh_table_bytes=lsh_bytes,
        )
        return Output(r.detok.text, r.output_ids, r.finish_reason, stats)


def _check_int(name: str, value, least: int) -> None:
    if not _is_index(value) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _is_index(x) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _describe(x) -> str:
    return repr(x) if isinstance(x, str) else f"{type(x).__name__} {str(x)[:40]!r}"


def _prompt_list(prompts) -> list:
    """``generate``'s prompts as a list: one text, one list of token ids, or a list of
    those."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and _is_index(prompts[0]):
            return [prompts]
        return list(prompts)
    raise TypeError(f"prompts must be a string, a list of token ids, or a list of those, got "
                    f"{type(prompts).__name__}")


def _make_backend(name: str, ray_address: str | None) -> CPUBackend:
    """The execution backend for CPU workers, by name (validated in ``LLM.__init__``)."""
    if name == "ray":
        from orchestrator.ray_backend import RayBackend

        return RayBackend(ray_address)
    from orchestrator.local import LocalBackend

    return LocalBackend()


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
