"""Layers without back-arrows (docs/architecture.md, "Layers"), read from the source with
``ast``; the registries that let the upper layers plug in (backends, commands, policies); and
a policy the package does not know, registered, run through ``LLM`` and the CLI."""

import ast
import json
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

import hetero.cli
from hetero import LLM, SamplingParams
from hetero.backend import CPUBackend, backend_factory, backend_names, check_backend
from hetero.cli import main
from hetero.policies import POLICIES, StreamingPolicy, register_policy
from tests.hetero.toy_policy import ToyPolicy

ROOT = Path(__file__).resolve().parents[2]
OURS = {"hetero", "gpu_kernels", "cpu_kernels", "orchestrator", "bench", "tools", "tests", "examples"}
# What each package may not import (a module imports only from its own layer or below).
FORBIDDEN = {
    "gpu_kernels": OURS - {"gpu_kernels"},
    "cpu_kernels": OURS - {"cpu_kernels"},
    "hetero": {"orchestrator", "bench", "tools", "tests", "examples"},
    "orchestrator": {"bench", "tools", "tests", "examples"},
}


def _imports(path: Path) -> set[str]:
    """Top-level packages a module imports absolutely, anywhere in it (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_an_upper_layer(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules
    wrong = {str(m.relative_to(ROOT)): sorted(_imports(m) & FORBIDDEN[package]) for m in modules}
    assert {m: w for m, w in wrong.items() if w} == {}


def test_the_import_graph_check_sees_imports_inside_functions(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("import os\n\ndef f():\n    from orchestrator.local import LocalBackend\n"
                   "    import bench.cli\n    from . import sibling\n")
    assert _imports(mod) == {"os", "orchestrator", "bench"}


# -- registries ---------------------------------------------------------------------------


def test_backends_and_commands_are_registered():
    from orchestrator.local import LocalBackend
    from orchestrator.ray_backend import RayBackend

    assert {"local", "ray"} <= set(backend_names())
    assert backend_factory("local") is LocalBackend and backend_factory("ray") is RayBackend
    assert "bench" in {ep.name for ep in entry_points(group=hetero.cli.COMMAND_GROUP)}
    import bench.cli

    assert hetero.cli._parser().parse_args(["bench", "report"]).run is bench.cli.run


def test_an_unknown_backend_lists_the_registered_ones():
    with pytest.raises(ValueError, match="unknown backend 'spark'; available: .*local.*ray"):
        backend_factory("spark")


def test_backend_options_are_checked_before_anything_starts():
    with pytest.raises(TypeError, match="backend 'local' has no option 'address'"):
        check_backend("local", {"address": "auto"})
    with pytest.raises(ValueError, match="out of range"):  # RayBackend.check: no Ray, no network
        check_backend("ray", {"address": "127.0.0.1:70000"})
    assert issubclass(check_backend("ray", {"address": "auto"}), CPUBackend)


def test_a_command_that_cannot_load_fails_only_when_used(monkeypatch, capsys):
    broken = EntryPoint(name="broken", value="no_such_module_here:add_parser", group=hetero.cli.COMMAND_GROUP)
    real = hetero.cli.entry_points
    monkeypatch.setattr(hetero.cli, "entry_points", lambda group: [*real(group=group), broken])
    assert hetero.cli._parser().parse_args(["generate", "--prompt", "x"]).run is hetero.cli._generate
    assert main(["broken", "--anything", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetero: error: the 'broken' command cannot load") and "\n" not in err


# -- a policy the package does not know -----------------------------------------------------


@pytest.fixture
def toy():
    """ToyPolicy (one file, ``toy_policy.py``) registered as "toy" (register_policy), nothing
    else changed."""
    register_policy(ToyPolicy)
    ToyPolicy.made.clear()
    yield ToyPolicy
    del POLICIES["toy"]


def test_register_policy_refuses_a_taken_name_and_a_non_policy(toy):
    with pytest.raises(ValueError, match="registered already"):
        register_policy(type("Other", (StreamingPolicy,), {"name": "toy"}))
    with pytest.raises(TypeError, match="Policy subclass"):
        register_policy(int)


TEXT = "The quick brown fox jumps over the lazy dog. " * 8
SMALL = ["--page-size", "4", "--prefill-chunk", "16", "--device-kv-budget", "8MiB", "--device", "cpu"]


def test_a_registered_policy_runs_through_llm(tiny_model_dir, toy):
    with LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=16, device_kv_budget="8MiB",
             policy="toy", policy_params={"x": 1, "n_local": 16}) as llm:
        (out,) = llm.generate(TEXT, SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert isinstance(llm.policy, toy) and llm.policy.x == 1
        assert llm.memory_report()["policy"] == {"offloaded_pages": 0}  # nothing live
    assert len(out.token_ids) == 4 and out.stats.d2h_bytes > 0  # it offloaded
    assert out.stats.policy["offloaded_pages"] > 0  # its hooks ran, its statistics came back


def test_a_registered_policy_runs_through_the_cli(tiny_model_dir, toy, capsys):
    assert main(["generate", "--model", tiny_model_dir, "--prompt", TEXT, *SMALL, "--policy", "toy",
                 "--policy-param", "x=1", "--policy-param", "ratio=0.25", "--policy-param", "on=yes",
                 "--policy-param", "label=a=b", "--n-local", "16", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 4 and out["stats"]["policy"]["offloaded_pages"] > 0
    (policy,) = toy.made
    assert (policy.x, policy.ratio, policy.on, policy.label, policy.n_local) == (1, 0.25, True, "a=b", 16)


def test_the_cli_help_lists_a_registered_policy_and_its_options(toy, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "{dense,streaming,quest,magicpig,actqkv,toy}" in out
    assert "toy" in out and "x=0 ratio=0.5 on=False label=''" in out


@pytest.mark.parametrize("param, match", [
    ("y=1", "policy 'toy' has no option 'y'; its options: n_sink, n_local, dense_layers, "
            "stream_pages, x, ratio, on, label"),
    ("x=one", "policy 'toy': x must be int, got 'one'"),
    ("on=maybe", "policy 'toy': on must be bool, got 'maybe'"),
    ("x=-1", "toy: x must be >= 0"),  # the policy's own check
])
def test_bad_policy_params_are_one_line_before_the_model_loads(toy, monkeypatch, capsys, param, match):
    monkeypatch.setattr("hetero.llm.load_checkpoint", _fail)
    assert main(["generate", "--prompt", "x", "--device", "cpu", "--policy", "toy",
                 "--policy-param", param]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("hetero: error:") and match in err, err


def _fail(*args, **kwargs):
    pytest.fail("the model was loaded before the bad input was caught")
