"""The scheduler: admits requests into the KV store and runs them to the end.

Admission (:meth:`Scheduler.admit`, :meth:`Scheduler.place`) checks and tokenises every
prompt, then reserves device pages for each under the budget: a sequence that keeps its KV
on the device takes all its pages now, one that offloads is promised its steady pages plus
the batch's largest prefill peak, with one layer's whole KV or, when that does not fit, the
layer's KV streamed. The loop (:meth:`Scheduler.run`) prefills each request, then decodes
the live ones together, one token each per step. A request's pages are released on every
exit (:meth:`Scheduler.release`); :meth:`Scheduler.finish` turns it into an ``Output`` with
its statistics.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hetero.cache import OutOfPages
from hetero.config import is_integer
from hetero.device import format_size
from hetero.engine import Engine
from hetero.kvcache import KVCache, chat_parts, check_policy, config_hash
from hetero.outputs import Detokenizer, LogprobsOutput, Output, RequestStats
from hetero.sampling import SamplingParams, make_generator, sample

logger = logging.getLogger(__name__)


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
    kv: KVCache | None = None  # a saved KV the prompt continues (the prompt: its question)


class Scheduler:
    """Requests of one model over one engine: admission, the prefill-then-decode loop, and
    per-request statistics.

    Parameters
    ----------
    engine : the engine, with its store and policy.
    tokenizer : the model's HF tokenizer.
    max_model_len : longest prompt + generation, in tokens.
    model_name : named in errors.
    """

    def __init__(self, engine: Engine, tokenizer, max_model_len: int, model_name: str):
        self.engine, self.tokenizer = engine, tokenizer
        self.store, self.policy = engine.store, engine.policy
        self.config, self.max_model_len, self.model_name = engine.store.cfg, max_model_len, model_name
        self.eos_ids = set(self.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.closed = False
        self._ids = itertools.count()
        self._snap_start = self._snap_decode = self._snapshot()
        self._decoded = 0

    # -- requests ------------------------------------------------------------------------

    def generate(self, prompts, params: SamplingParams | None, chat: bool, progress: bool,
                 kv: KVCache | None = None) -> list[Output]:
        """One ``Output`` per prompt of a batch decoded together (``LLM.generate``); with
        ``kv``, each prompt is a question prefilled on top of a copy of that saved KV."""
        reqs = self.admit(_prompt_list(prompts), params, chat, kv)
        try:
            for _ in self.run(reqs, progress):
                pass
            return [self.finish(r) for r in reqs]
        finally:  # on any exit: an error, Ctrl-C
            self.release(reqs)

    def stream(self, prompt: str, params: SamplingParams | None, chat: bool,
               kv: KVCache | None = None) -> Iterator[str]:
        """The text of one prompt's generation piece by piece (``LLM.stream``); admitted at
        the first ``next``, released when it ends, fails, or is closed or dropped."""
        (req,) = self.admit([prompt], params, chat, kv)
        try:
            for _ in self.run([req], progress=False):
                if piece := req.detok.delta():
                    yield piece
            if piece := req.detok.delta(final=True):
                yield piece
        finally:  # also on GeneratorExit: close() or garbage collection
            self.release([req])

    def prefill(self, prompt, chat: bool, progress: bool) -> KVCache:
        """The KV of a document prefilled in this process (``LLM.prefill``); with ``chat``
        the document opens a user turn of the chat template (:func:`chat_parts`)."""
        self._check_open()
        check_policy(self.policy)
        ids = self.encode(prompt, chat, part="document")
        seq, _, _ = self.place(len(ids))
        bar = _progress_bar(len(ids)) if progress else None
        try:
            self.engine.prefill(seq, ids, progress=bar and bar.update)
            k, v = self.engine.export_kv(seq)
        finally:  # on any exit: an error, Ctrl-C
            self.engine.release(seq)
            if bar is not None:
                bar.close()
        return KVCache(self.model_name, config_hash(self.config), self.store.dtype, self.store.page_size,
                       ids, k, v, chat)

    def logprobs(self, text: str) -> LogprobsOutput:
        """Per-token log-probabilities of ``text`` (``LLM.logprobs``)."""
        self._check_open()
        ids = self.encode(text, chat=False)
        if len(ids) < 2:
            raise ValueError("logprobs needs a text of at least two tokens")
        seq, _, _ = self.place(len(ids))
        try:
            logprobs = self.engine.prefill(seq, ids, score=True)
        finally:
            self.engine.release(seq)
        return LogprobsOutput(ids, logprobs.tolist())

    def decode_logprobs(self, context, continuation: list[int]) -> list[float]:
        """Teacher forcing through the decode path (``LLM.decode_logprobs``): prefill
        ``context``, then decode step ``i`` is fed ``continuation[i]`` and scores
        ``continuation[i + 1]``."""
        self._check_open()
        ids = self.encode(context, chat=False)
        if (not isinstance(continuation, (list, tuple)) or len(continuation) < 2
                or not all(is_integer(t) for t in continuation)):
            raise ValueError(f"continuation must be a list of at least two token ids, got "
                             f"{_describe(continuation)}")
        cont = [int(t) for t in continuation]
        if not all(0 <= t < self.config.vocab_size for t in cont):
            raise ValueError(f"continuation token ids must be in [0, {self.config.vocab_size})")
        n = len(ids) + len(cont) - 1  # the last continuation token is scored, never fed
        if n > self.max_model_len:
            raise ValueError(f"context and continuation hold {n} tokens, the context limit is "
                             f"{self.max_model_len}: shorten them or pass a larger max_model_len")
        seq, _, _ = self.place(n)
        try:
            self.engine.prefill(seq, ids)
            scores = []
            for token, target in zip(cont, cont[1:]):
                logits = self.engine.decode([seq], [token])
                scores.append(torch.log_softmax(logits[0].float(), dim=-1)[target])
            return torch.stack(scores).tolist()  # one read back, after the last step
        finally:  # on any exit: an error, Ctrl-C
            self.engine.release(seq)

    def close(self) -> None:
        """Free every sequence; later requests are refused."""
        self.closed = True
        for seq in list(self.store.tables):
            self.engine.release(seq)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("this LLM is closed: create a new one")

    # -- admission -----------------------------------------------------------------------

    def encode(self, prompt: str | list[int], chat: bool, part: str = "prompt", context: int = 0) -> list[int]:
        """Token ids of a prompt (text, or token ids used as they are), checked against the
        vocabulary and the context limit.

        ``part``: ``"prompt"``, a whole prompt; ``"document"``, a document to save the KV of
        (with ``chat``, the chat template's text before the user's message, then the
        document: the turn stays open); ``"question"``, tokens on top of a saved document of
        ``context`` tokens (no BOS; with ``chat``, the question closes the turn: the end of
        the user's message and the generation prompt)."""
        if isinstance(prompt, (list, tuple)) and prompt and all(is_integer(t) for t in prompt):
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
            if chat and part != "prompt":
                before, after = chat_parts(self.tokenizer, self.model_name)
                text = before + prompt if part == "document" else prompt + after
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            elif chat:
                if not self.tokenizer.chat_template:
                    raise ValueError(f"{self.model_name} has no chat template: call without chat")
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
                )
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(prompt, add_special_tokens=part != "question")["input_ids"]
        if context + len(ids) >= self.max_model_len:
            parts = f" ({context} of the saved KV's document, {len(ids)} of the question)" if context else ""
            raise ValueError(
                f"prompt has {context + len(ids)} tokens{parts}, the context limit is "
                f"{self.max_model_len}{self._past_trained()}: shorten it or pass a larger max_model_len"
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
                    f"{start + piece} of {len(text)}), the context limit is "
                    f"{self.max_model_len}{self._past_trained()}: shorten it or pass a larger max_model_len"
                )

    def _past_trained(self) -> str:
        """What a context limit at the trained context means, for an error message."""
        if self.policy.bounded_positions or self.max_model_len != self.config.max_position_embeddings:
            return ""
        return (f" (the positions {self.model_name} was trained on; policy {self.policy.name!r} cannot "
                f"read past them: use policy='actqkv', which can)")

    def admit(self, prompts: list, params: SamplingParams | None, chat: bool,
              kv: KVCache | None = None) -> list[_Request]:
        """Check and tokenise every prompt, then reserve KV for each: everything about a
        request is checked before a page is taken, and on any failure the pages taken so far
        are freed. With ``kv``, a prompt is a question on top of that saved KV: its sequence
        holds the document's tokens, the question's and the generation's."""
        self._check_open()
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(chat, bool):
            raise TypeError(f"chat must be True or False, got {chat!r}")
        if not prompts:
            raise ValueError("no prompts given")
        if kv is not None:
            self.check_kv(kv, chat)
        start = 0 if kv is None else kv.n_tokens
        encoded = [self.encode(p, chat, "prompt" if kv is None else "question", start) for p in prompts]
        generators = [make_generator(params, self.store.device.device) for _ in encoded]
        self.store.allocator.peak_used = self.store.allocator.n_used
        self._snap_start = self._snapshot()
        # a batch whose offloading prompts cannot each hold a layer's whole KV while they
        # are prefilled streams their layers' KV instead
        for whole_layers in (True, False):
            reqs, committed, transient = [], 0, 0
            try:
                for ids, generator in zip(encoded, generators):
                    cap = min(params.max_new_tokens, self.max_model_len - start - len(ids))
                    seq, need, extra = self.place(start + len(ids) + cap, committed, transient,
                                                  len(reqs) + 1, whole_layers)
                    reqs.append(_Request(seq, ids, params, cap, Detokenizer(self.tokenizer, params.stop),
                                         generator, time.perf_counter(), [], kv=kv))
                    committed, transient = committed + need, max(transient, extra)
                return reqs
            except BaseException as e:
                self.release(reqs)
                if not (whole_layers and isinstance(e, OutOfPages) and len(encoded) > 1):
                    raise

    def check_kv(self, kv: KVCache, chat: bool) -> None:
        """Raise ``ValueError`` unless ``kv`` can be loaded here and continued with
        ``chat``."""
        if not isinstance(kv, KVCache):
            raise TypeError(f"kv_cache must be a KVCache or the path of a KV file, got {type(kv).__name__}")
        check_policy(self.policy)
        kv.check(self.model_name, self.config, self.store.dtype)
        if kv.chat != chat:
            how = "opens a user turn (prefilled with chat=True)" if kv.chat else "was prefilled without chat"
            raise ValueError(f"the saved KV {how}: generate with chat={kv.chat}, or prefill the document "
                             f"again with chat={chat}")

    def release(self, reqs: list[_Request]) -> None:
        """Free the pages (and the policy's state) of every request still holding them: the
        one release path, run on every exit."""
        for r in reqs:
            if r.seq_id in self.store.tables:
                self.engine.release(r.seq_id)

    def place(self, n: int, committed: int = 0, transient: int = 0, n_seqs: int = 1,
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
        store.admit(seq, n, offload, policy.dense_layers, stream_prefill=stream,  # dense layers' pages
                    sink_pages=policy.sink_pages(ps))
        policy.on_admit(store, seq)
        if offload:  # its other pages are taken as it runs: keep them promised
            return seq, need - (free - store.allocator.n_free), extra
        store.reserve(seq, n)  # taken now: n_free already counts them
        return seq, 0, 0

    # -- the loop ------------------------------------------------------------------------

    def run(self, reqs: list[_Request], progress: bool) -> Iterator[None]:
        """Prefill every request, then decode the live ones together; yields per token."""
        bar = _progress_bar(sum(len(r.prompt_ids) for r in reqs)) if progress else None
        try:
            for r in reqs:
                start = 0
                if r.kv is not None:  # the document's KV as its prefill would leave it
                    self.engine.load_kv(r.seq_id, r.kv.k, r.kv.v)
                    start = r.kv.n_tokens
                logits = self.engine.prefill(r.seq_id, r.prompt_ids, progress=bar and bar.update, start=start)
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
        finally:  # the caller frees the requests' pages (Scheduler.release)
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

    # -- statistics ----------------------------------------------------------------------

    def _snapshot(self) -> tuple[int, int, int, int]:
        t, st = self.store.device.traffic, self.store
        return t.h2d_bytes, t.d2h_bytes, st.hits.value, st.misses.value

    def finish(self, r: _Request) -> Output:
        """Release a finished request and return its output and statistics."""
        mem = self.store.memory_report()
        policy_stats = self.policy.stats(r.seq_id)
        self.release([r])
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
            policy=policy_stats,
        )
        return Output(r.detok.text, r.output_ids, r.finish_reason, stats)


def _progress_bar(total: int):
    """A progress bar of prompt tokens, on stderr."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prefill", unit="tok")


def _describe(x) -> str:
    return repr(x) if isinstance(x, str) else f"{type(x).__name__} {str(x)[:40]!r}"


def _prompt_list(prompts) -> list:
    """``generate``'s prompts as a list: one text, one list of token ids, or a list of
    those."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and is_integer(prompts[0]):
            return [prompts]
        return list(prompts)
    raise TypeError(f"prompts must be a string, a list of token ids, or a list of those, got "
                    f"{type(prompts).__name__}")
