"""A saved KV (``hetero.kvcache``): the file, and questions answered on top of it exactly as
if the document and the question had been prefilled together."""

import dataclasses
import json

import pytest
import torch

from hetero import LLM, SamplingParams
from hetero.cache import OFFLOADED
from hetero.cli import main
from hetero.kvcache import KVCache, config_hash

TEXT = open("/usr/share/common-licenses/Apache-2.0").read()[:1200]
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
QUEST = dict(n_sink=4, n_local=16, dense_layers=0, token_budget=48, stream_pages=4)
PAGE = 2 * 2 * 8 * 16 * 4  # bytes of one page of the tiny model (K and V, 2 KV heads, D 16, float32)


def _llm(path, policy="dense", budget="8MiB", **kwargs):
    kwargs.setdefault("policy_params", QUEST if policy == "quest" else {})
    return LLM(path, device="cpu", page_size=8, prefill_chunk=32, policy=policy, device_kv_budget=budget,
               **kwargs)


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    return _llm(tiny_model_dir)


@pytest.fixture(scope="module")
def doc_ids(dense):
    return dense.tokenizer(TEXT)["input_ids"][:203]  # not a whole number of pages


@pytest.fixture(scope="module")
def question_ids(dense):
    return dense.tokenizer(" What does the license grant, and to whom?" * 2,
                           add_special_tokens=False)["input_ids"][:40]


def _random_kv(n=13, dtype=torch.float32, **kwargs) -> KVCache:
    g = torch.Generator().manual_seed(0)
    k = [torch.randn(n, 2, 16, generator=g).to(dtype) for _ in range(3)]
    v = [torch.randn(n, 2, 16, generator=g).to(dtype) for _ in range(3)]
    return KVCache("m", "0123456789abcdef", dtype, 8, list(range(n)), k, v, **kwargs)


# -- the file ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_saved_kv_loads_back_equal(tmp_path, dtype):
    kv = _random_kv(dtype=dtype, chat=True)
    path = kv.save(tmp_path / "doc.kv")
    back = KVCache.load(path)
    assert (back.model, back.config_hash, back.dtype, back.page_size, back.token_ids, back.chat) == (
        kv.model, kv.config_hash, kv.dtype, kv.page_size, kv.token_ids, kv.chat)
    assert all(torch.equal(a, b) for a, b in zip(kv.k + kv.v, back.k + back.v))
    assert back.header() == {"format": "hetero-kv", "version": 1, "model": "m",
                             "config_hash": "0123456789abcdef", "dtype": str(dtype).removeprefix("torch."),
                             "page_size": 8, "n_tokens": 13, "n_layers": 3, "chat": True, "keys": "rotated"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.kv"]  # no temporary file left


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_save_leaves_no_file_and_the_old_one_intact(tmp_path, monkeypatch, error):
    import safetensors.torch

    path = _random_kv(n=5).save(tmp_path / "doc.kv")
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata)  # the whole temporary file, then the failure
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(type(error)):
        _random_kv(n=9).save(path)
    with pytest.raises(type(error)):
        _random_kv(n=9).save(tmp_path / "new.kv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.kv"] and path.read_bytes() == before


def test_bad_files_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    good = _random_kv().save(tmp_path / "good.kv")
    truncated = tmp_path / "truncated.kv"
    truncated.write_bytes(good.read_bytes()[:-100])
    noise = tmp_path / "noise.kv"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                    dtype=torch.uint8).numpy().tobytes())
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    newer = tmp_path / "newer.kv"
    save_file({"token_ids": torch.zeros(1, dtype=torch.int64)}, str(newer),
              metadata={"hetero": json.dumps({"format": "hetero-kv", "version": 99})})
    cases = {tmp_path / "missing.kv": "no such file", tmp_path: "a directory",
             truncated: "truncated or corrupt", noise: "truncated or corrupt",
             other: "not a hetero KV file", newer: "version 99"}
    for path, match in cases.items():
        with pytest.raises(ValueError, match=match) as e:
            KVCache.load(path)
        assert str(path) in str(e.value)


def test_config_hash_sees_every_field(dense):
    cfg = dense.config
    assert config_hash(cfg) == config_hash(dataclasses.replace(cfg)) and len(config_hash(cfg)) == 16
    assert config_hash(dataclasses.replace(cfg, rope_theta=cfg.rope_theta * 2)) != config_hash(cfg)


# -- questions on top of a saved KV ----------------------------------------------------------


class _Calls:
    """Tokens the model embeds (every prefill and decode step goes through the embedding),
    and the first-step logits of each request (what ``Engine.prefill`` returns)."""

    def __init__(self, llm, monkeypatch):
        self.tokens, self.logits = 0, []
        llm.model.embed.register_forward_hook(lambda m, args, out: setattr(self, "tokens", self.tokens + args[0].numel()))
        real = llm.engine.prefill

        def prefill(*args, **kwargs):
            out = real(*args, **kwargs)
            self.logits.append(out.clone())
            return out

        monkeypatch.setattr(llm.engine, "prefill", prefill)


@pytest.mark.parametrize("policy, budget, offloads", [
    ("dense", "8MiB", False),  # the KV stays on the device: chunk-major on top
    ("dense", 36 * PAGE, True),  # offloads, and one layer's KV does not fit: streamed prefill
    ("quest", 48 * PAGE, True),  # offloads, a layer at a time
    ("quest", 40 * PAGE, True),  # offloads, streamed
])
def test_a_question_on_a_saved_kv_is_answered_as_if_prefilled_together(
        tiny_model_dir, monkeypatch, doc_ids, question_ids, policy, budget, offloads):
    params = {"stream_pages": 4} if policy == "dense" else QUEST
    llm = _llm(tiny_model_dir, policy, budget, policy_params=params)
    calls = _Calls(llm, monkeypatch)
    (together,) = llm.generate(doc_ids + question_ids, GREEDY)
    kv = llm.prefill(doc_ids)
    assert kv.token_ids == doc_ids and llm.store.allocator.n_used == 0
    calls.tokens = 0
    (saved,) = llm.generate(question_ids, GREEDY, kv_cache=kv)
    assert calls.tokens == len(question_ids) + GREEDY.max_new_tokens - 1  # the document is not recomputed
    assert saved.token_ids == together.token_ids
    torch.testing.assert_close(calls.logits[-1], calls.logits[0], atol=1e-4, rtol=1e-4)
    assert (saved.stats.host_kv_bytes > 0 and saved.stats.d2h_bytes > 0) == offloads
    assert saved.stats.prompt_tokens == len(question_ids)
    assert llm.store.allocator.n_used == 0
    llm.close()


def test_magicpig_builds_its_tables_on_the_loaded_kv(tiny_model_dir, doc_ids, question_ids):
    llm = _llm(tiny_model_dir, "magicpig", policy_params=dict(lsh_k=4, lsh_l=6, n_sink=4, n_local=16,
                                                              dense_layers=0))
    (together,) = llm.generate(doc_ids + question_ids, GREEDY)
    (saved,) = llm.generate(question_ids, GREEDY, kv_cache=llm.prefill(doc_ids))
    assert saved.token_ids == together.token_ids
    assert saved.stats.policy["lsh_table_bytes"] == together.stats.policy["lsh_table_bytes"] > 0
    llm.close()


def test_a_question_on_a_saved_kv_streams_what_generate_returns(dense, doc_ids, tmp_path):
    kv = dense.prefill(doc_ids)
    (out,) = dense.generate("Why?", GREEDY, kv_cache=kv)
    assert "".join(dense.stream("Why?", GREEDY, kv_cache=kv)) == out.text
    path = kv.save(tmp_path / "doc.kv")
    stream = dense.stream("Why?", GREEDY, kv_cache=path)
    next(stream)
    stream.close()  # stopped early: its pages are freed
    assert dense.store.allocator.n_used == 0
    with pytest.raises(ValueError, match="chat=False"):
        next(dense.stream("Why?", GREEDY, chat=True, kv_cache=kv))


def test_a_loaded_kv_leaves_the_store_as_a_prefill_does(tiny_model_dir, doc_ids, question_ids):
    """Page tables, quest's key bounds and the KV itself, after a load and the question on
    top, against the document and the question prefilled together."""
    llm = _llm(tiny_model_dir, "quest")
    store, engine = llm.store, llm.engine
    n = len(doc_ids) + len(question_ids)
    kv = llm.prefill(doc_ids)
    a = llm.scheduler.place(n + 8)[0]
    engine.prefill(a, doc_ids + question_ids)
    b = llm.scheduler.place(n + 8)[0]
    engine.load_kv(b, kv.k, kv.v)
    assert store.tables[b].offloaded == range(1, (len(doc_ids) - 16) // 8)
    engine.prefill(b, question_ids, start=len(doc_ids))
    ta, tb = store.tables[a], store.tables[b]
    assert (ta.n_tokens, ta.settled, ta.offloaded) == (tb.n_tokens, tb.settled, tb.offloaded)
    assert [[p == OFFLOADED for p in pages] for pages in ta.layers] == \
           [[p == OFFLOADED for p in pages] for pages in tb.layers]
    run = ta.offloaded
    assert len(run) > 10
    for layer in range(2):
        for x, y in zip(llm.policy.key_bounds(store, a, layer), llm.policy.key_bounds(store, b, layer)):
            torch.testing.assert_close(x[:, run.start : run.stop], y[:, run.start : run.stop], atol=1e-5, rtol=1e-5)
    for x, y in zip(sum(engine.export_kv(a), []), sum(engine.export_kv(b), [])):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    engine.release(a)
    engine.release(b)
    assert store.allocator.n_used == 0
    llm.close()


def test_a_kv_from_elsewhere_is_refused_naming_the_field(dense, doc_ids, tmp_path):
    kv = dense.prefill(doc_ids[:20])
    cfg = dense.config
    with pytest.raises(ValueError, match="config_hash"):
        kv.check(dense.model_name, dataclasses.replace(cfg, rope_theta=cfg.rope_theta * 2), torch.float32)
    half = {"k": [t.bfloat16() for t in kv.k], "v": [t.bfloat16() for t in kv.v]}
    other = {"model": ("another-model", {}), "dtype": (torch.bfloat16, half)}
    for field, (value, tensors) in other.items():
        changed = dataclasses.replace(kv, **{field: value}, **tensors)
        with pytest.raises(ValueError, match=f"saved with {field} ") as e:
            dense.generate("Why?", GREEDY, kv_cache=changed)
        assert str(value).removeprefix("torch.") in str(e.value)
    with pytest.raises(ValueError, match="chat=False"):
        dense.generate("Why?", GREEDY, chat=True, kv_cache=kv)
    with pytest.raises(TypeError, match="kv_cache must be"):
        dense.generate("Why?", GREEDY, kv_cache=42)
    path = kv.save(tmp_path / "doc.kv")
    (out,) = dense.generate("Why?", GREEDY, kv_cache=str(path))  # a path is loaded
    assert len(out.token_ids) == GREEDY.max_new_tokens
    assert dense.store.allocator.n_used == 0


def test_actqkv_is_refused_clearly(tiny_model_dir, dense, doc_ids):
    kv = dense.prefill(doc_ids[:20])
    llm = _llm(tiny_model_dir, "actqkv", policy_params=dict(n_sink=8, n_local=32, window=16))
    with pytest.raises(ValueError, match="not supported with policy 'actqkv' yet.*dense"):
        llm.prefill(doc_ids[:20])
    with pytest.raises(ValueError, match="not supported with policy 'actqkv' yet"):
        llm.generate("Why?", GREEDY, kv_cache=kv)
    llm.close()


def test_an_over_long_question_is_refused_as_any_prompt(tiny_model_dir, doc_ids):
    llm = _llm(tiny_model_dir, max_model_len=64)
    kv = llm.prefill(doc_ids[:50])
    with pytest.raises(ValueError, match=r"prompt has 70 tokens \(50 of the saved KV's document, 20 of the "
                                         r"question\), the context limit is 64"):
        llm.generate(doc_ids[:20], GREEDY, kv_cache=kv)
    (out,) = llm.generate(doc_ids[:10], SamplingParams(max_new_tokens=20, ignore_eos=True), kv_cache=kv)
    assert len(out.token_ids) == 4 and out.finish_reason == "length"  # the generation stops at the limit
    with pytest.raises(ValueError, match="workers must be"):
        llm.prefill(doc_ids[:50], workers=0)
    llm.close()


def test_chat_splits_the_template_at_the_message(dense):
    document = "The passkey is 71432. Remember it, it matters.\n"
    question = "What is the passkey?"
    kv = dense.prefill(document, chat=True)
    q_ids = dense.scheduler.encode(question, True, "question", kv.n_tokens)
    whole = dense.scheduler.encode(document + question, chat=True)  # what generate(chat=True) prefills
    assert kv.token_ids + q_ids == whole
    assert dense.tokenizer.decode(kv.token_ids).endswith("<|im_start|>user\n" + document)
    assert dense.tokenizer.decode(q_ids) == question + "<|im_end|>\n<|im_start|>assistant\n"
    # where they differ: the tokenizer joins a trailing space to the question's first word
    spaced = dense.scheduler.encode(document.strip() + " ", True, "document")
    assert spaced + dense.scheduler.encode(question, True, "question") != \
           dense.scheduler.encode(document.strip() + " " + question, chat=True)
    (out,) = dense.generate(question, GREEDY, chat=True, kv_cache=kv)
    (ref,) = dense.generate(whole, GREEDY)
    assert out.token_ids == ref.token_ids
    with pytest.raises(ValueError, match="chat=True"):
        dense.generate(question, GREEDY, kv_cache=kv)


def test_a_chain_prefill_gives_the_same_kv(tiny_model_dir, dense, doc_ids, tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))  # the chain's fitted cost model
    one = dense.prefill(doc_ids)
    two = dense.prefill(doc_ids, workers=2)
    assert (two.token_ids, two.model, two.config_hash, two.dtype) == (one.token_ids, one.model, one.config_hash,
                                                                      one.dtype)
    for x, y in zip(one.k + one.v, two.k + two.v):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


# -- the command line ----------------------------------------------------------------------------


def test_cli_prefill_then_questions(tiny_model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT[:600])
    out = tmp_path / "doc.kv"
    common = ["--model", tiny_model_dir, "--device", "cpu", "--page-size", "8"]
    assert main(["prefill", *common, "--prompt-file", str(doc), "--out", str(out)]) == 0
    assert "saved the KV of" in capsys.readouterr().out and out.is_file()
    argv = ["generate", *common, "--kv-cache", str(out), "--prompt", " What is granted?", "--max-new-tokens",
            "5", "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    with LLM(tiny_model_dir, device="cpu", page_size=8) as llm:
        (ref,) = llm.generate(" What is granted?", SamplingParams(max_new_tokens=5), kv_cache=out)
    assert got["token_ids"] == ref.token_ids
    # the KV holds tokens, not pages: it loads at another page size and answers the same
    argv[argv.index("--page-size") + 1] = "16"
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == ref.token_ids


def _fail(*args, **kwargs):
    pytest.fail("the model was loaded before the bad input was caught")


@pytest.mark.parametrize("argv, match", [
    (["generate", "--prompt", "Why?", "--kv-cache", "/no/such.kv"], "cannot read --kv-cache: No such file"),
    (["generate", "--prompt", "Why?", "--kv-cache", "NOISE"], "not a readable KV file"),
    (["prefill", "--prompt", "doc", "--out", "/no/such/dir/doc.kv"], "cannot write --out: No such directory"),
    (["prefill", "--prompt", "doc", "--out", "TMP"], "--out is a directory"),
    (["prefill", "--prompt-file", "/no/such.txt", "--out", "x.kv"], "cannot read --prompt-file"),
    (["prefill", "--prompt", "doc", "--out", "x.kv", "--workers", "0"], "--workers must be >= 1"),
])
def test_cli_bad_paths_fail_before_the_model_loads(monkeypatch, tmp_path, capsys, argv, match):
    monkeypatch.setattr("hetero.cli._make_llm", _fail)
    noise = tmp_path / "noise.kv"
    noise.write_bytes(b"\xff" * 64)
    argv = [{"NOISE": str(noise), "TMP": str(tmp_path)}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("hetero: error:") and match in err, err
