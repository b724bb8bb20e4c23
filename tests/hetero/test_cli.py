import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hetero
from hetero.cli import main

ROOT = Path(__file__).resolve().parents[2]

STATS = {"prompt_tokens", "generated_tokens", "ttft_s", "decode_tokens_per_s",
         "device_kv_bytes_peak", "device_kv_budget", "host_kv_bytes", "h2d_bytes", "d2h_bytes",
         "h2d_bytes_per_token", "d2h_bytes_per_token", "cache_hit_rate", "policy"}


def test_generate_json_is_one_object_on_stdout(tiny_model_dir, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time")
    code = main(["generate", "--model", tiny_model_dir, "--prompt-file", str(prompt),
                 "--max-new-tokens", "5", "--temperature", "0", "--device-kv-budget", "4MiB",
                 "--json"])
    out = capsys.readouterr()
    assert code == 0
    obj = json.loads(out.out)
    assert set(obj) == {"text", "token_ids", "finish_reason", "stats"}
    assert set(obj["stats"]) == STATS
    assert obj["stats"]["device_kv_budget"] == 4 * 2**20
    assert len(obj["token_ids"]) <= 5 and obj["finish_reason"] in ("stop", "length")


def test_chat_flag_uses_the_template(tiny_model_dir, capsys):
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "Hi", "--chat",
                 "--max-new-tokens", "2", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["prompt_tokens"] > 5  # the template's system and role tokens were added


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt-file", "/nonexistent/file.txt"], "cannot read --prompt-file"),
        (["--prompt", "x", "--policy", "magic"], "unknown policy"),
        (["--prompt", "x", "--device-kv-budget", "1KiB"], "below one page per layer"),
        (["--prompt", ""], "non-empty"),
    ],
)
def test_errors_are_one_line_and_nonzero(tiny_model_dir, capsys, argv, match):
    code = main(["generate", "--model", tiny_model_dir, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("hetero: error:") and match in err[-1]
    assert not any("Traceback" in line for line in err)


def test_quest_flags_reach_the_policy(tiny_model_dir, capsys):
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    code = main(["generate", "--model", tiny_model_dir, "--prompt", prompt, "--policy", "quest",
                 "--token-budget", "64", "--n-sink", "4", "--n-local", "16", "--dense-layers", "0",
                 "--page-size", "8", "--prefill-chunk", "64", "--max-new-tokens", "4", "--json"])
    assert code == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["d2h_bytes"] > 0 and stats["h2d_bytes_per_token"] > 0
    assert 0 <= stats["cache_hit_rate"] <= 1
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "x", "--policy", "quest",
                 "--token-budget", "8"]) == 2
    assert "token_budget" in capsys.readouterr().err


def test_magicpig_flags_reach_the_policy(tiny_model_dir, capsys):
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    code = main(["generate", "--model", tiny_model_dir, "--prompt", prompt, "--policy", "magicpig",
                 "--lsh-k", "4", "--lsh-l", "6", "--n-local", "16", "--dense-layers", "0",
                 "--page-size", "8", "--prefill-chunk", "64", "--max-new-tokens", "4", "--json"])
    assert code == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["policy"]["lsh_table_bytes"] > 0 and stats["d2h_bytes"] > 0
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "x", "--policy", "magicpig",
                 "--lsh-l", "1"]) == 2
    assert "lsh_l" in capsys.readouterr().err


def test_actqkv_reads_a_prompt_past_the_trained_context_from_the_cli(tiny_model_dir, capsys):
    prompt = "The quick brown fox jumps over the lazy dog. " * 70  # ~700 tokens; trained: 512
    args = ["generate", "--model", tiny_model_dir, "--prompt", prompt, "--page-size", "8",
            "--max-new-tokens", "3", "--json"]
    assert main([*args, "--policy", "quest"]) == 2
    assert "use policy='actqkv'" in capsys.readouterr().err
    assert main([*args, "--policy", "actqkv", "--policy-param", "window=32", "--policy-param", "n_local=64",
                 "--policy-param", "top_blocks=8", "--n-sink", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 3 and out["stats"]["prompt_tokens"] > 512
    assert out["stats"]["policy"]["state_bytes"] > 0 and out["stats"]["h2d_bytes"] > 0


def test_missing_model_path(capsys):
    assert main(["generate", "--model", "/no/such/model", "--prompt", "x"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_info(tiny_model_dir, capsys):
    assert main(["info", "--model", tiny_model_dir, "--device-kv-budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "device KV budget" in out and "1.00 GiB" in out and "torch" in out


# -- bad input: exit 2, one line, before the model loads ----------------------------------


def _the_line(capsys, prefix: str = "hetero: error:") -> str:
    """The one line on stderr, which starts with ``prefix``; no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def _fail(*args, **kwargs):
    pytest.fail("the model was loaded before the bad input was caught")


@pytest.fixture
def no_llm(monkeypatch):
    """The CLI's own checks (prompt, prompt file, sampling) run before it creates the LLM."""
    monkeypatch.setattr("hetero.cli._make_llm", _fail)


@pytest.fixture
def no_checkpoint(monkeypatch):
    """``LLM``'s checks of its arguments run before it reads the checkpoint."""
    import hetero.llm
    import hetero.loader

    monkeypatch.setattr(hetero.loader, "load_checkpoint", _fail)
    monkeypatch.setattr(hetero.llm, "load_checkpoint", _fail, raising=False)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--prompt", ""], "non-empty"),
        (["--prompt", "caf\udce9"], "--prompt is not UTF-8"),  # an undecodable argv byte
        (["--prompt", "x", "--temperature", "inf"], "temperature"),
        (["--prompt", "x", "--temperature", "nan"], "temperature"),
        (["--prompt", "x", "--temperature", "-1"], "temperature"),
        (["--prompt", "x", "--seed", str(2**64)], "seed"),
        (["--prompt", "x", "--seed", "-1"], "seed"),
        (["--prompt", "x", "--top-p", "0"], "top_p"),
        (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_bad_prompt_or_sampling_fails_before_the_model_loads(no_llm, capsys, argv, match):
    assert main(["generate", *argv]) == 2
    assert match in _the_line(capsys)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "cannot read --prompt-file: No such file or directory"),
        ("dir", "cannot read --prompt-file: Is a directory"),
        (b"", "the prompt must be non-empty: --prompt-file"),
        (b"caf\xe9 au lait", "--prompt-file is not UTF-8 text"),
    ],
)
def test_bad_prompt_file_is_named_before_the_model_loads(no_llm, tmp_path, capsys, content, match):
    path = tmp_path / "prompt.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert main(["generate", "--prompt-file", str(path)]) == 2
    line = _the_line(capsys)
    assert match in line and str(path) in line


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--max-model-len", "0"], "max_model_len"),
        (["--max-model-len", "-5"], "max_model_len"),
        (["--page-size", "3"], "page_size"),
        (["--device-kv-budget", "100000GiB"], "device_kv_budget"),
        (["--device-kv-budget", "1000000000000000GiB"], "device_kv_budget"),
        (["--device-kv-budget", "lots"], "cannot read size"),
    ],
)
def test_bad_llm_arguments_fail_before_the_checkpoint_loads(no_checkpoint, capsys, argv, match):
    assert main(["generate", "--prompt", "x", "--device", "cpu", *argv]) == 2
    assert match in _the_line(capsys)


def test_dedicated_policy_flags_are_aliases_of_policy_param():
    from hetero.policies import parse_policy_params

    args = hetero.cli._parser().parse_args(
        ["generate", "--prompt", "x", "--policy", "quest", "--n-sink", "8", "--policy-param",
         "n_local=16", "--token-budget", "64", "--policy-param", "n_sink=4"])
    assert args.policy_param == [("n_sink", "8"), ("n_local", "16"), ("token_budget", "64"), ("n_sink", "4")]
    # values read by the type of the dataclass field; a later one wins
    assert parse_policy_params(args.policy, args.policy_param) == {
        "n_sink": 4, "n_local": 16, "token_budget": 64}


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--token-budget", "64"], "policy 'dense' has no option 'token_budget'; its options: "
                                   "n_sink, n_local, dense_layers, stream_pages"),
        (["--policy", "quest", "--policy-param", "token_budget=lots"],
         "policy 'quest': token_budget must be int, got 'lots'"),
        (["--policy", "magic"], "unknown policy 'magic'; choose one of"),
    ],
)
def test_bad_policy_options_fail_before_the_checkpoint_loads(no_checkpoint, capsys, argv, match):
    assert main(["generate", "--prompt", "x", "--device", "cpu", *argv]) == 2
    assert match in _the_line(capsys)


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("CUDA out of memory.\nTried to allocate 64.00 GiB"), MemoryError(),
     OverflowError("cannot fit 'int' into an index-sized integer")],
)
def test_setup_failures_are_one_line_naming_their_type(monkeypatch, capsys, exc):
    def make_llm(args):
        raise exc

    monkeypatch.setattr("hetero.cli._make_llm", make_llm)
    assert main(["generate", "--prompt", "x"]) == 2
    line = _the_line(capsys)
    assert line.startswith(f"hetero: error: {type(exc).__name__}") and "-v" in line
    with pytest.raises(type(exc)):  # -v shows the traceback
        main(["-v", "generate", "--prompt", "x"])


def test_a_bug_is_not_dressed_as_a_usage_error(monkeypatch):
    def make_llm(args):
        raise KeyError("oops")

    monkeypatch.setattr("hetero.cli._make_llm", make_llm)
    with pytest.raises(KeyError):
        main(["generate", "--prompt", "x"])


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "--prompt", "x", "--seed", "abc"], "--seed: invalid int value"),
        (["generate"], "one of the arguments --prompt --prompt-file is required"),
        ([], "required: command"),
        (["generate", "--prompt", "x", "--policy-param", "n_sink"], "expected NAME=VALUE, got 'n_sink'"),
        (["generate", "--prompt", "x", "--backend", "spark"], "invalid choice: 'spark'"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert match in _the_line(capsys)


# -- Ctrl-C: exit 130, no traceback, wherever it lands --------------------------------------


@pytest.mark.parametrize("where", ["hetero.cli._parser", "hetero.cli._make_llm"])
def test_ctrl_c_in_process(monkeypatch, capsys, where):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)
    assert main(["generate", "--prompt", "x"]) == 130
    assert _the_line(capsys, "hetero: interrupted") == "hetero: interrupted"


MODULE = [sys.executable, "-m", "hetero.cli"]
SCRIPT = [str(Path(sys.executable).parent / "hetero")]  # the console script, pyproject's entry point


@pytest.mark.parametrize(
    "launcher, delay",
    [(MODULE, 0.3), (MODULE, 1.0), (SCRIPT, 0.3), (SCRIPT, 1.0), (MODULE, 3.0)],
    ids=["-m, imports", "-m, imports later", "script, imports", "script, imports later",
         "-m, model load"],
)
def test_ctrl_c_during_start_up(launcher, delay):
    """SIGINT while torch and the model stack import (under 1.3 s here), or once they have
    (3 s: the model loads or generates)."""
    if not Path(launcher[0]).exists():
        pytest.skip(f"{launcher[0]} is not installed (pip install -e .)")
    p = subprocess.Popen([*launcher, "generate", "--prompt", "hi"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(delay)
        if p.poll() is not None:
            out, err = p.communicate()
            if delay > 1 and p.returncode == 0:
                pytest.skip(f"the run ended within {delay} s on this machine")
            pytest.fail(f"exited {p.returncode} before the signal: {err}")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "hetero: interrupted", err
    if delay < 1:  # nothing had started yet: the message is all
        assert err == "hetero: interrupted\n"


# -- the package imports light ----------------------------------------------------------------


def test_importing_the_package_and_cli_imports_no_torch():
    code = ("import sys, hetero, hetero.cli; hetero.cli._parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_public_names_load_on_first_use():
    from hetero import LLM, SamplingParams
    from hetero.llm import LLM as llm_class
    from hetero.outputs import LogprobsOutput, Output, RequestStats
    from hetero.sampling import SamplingParams as params_class

    assert (LLM, SamplingParams) == (llm_class, params_class)
    assert [getattr(hetero, n) for n in hetero.__all__] == [LLM, LogprobsOutput, Output,
                                                           RequestStats, SamplingParams]
    assert set(hetero.__all__) <= set(dir(hetero))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hetero.nope  # noqa: B018
