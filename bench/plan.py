"""What a bench run measures: the full plan and the ``--quick`` one."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

PRESSES = ("streaming_llm", "snapkv", "knorm", "expected_attention")


@dataclass(frozen=True, slots=True)
class Plan:
    """Lengths, repeats and budgets of every workload.

    ``token_budget`` is the decode KV budget (tokens per sparse layer) of the sparse systems
    in the speed workloads; ``fractions`` are the budgets of the fidelity workload as shares
    of the context in the sparse layers (hetero keeps ``dense_layers`` layers exact, and
    kvpress gets the same total share of the KV).
    """

    decode_contexts: tuple[int, ...] = (1024, 4096, 8192, 16384, 32768)
    n_decode: int = 32
    repeats: int = 3
    long_repeats: int = 1  # repeats beyond the trained context and of batches > 1
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    batch_context: int = 8192
    prefill_contexts: tuple[int, ...] = (1024, 4096, 8192, 16384)
    memory_contexts: tuple[int, ...] = (1024, 4096, 8192, 16384, 32768)
    token_budget: int = 1024
    dense_layers: int = 2
    needle_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    fractions: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5)
    error_contexts: tuple[int, ...] = (4096, 8192, 16384)
    error_steps: int = 8
    ppl_contexts: tuple[int, ...] = (4096, 8192, 16384)
    kernel_contexts: tuple[int, ...] = (16384, 32768)
    ppl_tokens: int = 64
    speed_presses: tuple[str, ...] = PRESSES
    fidelity_presses: tuple[str, ...] = PRESSES
    hf_prefill_chunk: int | None = None  # None: one forward over the prompt, as users call it
    prefill_chunk: int = 1024
    dtype: str = "float32"
    worker_timeout_s: int = 3600

    def __post_init__(self):
        for name in ("decode_contexts", "prefill_contexts", "memory_contexts", "batch_sizes"):
            if not all(isinstance(n, int) and n > 0 for n in getattr(self, name)):
                raise ValueError(f"{name} must be positive integers")
        if not all(0 < f <= 1 for f in self.fractions):
            raise ValueError("fractions must be in (0, 1]")
        for press in (*self.speed_presses, *self.fidelity_presses):
            if press not in PRESSES:
                raise ValueError(f"unknown kvpress press {press!r}; known: {', '.join(PRESSES)}")

    def repeats_at(self, context: int, trained: int, batch: int = 1) -> int:
        """Repeats of a speed point: ``long_repeats`` beyond the trained context and for
        batches, where one prefill costs minutes."""
        long = context > trained or batch > 1
        return min(self.repeats, self.long_repeats) if long else self.repeats

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Plan()

QUICK = replace(
    FULL,
    decode_contexts=(1024, 2048), n_decode=8, repeats=1, batch_sizes=(1, 4),
    batch_context=1024, prefill_contexts=(1024, 2048), memory_contexts=(1024, 2048),
    needle_depths=(0.5,), fractions=(0.1, 0.25), error_contexts=(2048,), error_steps=4,
    ppl_contexts=(2048,), ppl_tokens=16, kernel_contexts=(2048,), speed_presses=("snapkv",), worker_timeout_s=600,
)
