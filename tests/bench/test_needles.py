"""The needle suite: prompts (bench.needles), the runner's plumbing on the tiny model, its
tables, and a fast subset on the embedded model where quest at 10% of the keys must answer
as dense does."""

from __future__ import annotations

import pytest

from bench import needle_suite
from bench.needle_suite import Spec, contenders, measure, tables
from bench.needles import FORMATS, HAYSTACKS, needle_prompt, needle_suite as prompts_of
from bench.results import read_doc, write_doc


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hetero.loader import hf_reference_dir

    return AutoTokenizer.from_pretrained(hf_reference_dir(None))


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_a_prompt_states_its_fact_once_at_its_depth_and_length(tokenizer, haystack):
    for depth in (0.1, 0.5, 0.9):
        p = needle_prompt(tokenizer, "number", haystack, "raw", 1536, depth)
        fact = f" is {p.answer}."
        assert p.document.count(p.answer) == 1 and fact in p.document
        at = p.document.index(p.answer) / len(p.document)
        assert abs(at - depth) < 0.1, (depth, at)
        n = len(tokenizer(p.document + p.question, add_special_tokens=False)["input_ids"])
        assert 1536 - 48 <= n <= 1536, n
        assert p.document.endswith("\n") and p.question.startswith("\n\nQuestion:")
        assert p.hit(f"... IS {p.answer}") and not p.hit("I do not know")


def test_trials_differ_and_repeat(tokenizer):
    a = prompts_of(tokenizer, [512], (0.1, 0.9), ("name",), ("licenses",), FORMATS)
    assert len(a) == 4 and len({p.document for p in a}) == 2  # other text and answer per depth
    assert len({p.document for p in a if p.depth == 0.1}) == 1  # the same for both ways of asking
    assert {p.format for p in a} == set(FORMATS)
    assert a == prompts_of(tokenizer, [512], (0.1, 0.9), ("name",), ("licenses",), FORMATS)  # seeded
    chat = next(p for p in a if p.format == "chat")
    assert chat.question.endswith("Answer in a full sentence.")


def test_bad_prompts_are_refused(tokenizer):
    with pytest.raises(ValueError, match="format must be one of"):
        needle_prompt(tokenizer, "number", "code", "markdown", 512, 0.5)
    with pytest.raises(ValueError, match="fewer than a"):
        needle_prompt(tokenizer, "number", "code", "raw", 10**7, 0.5)


def test_contenders_cover_every_policy_at_every_fraction():
    spec = Spec(fractions=(0.1, 0.2))
    cs = contenders(spec, 1536)
    names = [(c.name, c.fraction) for c in cs]
    assert names[0] == ("dense", None)
    for f in (0.1, 0.2):
        assert {("quest", f), ("streaming", f), ("oracle-topk", f), ("magicpig", f), ("actqkv", f)} <= set(names)
    assert ("quest-p16", 0.1) in names and ("quest-p16", 0.2) not in names
    assert all(c.params["token_budget"] == int(c.fraction * 1536) for c in cs if c.policy == "quest")
    assert next(c for c in cs if c.name == "quest-p16").page_size == 16
    assert next(c for c in cs if c.name == "oracle-topk").topk == 153
    assert [(c.name, c.fraction) for c in contenders(needle_suite.PAST, 16384, past=True)] == [("actqkv", 0.1)]
    long = [(c.name, c.fraction) for c in contenders(spec, 8192)]
    assert ("actqkv", 0.1) not in long  # it prefills every prompt itself: short ones only
    assert ("quest-p16", 0.1) not in long  # 819 tokens: quest's own pages are 16 tokens


@pytest.mark.parametrize("fraction, n, kl", [(0.1, 1536, (8, 65)), (0.2, 1536, (7, 75)), (0.3, 1536, (7, 110)),
                                             (0.1, 8192, (8, 85)), (0.3, 8192, (7, 120))])
def test_magicpig_samples_what_its_window_leaves_of_the_fraction(fraction, n, kl):
    p = needle_suite.magicpig_params(fraction, n, dense_layers=2)
    assert (p["lsh_k"], p["lsh_l"]) == kl and p["n_sink"] + p["n_local"] == 68 and p["dense_layers"] == 2


def test_actqkv_reads_its_fraction_in_blocks():
    p = needle_suite.actqkv_params(0.1, 1536)
    assert p["top_blocks"] == p["min_blocks"] == 5 and p["n_sink"] + p["n_local"] + 16 * 5 == 160
    assert needle_suite.actqkv_params(0.01, 1536)["top_blocks"] == 1


def _row(system, fraction, hits, template="number", haystack="code", context=1536):
    return {"system": system, "fraction": fraction, "template": template, "haystack": haystack, "format": "raw",
            "context": context, "hits": hits, "trials": 5}


def test_tables_count_the_cells_dense_answers_and_check_the_target():
    rows = [_row("dense", None, 5), _row("quest", 0.1, 4), _row("streaming", 0.1, 1), _row("quest", 0.2, 5),
            _row("dense", None, 5, template="name"), _row("quest", 0.1, 2, template="name"),
            _row("streaming", 0.1, 3, template="name"), _row("quest", 0.2, 5, template="name"),
            _row("dense", None, 3, template="fact"), _row("quest", 0.1, 0, template="fact")]
    t = tables(rows, counted=4)
    assert len(t["counted_cells"]) == 2 and len(t["all_cells"]) == 3  # fact: dense 3/5 does not count
    acc = {(a["system"], a["fraction"], a["group"]): (a["hits"], a["trials"]) for a in t["accuracy"]}
    assert acc["quest", 0.1, "all"] == (6, 10) and acc["quest", 0.1, "template=number"] == (4, 5)
    assert acc["quest", 0.2, "haystack=code"] == (10, 10) and ("quest", 0.1, "template=fact") not in acc
    met = {tuple(b["cell"])[0]: (b["best"], b["met"]) for b in t["target"]}
    assert met == {"number": ("quest", True), "name": ("streaming", False)}
    md = needle_suite.markdown({"tables": t})
    assert "| quest | 10% | 6/10 |" in md and "1 of 2 counted cells" in md and "missed" in md
    # past the trained context: no dense, the cell counts for accuracy, not for the target
    t = tables(rows + [_row("actqkv", 0.1, 4, context=16384)], counted=4)
    assert t["past_cells"] == [["number", "code", "raw", 16384]] and len(t["target"]) == 2
    acc = {(a["system"], a["fraction"], a["group"]): (a["hits"], a["trials"]) for a in t["accuracy"]}
    assert acc["actqkv", 0.1, "length=16384"] == (4, 5)
    assert "past the trained context (no dense): 1" in needle_suite.markdown({"tables": t})


def test_the_suite_runs_every_contender_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The runner's plumbing: one row per contender and cell with its trials, the texts,
    keys touched where a policy counts them (magicpig), a valid result document."""
    spec = Spec(cells={256: (("number",), ("licenses",), ("raw",))}, depths=(0.2, 0.8), fractions=(0.25,),
                policies=("quest", "streaming", "magicpig"), dense_layers=1, counted=0)
    doc = measure(spec, progress=False, model=tiny_model_dir)
    assert read_doc(write_doc(doc, tmp_path))["workload"] == "needles"
    systems = {(r["system"], r["fraction"]) for r in doc["rows"]}
    assert systems == {("dense", None), ("oracle-topk", 0.25), ("quest", 0.25), ("quest-p16", 0.25),
                       ("streaming", 0.25), ("magicpig", 0.25)}
    for r in doc["rows"]:
        assert r["trials"] == 2 and len(r["texts"]) == 2 and 0 <= r["hits"] <= 2
        assert (0 < r["keys_touched"] <= 1) if r["system"] == "magicpig" else r["keys_touched"] is None
    assert doc["tables"]["counted_cells"] == [["number", "licenses", "raw", 256]]


def test_past_the_trained_context_only_actqkv_runs(tiny_model_dir):
    """768 tokens on a model trained to 512: no dense reference, no shared prefill; actqkv's
    cell counts past the trained context."""
    spec = Spec(cells={768: (("number",), ("licenses",), ("raw",))}, depths=(0.5,), fractions=(0.5,),
                policies=("actqkv", "quest"), actqkv_max_length=768, counted=0)
    doc = measure(spec, progress=False, model=tiny_model_dir)
    assert [(r["system"], r["trials"]) for r in doc["rows"]] == [("actqkv", 1)]
    assert doc["seconds"]["768"]["prefill"] == 0  # no reference prefill
    assert doc["tables"]["past_cells"] == [["number", "licenses", "raw", 768]] and doc["tables"]["target"] == []


def test_quest_at_a_tenth_of_the_keys_answers_as_dense_on_the_embedded_model():
    """The fast subset: three needles at 1.5k tokens (a number in source code, asked in a
    chat turn) that quest on 16-token pages got wrong at 10% of the keys (153 tokens) in the
    full run ("57514" answered as "50000", "575", "6"): dense, oracle top-k and quest (on
    8-token pages) answer every one."""
    spec = Spec(cells={1536: (("number",), ("code",), ("chat",))}, depths=(0.3, 0.5, 0.7), fractions=(0.1,),
                policies=("quest",), counted=3)
    doc = measure(spec, progress=False)
    hits = {r["system"]: r["hits"] for r in doc["rows"]}
    assert hits["dense"] == hits["oracle-topk"] == hits["quest"] == 3, hits
    assert doc["tables"]["target"] == [{"cell": ["number", "code", "chat", 1536], "dense": 3, "best": "quest",
                                        "best_hits": 3, "met": True}]


def test_needles_is_a_bench_command(monkeypatch, tmp_path, capsys):
    from hetero.cli import main

    seen = {}
    monkeypatch.setattr(needle_suite, "run", lambda spec, out, progress, quick: seen.update(
        spec=spec, out=out, quick=quick) or out / "needles.json")
    assert main(["bench", "needles", "--quick", "--out", str(tmp_path)]) == 0
    assert seen["spec"] == needle_suite.QUICK and seen["quick"] and seen["out"] == tmp_path
    assert main(["bench", "needles", "--contexts", "8192", "--out", str(tmp_path)]) == 0
    assert list(seen["spec"].cells) == [8192] and not seen["quick"]
    assert main(["bench", "needles", "--contexts", "1000", "--out", str(tmp_path)]) == 2
    assert "the needle suite runs at [1536, 8192]" in capsys.readouterr().err
    assert main(["bench", "needles", "--past", "--out", str(tmp_path)]) == 0
    assert seen["spec"] == needle_suite.PAST and list(seen["spec"].cells) == [16384]
