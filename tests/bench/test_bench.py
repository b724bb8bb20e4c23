"""The bench plumbing: arguments, plans, result schema, peers' state, worker protocol,
report and plots from a small recorded result. No timings, no peers needed."""

import copy
import io
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench import peers
from bench.cli import plan_from_args, write_report
from bench.plan import FULL, QUICK
from bench.results import SCHEMA, machine, read_doc, summary, validate, write_doc
from bench.systems import (HF, LLAMACPP, device_kv_budget, hetero, hetero_sparse, kv_share,
                           kvpress, speed_job)
from hetero.config import ModelConfig
from hetero.cli import _parser, main

FIXTURE = Path(__file__).parent / "fixtures" / "quick"
WORKLOADS = ("decode", "prefill", "fidelity", "memory", "kernels")


@pytest.fixture
def recorded(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    return out


def _bench_args(*argv):
    return _parser().parse_args(["bench", *argv])


# -- arguments and plans --------------------------------------------------------------------


def test_bench_arguments_parse():
    args = _bench_args("all", "--quick", "--out", "x", "--peers", "kvpress", "--no-setup")
    assert (args.command, args.what, args.quick, args.out, args.peers, args.no_setup) == (
        "bench", "all", True, Path("x"), ["kvpress"], True)
    assert _bench_args("decode").peers == ["kvpress", "llamacpp"]
    assert _bench_args("fidelity", "--peers").peers == []


@pytest.mark.parametrize("argv", [["bench"], ["bench", "speed"], ["bench", "all", "--peers", "vllm"]])
def test_bad_bench_arguments_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2


def test_plans():
    assert plan_from_args(_bench_args("all", "--quick")) is QUICK
    assert plan_from_args(_bench_args("all")) is FULL
    assert FULL.decode_contexts == (1024, 4096, 8192, 16384, 32768)
    assert FULL.batch_sizes == (1, 4, 8) and FULL.batch_context == 8192
    assert max(QUICK.decode_contexts) <= 4096 and QUICK.repeats == 1
    plan = plan_from_args(_bench_args("decode", "--contexts", "512", "2048", "--repeats", "2"))
    assert plan.decode_contexts == plan.memory_contexts == (512, 2048)
    assert plan.batch_context == 2048 and plan.repeats == 2
    assert FULL.repeats_at(4096, 8192) == 3
    assert FULL.repeats_at(16384, 8192) == FULL.repeats_at(8192, 8192, batch=8) == 1


@pytest.mark.parametrize("argv, match", [
    (["--contexts", "8"], "--contexts"), (["--repeats", "0"], "--repeats")])
def test_bad_overrides_are_one_line_errors(argv, match, capsys, tmp_path):
    code = main(["bench", "decode", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("hetero: error:") and match in err[-1]


# -- systems and jobs -----------------------------------------------------------------------


def test_kv_share_counts_dense_layers_whole():
    assert kv_share(0.1, 2, 30) == pytest.approx((2 + 28 * 0.1) / 30)
    assert kv_share(1.5, 2, 30) == 1.0 and kv_share(0.0, 0, 30) == 0.0


SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, n_layers=30,
                      n_heads=9, n_kv_heads=3, head_dim=64)


def test_device_budgets_fit_the_run():
    full_kv = SMOLLM2.kv_bytes_per_token(4) * 32768
    dense = device_kv_budget(hetero("dense"), FULL, SMOLLM2, 32768)
    quest = device_kv_budget(hetero_sparse("quest", 1024, 2), FULL, SMOLLM2, 32768)
    assert full_kv < dense < 1.2 * full_kv
    assert quest < 0.3 * full_kv  # the resident set, not the KV
    assert device_kv_budget(hetero("dense"), FULL, SMOLLM2, 1024, batch=4) > 4 * SMOLLM2.kv_bytes_per_token(4) * 1024


def test_speed_jobs_per_family():
    model = {"source": None, "gguf": "/m.gguf", "hf_dir": "/hf"}
    batch = [[1, 2, 3, 4]] * 2
    quest = hetero_sparse("quest", 1024, 2)
    job = speed_job(quest, FULL, model, 2, batch, 8, 3, SMOLLM2)
    assert job["llm"]["policy"] == "quest" and job["llm"]["device_kv_budget"] > 0
    assert job["llm"]["policy_params"] == {"token_budget": 1024, "n_sink": 4, "n_local": 64,
                                           "dense_layers": 2}
    assert job["llm"]["max_model_len"] >= 4 + 8
    assert job["tasks"] == [{"kind": "speed", "ids": batch, "n_decode": 8, "repeats": 3}]
    streaming = hetero_sparse("streaming", 1024, 2).params
    assert streaming["n_sink"] + streaming["n_local"] == 1024
    assert speed_job(HF, FULL, model, 2, batch, 8, 1)["model_dir"] == "/hf"
    assert speed_job(LLAMACPP, FULL, model, 2, batch[:1], 8, 1)["model_path"] == "/m.gguf"
    press = speed_job(kvpress("snapkv"), FULL, model, 2, [[0] * 4096], 8, 1)["tasks"][0]
    assert press["press"] == "snapkv" and press["keep"] == pytest.approx(kv_share(0.25, 2))
    assert not kvpress("knorm").batched and hetero("dense").batched
    with pytest.raises(ValueError, match="no sparse hetero system"):
        hetero_sparse("dense", 10, 2)


# -- result documents -----------------------------------------------------------------------


def test_summary_and_machine():
    s = summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["mean"], s["n"]) == (2.0, 1.0, 3.0, 2.0, 3)
    with pytest.raises(ValueError):
        summary([])
    m = machine()
    assert {"cpu", "cores", "threads", "torch", "numba"} <= set(m)
    assert m["cores"] >= 1 and isinstance(m["cpu"], str) and m["cpu"]


@pytest.mark.parametrize("workload", WORKLOADS)
def test_recorded_documents_follow_the_schema(workload):
    doc = read_doc(FIXTURE / f"{workload}.json")
    assert doc["schema"] == SCHEMA and doc["workload"] == workload
    assert doc["rows"] and all(r["system"] in doc["systems"] for r in doc["rows"])


@pytest.mark.parametrize("break_it, match", [
    (lambda d: d.pop("machine"), "lacks"),
    (lambda d: d["machine"].pop("numba"), "numba"),
    (lambda d: d.update(schema="other/1"), "schema"),
    (lambda d: d["rows"][0].update(system="nobody"), "not in 'systems'"),
    (lambda d: next(iter(d["rows"][0]["metrics"].values())).pop("max"), "summary"),
    (lambda d: next(iter(d["systems"].values())).update(status="meh"), "status"),
])
def test_schema_violations_are_named(break_it, match):
    doc = copy.deepcopy(read_doc(FIXTURE / "decode.json"))
    break_it(doc)
    with pytest.raises(ValueError, match=match):
        validate(doc)


# -- report and plots -----------------------------------------------------------------------


def test_report_and_plots_from_a_recorded_result(recorded):
    path = write_report(recorded)
    text = path.read_text()
    for heading in ("## Systems", "## Decode", "## Prefill", "## Fidelity", "## Memory",
                    "## CPU kernels", "## What the numbers say"):
        assert heading in text
    assert "| 2048 | 108 (85–4341) | 5.63 (0.13–6.30) | 32% | 6.02% | 346 / 512 |" in text
    decode = read_doc(recorded / "decode.json")
    for name, system in decode["systems"].items():
        assert system["label"] in text
        if system["status"] != "ok":
            assert system["reason"] in text  # a peer that could not run says why
    assert "Passkey accuracy" in text and "Attention-output error" in text
    matched = text[text.index("Sampling against top-k"):].splitlines()
    assert "| 2048 | 207 (10.1%) | 0.074 |" in matched[4]  # magicpig first, then the others
    assert "10.1" not in text[text.index("Attention-output error"):text.index("Sampling against")]
    assert "0.120" not in text[text.index("Sampling against"):text.index("Bounded positions")]
    bounded = text[text.index("Bounded positions"):].splitlines()  # actqkv's keys set the others'
    assert bounded[2] == ("| context | keys touched | hetero actqkv | hetero actqkv, every block selected "
                          "(bounded positions alone) | hetero quest | hetero streaming | oracle token top-k "
                          "(exact scores; a bound, not a runtime) |")
    assert bounded[4] == "| 2048 | 1650 (80.6%) | 0.120 | 0.140 | 0.010 | 0.030 | 0.002 |"
    assert "†" in text  # lengths beyond the trained context are marked speed-only
    for w in ("decode", "prefill", "fidelity", "memory"):
        png = (recorded / f"{w}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_resume_reuses_timed_points(recorded):
    from bench.session import load_points

    for other in ("prefill", "memory", "fidelity"):
        (recorded / f"{other}.json").unlink()
    points = load_points(recorded)
    decode = read_doc(recorded / "decode.json")
    ok = [r for r in decode["rows"] if "error" not in r]
    assert points[(ok[0]["system"], ok[0]["context"], ok[0]["batch"], ok[0]["n_decode"])] == ok[0]
    assert not any(k[0] == "kvpress-snapkv" and k[1] == 4096 for k in points)  # failed: redone
    assert _bench_args("all", "--resume").resume


def test_resume_reads_points_journaled_before_a_workload_finished(recorded):
    from bench.session import JOURNAL, load_points, record_point

    (recorded / "decode.json").unlink()
    (recorded / "memory.json").unlink()
    row = {"system": "hetero-quest", "context": 8192, "batch": 1, "n_decode": 32,
           "metrics": {"decode_ms": {"median": 80.0, "min": 79.0, "max": 81.0}}}
    record_point(recorded, row)
    record_point(recorded, dict(row, context=16384, metrics={}, error="worker died"))
    with open(recorded / JOURNAL, "a") as f:
        f.write('{"system": "hetero-quest", "cont')  # cut off while writing
    points = load_points(recorded)
    assert points[("hetero-quest", 8192, 1, 32)] == row
    assert ("hetero-quest", 16384, 1, 32) not in points


def test_report_command(recorded, capsys):
    assert main(["bench", "report", "--out", str(recorded)]) == 0
    assert capsys.readouterr().out.strip() == str(recorded / "report.md")


def test_report_needs_results(tmp_path, capsys):
    assert main(["bench", "report", "--out", str(tmp_path)]) == 2
    assert "no result documents" in capsys.readouterr().err


# -- peers and workers ----------------------------------------------------------------------


def test_peer_states(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_BENCH_PEERS", str(tmp_path))
    assert peers.status("hf").state == "ok"
    st = peers.status("kvpress")
    assert st.state == "missing" and "hetero bench setup" in st.reason
    (tmp_path / "llamacpp.failed").write_text("cmake: no C compiler\n")
    assert peers.status("llamacpp") == peers.PeerStatus("llamacpp", "failed", "cmake: no C compiler")
    (tmp_path / "kvpress" / "bin").mkdir(parents=True)
    (tmp_path / "kvpress" / ".bench-ok").write_text(json.dumps({"kvpress": "0.5.5"}))
    st = peers.status("kvpress")
    assert st.state == "ok" and st.python.endswith("kvpress/bin/python")
    assert st.versions == {"kvpress": "0.5.5"}
    with pytest.raises(ValueError, match="unknown peer"):
        peers.status("vllm")


def test_a_peer_being_built_is_not_built_twice(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("HETERO_BENCH_PEERS", str(tmp_path))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "llamacpp.building").write_text(str(other.pid))
        st = peers.setup("llamacpp")  # returns at once: someone else is on it
        assert st.state == "missing" and f"process {other.pid}" in st.reason
        assert not (tmp_path / "llamacpp").exists()
    finally:
        other.kill()
        other.wait()
    assert "not installed" in peers.status("llamacpp").reason  # a dead builder is ignored


def test_worker_protocol_reports_each_task(monkeypatch, capsys):
    from bench.workers import _protocol

    def boom(task):
        raise RuntimeError("out of memory")

    job = {"tasks": [{"kind": "ok", "x": 2}, {"kind": "boom"}, {"kind": "nope"}]}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(job)))
    _protocol.run_tasks(_protocol.read_job(), {"ok": lambda t: {"y": t["x"] * 2}, "boom": boom},
                        {"v": "1"})
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply["results"][0] == {"y": 4}
    assert reply["results"][1] == {"error": "RuntimeError: out of memory"}
    assert "no task kind" in reply["results"][2]["error"]
    assert reply["peak_rss_bytes"] > 0 and reply["versions"] == {"v": "1"}
    run = _protocol.speed_run(2.0, 1.0, 4, 100, 11, device_kv_bytes=5)
    assert run["prefill_tok_s"] == 200 and run["decode_ms"] == 100 and run["decode_tok_s"] == 40


def test_run_worker_failure_is_an_error(tmp_path):
    with pytest.raises(peers.WorkerError, match="exited with status"):
        peers.run_worker(sys.executable, "no_such_worker.py", {"tasks": []}, 60,
                         tmp_path / "w.log")


# -- probes ---------------------------------------------------------------------------------
# (the probes themselves, hetero.probe, and LLM.decode_logprobs: tests/hetero/test_probe.py)


def test_forced_decode_nll_matches_exact_prefill_scoring(tiny_model_dir):
    """Teacher-forced decode through the dense policy scores tokens as the exact prefill does."""
    from bench.fidelity import forced_nll
    from hetero import LLM

    llm = LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=16)
    ids = llm.tokenizer("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"]
    ctx, cont = ids[:24], ids[24:34]
    nll = forced_nll(llm, ctx, cont)
    # logprobs[i] = log p(ids[i+1] | ids[:i+1]): cont[1:] are ids[25:34]
    ref = llm.logprobs(ids).logprobs[len(ctx) : len(ctx) + len(cont) - 1]
    assert nll == pytest.approx(-sum(ref) / len(ref), abs=1e-4)
    assert llm.store.allocator.n_used == 0


def test_actqkv_error_rows_count_its_keys_touched(tiny_model_dir):
    """actqkv's keys touched are its own count as a share of the context: every block
    selected, exactly the context; at a selection of 4 blocks, fewer. Its rows are matched to
    it, its KV share is its keys touched (no layer dense), and its error is measured."""
    from types import SimpleNamespace

    from bench.fidelity import ACTQKV, ACTQKV_EVERY_BLOCK, _Fidelity
    from bench.systems import policy_params
    from hetero import LLM

    small = dict(n_sink=8, n_local=32, window=16, top_blocks=4, min_blocks=2, n_repr=2)
    f = _Fidelity.__new__(_Fidelity)
    f.plan, f.rows = replace(QUICK, dense_layers=1, error_steps=3), []
    f.s = SimpleNamespace(labels=lambda n: [])
    f.llm = lambda system, max_len: LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=32,
                                        policy="actqkv", policy_params={**small, **policy_params(system)})
    bar = SimpleNamespace(set_postfix_str=lambda text: None, update=lambda n=1: None)
    ids = f.llm(ACTQKV, 0).tokenizer("The quick brown fox jumps over the lazy dog. " * 20)["input_ids"][:150]
    touched = f.actqkv_error(ACTQKV, 150, ids, bar)
    assert f.actqkv_error(ACTQKV_EVERY_BLOCK, 150, ids, bar) == 150
    assert 8 + 32 < touched < 150
    selected, every = f.rows
    assert (selected["keys_touched"], every["keys_touched"]) == (touched, 150)
    assert selected["kv_fraction"] == pytest.approx(touched / 150) and every["kv_fraction"] == 1.0
    assert {r["test"] for r in f.rows} == {"attention_error_matched"}
    assert {r["matched"] for r in f.rows} == {"hetero-actqkv"}
    assert all(r["metrics"]["attention_error"]["n"] == 3 and r["metrics"]["attention_error"]["min"] > 0
               for r in f.rows)


def test_bench_measures_through_public_hooks_only():
    """No bench module swaps the engine or its policy or decode (issue 16): measurement goes
    through ``hetero.probe`` and the engine's hooks."""
    import re

    swap = re.compile(r"\.engine(\.(decode|policy))?\s*=[^=]|setattr\([^)]*engine")
    root = Path(__file__).resolve().parents[2] / "bench"
    ours = [p for p in sorted(root.rglob("*.py"))  # not the peers' environments (bench/.peers)
            if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    found = [f"{p.relative_to(root)}:{i}" for p in ours
             for i, line in enumerate(p.read_text().splitlines(), 1) if swap.search(line)]
    assert found == []


def test_kernel_bytes_count_probed_runs_and_candidate_rows():
    """Per query head: 8 bytes of offsets and 4 per id in each probed bucket, and a K row,
    a V row and a norm per candidate."""
    from types import SimpleNamespace

    import numpy as np

    from bench.kernels import _call_bytes, copy_bandwidth
    from cpu_kernels import build_tables

    codes = np.array([[[0, 1], [1, 1], [0, 0]]], dtype=np.uint16)  # [Hkv=1, n=3, L=2], K=1
    st = SimpleNamespace(tables=build_tables(codes, 1), keys=np.zeros((1, 3, 4), np.float32))
    q_codes = np.array([[0, 1], [1, 0]])  # two query heads
    # head 0: bucket 0 of table 0 holds keys 0, 2; bucket 1 of table 1 holds 0, 1
    # head 1: bucket 1 of table 0 holds key 1; bucket 0 of table 1 holds key 2
    ids = 4 * (2 + 2 + 1 + 1)
    counts = np.array([1, 0], dtype=np.int32)
    assert _call_bytes(st, q_codes, counts) == 8 * 2 * 2 + ids + 1 * (2 * 4 * 4 + 4)
    assert all(r > 0 for r in copy_bandwidth(2, 1 << 20))


def test_findings_compare_attention_error_within_the_trained_context_only():
    from bench.findings import fidelity_findings

    def row(system, context, error, labels=()):
        return {"system": system, "test": "attention_error", "context": context, "fraction": 0.1,
                "labels": list(labels), "metrics": {"attention_error": {"median": error}}}

    beyond = ["beyond trained context: speed only"]
    doc = {"rows": [row("hetero-quest", 4096, 0.1), row("hetero-streaming", 4096, 0.4),
                    row("hetero-quest", 16384, 0.01, beyond), row("hetero-streaming", 16384, 1.0, beyond)]}
    assert fidelity_findings(doc) == [
        "Attention error of quest is 0.25–0.25x that of streaming at the same budget (lower is better)."]


def test_offload_prefill_times_every_system_and_offloads_the_over_budget_ones(tmp_path, capsys):
    from bench import offload_prefill

    out = tmp_path / "op.json"
    assert offload_prefill.main(["--quick", "--out", str(out)]) == 0  # 2k tokens
    rows = {r["system"]: r for r in json.loads(out.read_text())}
    assert set(rows) == set(offload_prefill.SYSTEMS)
    assert not rows["dense in place"]["offloaded"] and rows["dense in place"]["ratio_to_dense_in_place"] == 1
    for name in ("dense over budget", "quest", "streaming"):
        r = rows[name]
        assert r["offloaded"] and r["d2h_bytes"] > 0 and r["h2d_bytes"] == 0  # layer-wise: nothing back
        assert r["device_kv_bytes_peak"] <= r["device_kv_budget"] and r["ttft_median_s"] > 0
    assert "× dense in place" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        offload_prefill.main(["--contexts", "512", "1024", "--repeats", "1", "2", "3"])


def test_longctx_plan():
    from bench import longctx

    full, quick = longctx.DEFAULT, longctx.QUICK
    assert full.lengths == (16384, 32768, 65536, 131072) and full.trials == 1
    assert full.depths == (0.1, 0.3, 0.5, 0.7, 0.9)  # at every length
    assert [full.runs("quest", n) for n in full.lengths] == [True, False, False, False]
    assert not full.runs("dense", 16384) and full.runs("dense", 8192) and full.runs("actqkv", 131072)
    assert quick.lengths == (4096, 16384) and quick.policies == ("actqkv", "streaming")
    assert len(quick.depths) == 2
    assert longctx._lengths("2048,16k") == (2048, 16384)
    with pytest.raises(ValueError):
        replace(full, lengths=(32,))


def test_longctx_measures_passkey_and_speed_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The workload's core on the tiny model (trained to 512 positions) at 256 and 1024
    tokens: one needle row per (system, length, depth), a speed row per (system, length),
    the dense reference, the labels and both tables; a valid result document."""
    from bench import longctx
    from hetero.policies import POLICIES

    policies = ("streaming", "dense") + (("actqkv",) if "actqkv" in POLICIES else ())
    spec = longctx.Spec(lengths=(256, 1024), policies=policies, depths=(0.5,), dense_max_len=1024,
                        token_budget=64, dense_layers=1, ref_context=256, n_decode=3)
    doc = longctx.measure(spec, model=tiny_model_dir)
    assert read_doc(write_doc(doc, tmp_path))["workload"] == "longctx"
    rows = doc["rows"]
    refs = [r for r in rows if r["test"] == "reference"]  # one before each length
    assert [r["before"] for r in refs] == [256, 1024]
    assert all(r["system"] == "hetero-dense" and r["context"] == 256 for r in refs)
    for policy in policies:
        for n in spec.lengths:
            key = (f"hetero-{policy}", n)
            (speed,) = [r for r in rows if r["test"] == "speed" and (r["system"], r["context"]) == key]
            (needle,) = [r for r in rows if r["test"] == "needle" and (r["system"], r["context"]) == key]
            assert "error" not in speed and set(speed["metrics"]) == {
                "ttft_s", "decode_ms", "h2d_bytes_per_token", "device_kv_bytes", "device_kv_budget"}
            assert speed["metrics"]["device_kv_bytes"]["max"] <= speed["metrics"]["device_kv_budget"]["min"]
            assert abs(needle["prompt_tokens"] - n) <= 24 and needle["metrics"]["accuracy"]["n"] == 1
            beyond = n > 512 and policy != "actqkv"
            assert speed["labels"] == needle["labels"] == ([longctx.BEYOND] if beyond else [])
    tables = doc["tables"]
    assert len(tables["accuracy"]) == len(tables["speed"]) == 2 * len(policies)
    assert all(a["total"] == 1 and set(a["by_depth"]) == {"0.5"} for a in tables["accuracy"])
    s = {(t["system"], t["context"]): t for t in tables["speed"]}
    assert s[("hetero-dense", 256)]["prefill_growth"] == 1 and s[("hetero-dense", 1024)]["tokens_growth"] == 4
    ref = refs[1]["metrics"]["decode_ms"]["median"]
    assert s[("hetero-streaming", 1024)]["dense_ref_ms"] == ref
    assert s[("hetero-streaming", 1024)]["decode_vs_dense_ref"] == pytest.approx(
        s[("hetero-streaming", 1024)]["decode_ms"] / ref)
    md = longctx.markdown(doc)
    assert "× dense 256" in md and longctx.BEYOND in md


def test_longctx_is_a_bench_command(monkeypatch, tmp_path, capsys):
    from bench import longctx

    seen = {}
    monkeypatch.setattr(longctx, "run", lambda spec, out, progress, quick: seen.update(
        spec=spec, out=out, quick=quick) or out / "longctx.json")
    assert main(["bench", "longctx", "--quick", "--contexts", "512", "1024", "--out", str(tmp_path)]) == 0
    assert seen["spec"].lengths == (512, 1024) and seen["spec"].policies == longctx.QUICK.policies
    assert seen["out"] == tmp_path and seen["quick"]
