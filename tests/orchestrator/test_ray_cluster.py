"""A two-node Ray cluster on this machine (a head and a worker node of one CPU each, started
with ``ray start`` as the README's set-up does): ``hetero generate --backend ray
--ray-address`` joins it and its two worker actors, one per node (each takes the node's
only CPU), generate the local backend's tokens.

The commands run as subprocesses with the cluster's token in their environment (as every
node and driver of a cluster with token authentication needs it): this process keeps its
own Ray state for the other modules."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from hetero.cli import main

BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], temp_dir: str) -> int:
    """``ray start`` in a session of its own; returns that session's process group, which
    holds every process it started."""
    p = subprocess.Popen(
        [f"{BIN}/ray", "start", *args, "--num-cpus=1", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=180)
    finally:
        if p.returncode != 0:
            _kill(p.pid)
    if p.returncode:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-3000:]}")
    return p.pid


def _kill(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _hetero(*argv: str) -> str:
    p = subprocess.run([f"{BIN}/hetero", *argv], env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def cluster():
    port, groups = _free_port(), []
    temp_dir = tempfile.mkdtemp(prefix="hray")  # short: Ray's socket paths live under it
    try:
        groups.append(_ray_start(["--head", f"--port={port}", "--include-dashboard=false"], temp_dir))
        groups.append(_ray_start([f"--address=127.0.0.1:{port}"], temp_dir))
        yield f"127.0.0.1:{port}"
    finally:
        for g in reversed(groups):
            _kill(g)
        shutil.rmtree(temp_dir, ignore_errors=True)


ARGV = ["generate", "--prompt", "The quick brown fox jumps over the lazy dog. " * 20, "--policy", "magicpig",
        "--lsh-k", "4", "--lsh-l", "8", "--n-local", "16", "--dense-layers", "0", "--page-size", "4",
        "--prefill-chunk", "32", "--device-kv-budget", "8MiB", "--max-new-tokens", "16", "--json"]


def test_two_nodes_generate_the_local_tokens(cluster, tiny_model_dir, capsys):
    assert main([*ARGV, "--model", tiny_model_dir]) == 0
    want = json.loads(capsys.readouterr().out)
    info = _hetero("info", "--model", tiny_model_dir, "--backend", "ray", "--ray-address", cluster)
    assert "ray (2 node(s), 2 CPUs" in info
    out = json.loads(_hetero(*ARGV, "--model", tiny_model_dir, "--backend", "ray", "--ray-address", cluster))
    assert out["token_ids"] == want["token_ids"] and out["stats"]["policy"]["lsh_table_bytes"] > 0
