"""The runahead workload (``bench.runahead``) end to end on the tiny model, and its command."""

import pytest

from bench import runahead
from bench.results import read_doc, write_doc
from hetero.cli import main


def test_runahead_times_every_chain_against_one_process_on_the_tiny_model(tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path / "cache"))
    spec = runahead.Spec(lengths=(128,), workers=(1, 2), repeats=(1,))
    assert [name for name, _, _ in spec.systems()] == ["chain 1", "chain 2 fitted", "chain 2 even"]
    doc = runahead.measure(spec, model=tiny_model_dir, quick=True)
    assert read_doc(write_doc(doc, tmp_path))["workload"] == "runahead"
    table = {t["system"]: t for t in doc["tables"]["ttft"]}
    assert set(table) == {runahead.ONE, "chain 1", "chain 2 fitted", "chain 2 even"}
    assert table["chain 2 even"]["bounds"] == [0, 64, 128] and table["chain 2 fitted"]["bounds"][1] >= 64
    for name in ("chain 1", "chain 2 fitted", "chain 2 even"):
        t = table[name]
        assert t["ttft_s"] > 0 and t["same_first_token"] and t["kv_max_abs_diff"] < 1e-4
        assert len(t["busy_s"]) == len(t["wait_s"]) == t["workers"] and t["busy_ratio"] >= 1
    md = runahead.markdown(doc)
    assert "| 128 | chain 2 fitted |" in md and "max/min busy" in md


def test_runahead_is_a_bench_command_and_checks_its_spec(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(runahead, "run", lambda spec, out, quick: seen.update(spec=spec, out=out)
                        or out / "runahead.json")
    assert main(["bench", "runahead", "--quick", "--contexts", "512", "--repeats", "2", "--out", str(tmp_path)]) == 0
    assert seen["spec"] == runahead.Spec(lengths=(512,), workers=(1, 2), repeats=(2,))
    assert runahead._ints("8k,16384") == (8192, 16384)
    with pytest.raises(ValueError, match="workers must be between 1"):
        runahead.Spec(lengths=(64,), workers=(128,))
