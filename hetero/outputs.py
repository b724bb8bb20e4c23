"""What a request returns, and the incremental detokenizer that finds stop strings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class RequestStats:
    """Figures of one request. Traffic figures cover the whole ``generate`` call (a batch
    shares them); ``*_per_token`` divide the decode phase's traffic by the tokens the batch
    decoded; ``cache_hit_rate`` is the decode phase's page-cache hits over lookups, counted
    in pages of one KV head (exact prefill streams every offloaded page through the cache
    once, which would swamp it). ``policy`` holds the policy's own figures
    (``Policy.stats``, e.g. magicpig's ``lsh_table_bytes``; empty for most)."""

    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    device_kv_bytes_peak: int
    device_kv_budget: int
    host_kv_bytes: int
    h2d_bytes: int
    d2h_bytes: int
    h2d_bytes_per_token: float
    d2h_bytes_per_token: float
    cache_hit_rate: float
    policy: dict = field(default_factory=dict)


@dataclass(slots=True)
class Output:
    """One finished request. ``finish_reason`` is ``"stop"`` (EOS or a stop string) or
    ``"length"`` (``max_new_tokens`` or the context limit)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class LogprobsOutput:
    """``logprobs[i]`` is log p(token_ids[i+1] | token_ids[:i+1]) (natural log)."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def perplexity(self) -> float:
        import math

        return math.exp(-sum(self.logprobs) / len(self.logprobs))


class Detokenizer:
    """Text of the generated tokens so far, cut at the first stop string.

    ``delta()`` returns text that is final: no trailing partial UTF-8 character and no
    trailing prefix of a stop string, so a stream never shows text it later takes back.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_ids: list[int]) -> None:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text

    def delta(self, final: bool = False) -> str:
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for n in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:n]):
                        end -= n
                        break
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return piece
