import json

import pytest

from hetero.cli import main

STATS = {"prompt_tokens", "generated_tokens", "ttft_s", "decode_tokens_per_s",
         "device_kv_bytes_peak", "device_kv_budget", "host_kv_bytes", "h2d_bytes", "d2h_bytes",
         "h2d_bytes_per_token", "d2h_bytes_per_token", "cache_hit_rate", "lsh_table_bytes"}


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
    assert stats["lsh_table_bytes"] > 0 and stats["d2h_bytes"] > 0
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "x", "--policy", "magicpig",
                 "--lsh-l", "1"]) == 2
    assert "lsh_l" in capsys.readouterr().err


def test_missing_model_path(capsys):
    assert main(["generate", "--model", "/no/such/model", "--prompt", "x"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_info(tiny_model_dir, capsys):
    assert main(["info", "--model", tiny_model_dir, "--device-kv-budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "device KV budget" in out and "1.00 GiB" in out and "torch" in out
