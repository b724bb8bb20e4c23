"""Real text for every workload: Debian's license texts, and passkey prompts built from them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

TEXT_DIR = Path("/usr/share/common-licenses")
NEEDLE_HAY = TEXT_DIR / "GPL-3"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def real_text(exclude: tuple[str, ...] = ()) -> str:
    """The license texts joined (about 150k tokens with a Llama-family tokenizer), but the
    files named in ``exclude``."""
    files = sorted(p for p in TEXT_DIR.iterdir() if p.is_file() and p.name not in exclude)
    if not files:
        raise ValueError(f"no text files under {TEXT_DIR}: the bench needs real English text")
    return "\n\n".join(p.read_text(errors="replace") for p in files)


def real_token_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    """``n`` token ids of real text starting ``offset`` tokens in (repeated as needed)."""
    ids = tokenizer(real_text(), add_special_tokens=False)["input_ids"]
    reps = (offset + n) // len(ids) + 1
    return (ids * reps)[offset : offset + n]


@dataclass(frozen=True, slots=True)
class NeedleCase:
    """A passkey hidden at ``depth`` (0..1) of a haystack; ``context`` ends before the
    question, so compressors that keep the question apart (kvpress) see the same tokens."""

    key: str
    depth: float
    context: str
    question: str = QUESTION


def needle_cases(depths: list[float], n_chars: int = 5500, seed: int = 0,
                 hay: str | None = None) -> list[NeedleCase]:
    """One case per depth, each with its own 5-digit key, hidden in ``hay`` (default: the
    first ``n_chars`` characters of GPL-3, ~1.3k tokens at 5500, where the embedded model
    retrieves the key with full attention)."""
    hay = NEEDLE_HAY.read_text()[:n_chars] if hay is None else hay
    rng = random.Random(seed)
    cases = []
    for depth in depths:
        key = str(rng.randrange(10000, 100000))
        cut = int(len(hay) * depth)
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        cases.append(NeedleCase(key, depth, hay[:cut] + needle + hay[cut:]))
    return cases
