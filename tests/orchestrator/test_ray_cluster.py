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


CHAIN = """
import sys
import torch
from orchestrator.ray_backend import RayBackend

backend = RayBackend(address=sys.argv[1])
try:
    r = backend.chain_prefill(sys.argv[2], torch.float32, list(range(100, 400)), 2, partition="even")
finally:
    backend.close()
torch.save({"k": r.k, "v": r.v, "logits": r.logits, "bounds": r.bounds, "busy_s": r.busy_s}, sys.argv[3])
"""


def test_two_nodes_chain_prefill_the_kv_of_one_process(cluster, tiny_model_dir, tmp_path):
    """Two actors, one per node (each takes its node's only CPU), chain-prefill a prompt,
    the K/V going from one node to the other as an object ref."""
    import torch

    from orchestrator.chain import Chain

    out = tmp_path / "chain.pt"
    p = subprocess.run([sys.executable, "-c", CHAIN, cluster, tiny_model_dir, str(out)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(out)
    with Chain(tiny_model_dir, torch.float32, workers=1) as chain:
        want = chain.prefill(list(range(100, 400)), [0, 300])
    assert got["bounds"] == [0, 150, 300] and len(got["busy_s"]) == 2
    for kind in ("k", "v"):
        for a, b in zip(got[kind], getattr(want, kind), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert int(got["logits"].argmax()) == want.first_token
