"""A sequence's KV saved for later: prefill a long document once, then answer many questions
on top of it without recomputing it (``LLM.prefill``, ``LLM.generate(question,
kv_cache=...)``, ``hetero prefill`` / ``hetero generate --kv-cache``).

File format: one safetensors file. Tensors ``k.<layer>`` and ``v.<layer>`` [n, Hkv, D] in
the KV dtype (keys after RoPE, at positions ``0 .. n-1``: what exact policies store) and
``token_ids`` [n] int64; the string metadata entry ``"hetero"`` holds one JSON header::

    {"format": "hetero-kv", "version": 1, "model": ..., "config_hash": ..., "dtype":
     "float32", "page_size": 16, "n_tokens": n, "n_layers": L, "chat": false,
     "keys": "rotated"}

A file is written to a temporary file in the same directory and renamed over the target
(:meth:`KVCache.save`): a reader sees the old file or the whole new one, never a part.

Policy state is not stored; it is rebuilt on load by the same path a prefill takes
(``Engine.load_kv``). ``dense`` and ``streaming`` keep none. ``quest``'s key bounds (a
per-page min/max of the keys) come from ``Policy.on_offload`` as the loaded pages leave for
the host tier: one min/max pass over keys that are copied anyway, cheaper than storing,
reading and checking them. ``magicpig``'s LSH tables are built by ``on_layer_prefilled``
when the question is prefilled on top (its tables then cover the document and the question
once). ``actqkv`` stores its keys before RoPE and keeps state (block representatives, key
bounds, query statistics) that has no export yet: it is refused (:func:`check_policy`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from hetero.config import ModelConfig
from hetero.policies import POLICIES, Policy

FORMAT, VERSION = "hetero-kv", 1
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CHAT_MARK = "\ue000hetero-message\ue000"  # a private-use sentinel no template produces itself


def config_hash(cfg: ModelConfig) -> str:
    """The first 16 hex digits of the sha256 of ``cfg``'s fields (JSON, keys sorted): two
    configs hash alike only if every field is equal."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class KVCache:
    """The KV of ``token_ids`` under one model, per layer ``k[l]``, ``v[l]`` [n, Hkv, D]
    CPU tensors of ``dtype`` (keys after RoPE at positions ``0 .. n-1``).

    ``model`` is the LLM's ``model_name``, ``config_hash`` the :func:`config_hash` of its
    config; ``page_size`` the writer's page size (a record: it loads at any); ``chat``: the
    document was opened as a user turn of the chat template, which a question with
    ``chat=True`` closes."""

    model: str
    config_hash: str
    dtype: torch.dtype
    page_size: int
    token_ids: list[int]
    k: list[Tensor]
    v: list[Tensor]
    chat: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"KVCache: dtype must be one of {', '.join(DTYPE_NAMES.values())}, got {self.dtype}")
        n = len(self.token_ids)
        if not self.k or len(self.k) != len(self.v):
            raise ValueError(f"KVCache: k and v need one tensor per layer, got {len(self.k)} and {len(self.v)}")
        shape = (n, *self.k[0].shape[1:])
        for t in (*self.k, *self.v):
            if t.dim() != 3 or tuple(t.shape) != shape or t.dtype != self.dtype:
                raise ValueError(f"KVCache: every k and v must be [n_tokens={n}, Hkv, D] of {self.dtype}, "
                                 f"got {tuple(t.shape)} of {t.dtype}")

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_layers(self) -> int:
        return len(self.k)

    def header(self) -> dict:
        """The file's JSON header (see the module's docstring)."""
        return {"format": FORMAT, "version": VERSION, "model": self.model, "config_hash": self.config_hash,
                "dtype": DTYPE_NAMES[self.dtype], "page_size": self.page_size, "n_tokens": self.n_tokens,
                "n_layers": self.n_layers, "chat": self.chat, "keys": "rotated"}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the file atomically: into a temporary file beside ``path``, then renamed over
        it. On any error (Ctrl-C included) the temporary file is removed and ``path`` is left
        as it was. Returns ``path``."""
        from safetensors.torch import save_file  # imported on use, as the loader does

        path = Path(path)
        # safetensors writes no views (tensors sharing memory): those are copied
        tensors = {f"{kind}.{layer}": t.clone(memory_format=torch.contiguous_format) if t._base is not None
                   else t.contiguous() for kind, ts in (("k", self.k), ("v", self.v)) for layer, t in enumerate(ts)}
        tensors["token_ids"] = torch.tensor(self.token_ids, dtype=torch.int64)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={"hetero": json.dumps(self.header())})
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> KVCache:
        """Read a file written by :meth:`save`; ``ValueError`` naming ``path`` if it is
        missing, not a hetero KV file, truncated or corrupt."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            what = "a directory" if path.is_dir() else "no such file"
            raise ValueError(f"cannot read KV file {path}: {what}; pass a file written by "
                             f"`hetero prefill --out` or KVCache.save")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = _header(path, f.metadata())
                names = set(f.keys())
                want = {"token_ids", *(f"{kind}.{layer}" for kind in "kv" for layer in range(header["n_layers"]))}
                if names != want:
                    raise ValueError(f"{path}: the tensors do not match the header (missing "
                                     f"{sorted(want - names)[:3]}, unexpected {sorted(names - want)[:3]})")
                ids = f.get_tensor("token_ids").tolist()
                k = [f.get_tensor(f"k.{layer}") for layer in range(header["n_layers"])]
                v = [f.get_tensor(f"v.{layer}") for layer in range(header["n_layers"])]
        except SafetensorError as e:  # a truncated file, bytes that are no safetensors file
            raise ValueError(f"{path} is not a readable KV file ({e}): it is truncated or corrupt, or "
                             f"not a safetensors file; write it again with `hetero prefill --out`") from None
        if len(ids) != header["n_tokens"]:
            raise ValueError(f"{path}: {len(ids)} token ids, the header says {header['n_tokens']}: the "
                             f"file is corrupt; write it again with `hetero prefill --out`")
        dtype = {name: dt for dt, name in DTYPE_NAMES.items()}[header["dtype"]]
        try:
            return cls(header["model"], header["config_hash"], dtype, header["page_size"], ids, k, v,
                       header["chat"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}: the file is corrupt; write it again with `hetero prefill --out`") from None

    def check(self, model_name: str, cfg: ModelConfig, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` unless this KV can be loaded into an LLM of ``model_name``
        with config ``cfg`` and KV ``dtype``: the message names the field that differs, both
        values, and what to do. The tokens' KV is stored without pages: it loads at any
        page size (``page_size`` records the writer's)."""
        have = {"model": (self.model, model_name), "config_hash": (self.config_hash, config_hash(cfg)),
                "dtype": (DTYPE_NAMES[self.dtype], DTYPE_NAMES.get(dtype, str(dtype)))}
        for field, (saved, ours) in have.items():
            if saved != ours:
                fix = ("load it into an LLM of that model" if field in ("model", "config_hash")
                       else f"create the LLM with {field}={saved!r}")
                raise ValueError(f"the KV was saved with {field} {saved!r}, this LLM has {field} {ours!r}: "
                                 f"{fix}, or prefill the document again")
        if len(self.k) != cfg.n_layers or self.k[0].shape[1:] != (cfg.n_kv_heads, cfg.head_dim):
            raise ValueError(f"the KV has {len(self.k)} layers of {tuple(self.k[0].shape[1:])} per token, "
                             f"the model {cfg.n_layers} of {(cfg.n_kv_heads, cfg.head_dim)}: prefill the "
                             f"document again")


def _header(path: Path, metadata: dict | None) -> dict:
    """The JSON header of a KV file, checked."""
    try:
        header = json.loads((metadata or {})["hetero"])
        if header.get("format") != FORMAT:
            raise KeyError("format")
    except (KeyError, TypeError, json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path} is not a hetero KV file (no {FORMAT!r} header): pass a file written by "
                         f"`hetero prefill --out` or KVCache.save") from None
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise ValueError(f"{path} is a {FORMAT} file of version {header.get('version')!r}; this hetero "
                         f"reads version {VERSION}: upgrade hetero, or prefill the document again")
    want = {"model": str, "config_hash": str, "dtype": str, "page_size": int, "n_tokens": int, "n_layers": int,
            "chat": bool, "keys": str}
    bad = [k for k, t in want.items() if not isinstance(header.get(k), t)]
    if bad or header["dtype"] not in DTYPE_NAMES.values() or header["keys"] != "rotated":
        raise ValueError(f"{path}: the {FORMAT} header is corrupt ({', '.join(bad) or 'dtype or keys'}): "
                         f"write it again with `hetero prefill --out`")
    return header


def check_policy(policy: Policy) -> None:
    """Raise ``ValueError`` for a policy whose KV cannot be saved or loaded yet."""
    if policy.bounded_positions:
        ok = ", ".join(name for name, cls in POLICIES.items() if not cls.bounded_positions)
        raise ValueError(f"saving or loading a KV cache is not supported with policy {policy.name!r} yet "
                         f"(it keeps keys before RoPE and per-block state with no export): use one "
                         f"of {ok}")


def chat_parts(tokenizer, model_name: str) -> tuple[str, str]:
    """The chat template's text around one user message: what comes before the message
    (system prompt, the user turn's opening) and after it (the end of the turn and the
    generation prompt). A document saved with ``chat`` is ``before + document``, its
    question ``question + after``; together they are the template applied to ``document +
    question`` as one message, as text. As token ids they are equal unless the tokenizer
    would join the document's last characters and the question's first into one piece
    (see the README: end the document with a newline)."""
    if not tokenizer.chat_template:
        raise ValueError(f"{model_name} has no chat template: call without chat")
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MARK}], add_generation_prompt=True,
                                         tokenize=False)
    if text.count(CHAT_MARK) != 1:
        raise ValueError(f"the chat template of {model_name} does not keep the user's message as it is: "
                         f"a saved KV cannot open a turn with it; call without chat")
    before, _, after = text.partition(CHAT_MARK)
    return before, after
