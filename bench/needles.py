"""Needle prompts that vary what a policy sees: several needle templates (a number, a
name, a short fact; each stated once), several haystacks found on every machine (license
texts, the documentation strings of Python standard-library modules, their source code),
depths, lengths, and two ways of asking (a chat turn, a raw continuation).

A prompt is a document (haystack with the needle) and a question, kept apart so that the
document's KV can be prefilled once and shared by every policy that can load a saved KV.
"""

from __future__ import annotations

import importlib
import inspect
import random
import warnings
from dataclasses import dataclass
from functools import cache

from bench.corpus import NEEDLE_HAY, real_text

DOC_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "os", "pathlib", "re",
               "shutil", "string", "subprocess", "textwrap", "threading", "typing", "unittest", "datetime")
CODE_MODULES = ("textwrap", "argparse", "json.decoder", "functools", "dataclasses", "shlex", "fractions", "calendar")
FORMATS = ("chat", "raw")


@dataclass(frozen=True, slots=True)
class Template:
    """A needle: ``fact`` is stated once in the document and ``question`` asks it; ``{slot}``
    picks from ``slots`` and ``{answer}`` from ``answers`` (one per trial, seeded)."""

    fact: str
    question: str
    slots: tuple[str, ...]
    answers: tuple[str, ...]


TEMPLATES = {
    "number": Template(
        "The access code for the {slot} is {answer}.",
        "What is the access code for the {slot}?",
        ("north gate", "archive room", "boat house", "old mill", "server vault"),
        tuple(str(n) for n in range(10000, 100000, 7919))),
    "name": Template(
        "The head gardener of the {slot} estate is called {answer}.",
        "What is the head gardener of the {slot} estate called?",
        ("Ashford", "Bellmont", "Carraway", "Danforth", "Elmsworth"),
        ("Rosalind", "Bartholomew", "Ingrid", "Leopold", "Matilda", "Cornelius", "Philippa", "Ezekiel",
         "Wilhelmina", "Thaddeus")),
    "fact": Template(
        "The meeting with the {slot} was moved to {answer}.",
        "Where was the meeting with the {slot} moved to?",
        ("architects", "auditors", "beekeepers", "surveyors", "translators"),
        ("Lisbon", "Helsinki", "Montevideo", "Nairobi", "Osaka", "Reykjavik", "Tbilisi", "Valparaiso")),
}


def _licenses() -> str:
    return real_text(exclude=(NEEDLE_HAY.name,))  # the passkey's haystack stays held out


def _docstrings() -> str:
    parts = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            with warnings.catch_warnings():  # typing.re and the like warn when read
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = getattr(module, attr)
                doc = inspect.getdoc(obj)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if doc and (inspect.isfunction(obj) or inspect.isclass(obj)):
                parts.append(f"{name}.{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


def _code() -> str:
    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in CODE_MODULES)


HAYSTACKS = {"licenses": _licenses, "docstrings": _docstrings, "code": _code}


@dataclass(frozen=True, slots=True)
class NeedlePrompt:
    """One trial: ``document`` (haystack with the needle at ``depth``) then ``question``;
    the generation holds ``answer`` when the model retrieved it. ``length`` is the target
    prompt length in tokens."""

    template: str
    haystack: str
    format: str
    length: int
    depth: float
    answer: str
    document: str
    question: str

    @property
    def cell(self) -> tuple[str, str, str, int]:
        return self.template, self.haystack, self.format, self.length

    def hit(self, text: str) -> bool:
        return self.answer.lower() in text.lower()


@cache
def _hay_ids(tokenizer, haystack: str) -> tuple[int, ...]:
    return tuple(tokenizer(HAYSTACKS[haystack](), add_special_tokens=False)["input_ids"])


def _line_break(text: str, at: int) -> int:
    """The position after the first line break at or after ``at`` (``at`` if none)."""
    i = text.find("\n", at)
    return at if i < 0 else i + 1


def needle_prompt(tokenizer, template: str, haystack: str, fmt: str, length: int, depth: float,
                  seed: int = 0) -> NeedlePrompt:
    """A prompt of about ``length`` tokens: the haystack's text (from an offset that depends
    on the seed and the depth, so trials read different text) with the template's fact on
    its own line at ``depth``, asked as ``fmt`` ("chat": a question closing the user turn;
    "raw": a question and "Answer" to continue)."""
    if fmt not in FORMATS:
        raise ValueError(f"needle format must be one of {FORMATS}, got {fmt!r}")
    t = TEMPLATES[template]
    rng = random.Random(f"{template}/{haystack}/{length}/{depth}/{seed}")
    slot, answer = rng.choice(t.slots), rng.choice(t.answers)
    fact = t.fact.format(slot=slot, answer=answer)
    question = t.question.format(slot=slot)
    # both ways the answer comes out of decode steps, through the policy: the first generated
    # token is the exact prefill's, and the answer a sentence later
    question = (f"\n\n{question} Answer in a full sentence." if fmt == "chat"
                else f"\n\nQuestion: {question}\nAnswer: The")
    ids = _hay_ids(tokenizer, haystack)
    n_hay = length - len(tokenizer(fact + question, add_special_tokens=False)["input_ids"]) - 8
    if n_hay > len(ids):
        raise ValueError(f"haystack {haystack!r} holds {len(ids)} tokens, fewer than a {length}-token prompt needs")
    start = rng.randrange(0, len(ids) - n_hay + 1)
    hay = tokenizer.decode(ids[start : start + n_hay])
    cut = _line_break(hay, int(len(hay) * depth))
    document = f"{hay[:cut]}\n{fact}\n{hay[cut:]}".rstrip() + "\n"
    return NeedlePrompt(template, haystack, fmt, length, depth, answer, document, question)


def needle_suite(tokenizer, lengths, depths, templates=tuple(TEMPLATES), haystacks=tuple(HAYSTACKS),
                 formats=FORMATS, seed: int = 0) -> list[NeedlePrompt]:
    """Every (template, haystack, format, length) cell, one prompt per depth."""
    return [needle_prompt(tokenizer, t, h, f, n, d, seed)
            for n in lengths for t in templates for h in haystacks for f in formats for d in depths]
