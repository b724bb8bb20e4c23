"""Peers in their own virtual environments, and the subprocess call that runs any worker.

Each peer that pins packages ours cannot share (kvpress needs transformers < 5.3;
llama-cpp-python is compiled from source) gets a venv under ``peers_dir()``
(``bench/.peers/`` by default, git-ignored; ``$HETERO_BENCH_PEERS`` moves it). ``setup``
creates it and installs the peer; a failed setup leaves ``<name>.failed`` with the reason,
which the report quotes. HF transformers runs in our own environment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

WORKERS = Path(__file__).parent / "workers"


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """How to install one peer into its venv."""

    name: str
    packages: tuple[str, ...]  # pip install arguments
    check: str  # a module the venv must then import
    timeout_s: int
    build_env: tuple[tuple[str, str], ...] = ()


PEERS = {
    "kvpress": PeerSpec(
        "kvpress", ("torch==2.13.0", "kvpress", "transformers<5.3"), "kvpress", 1800,
    ),
    # llama.cpp compiles from the sdist (no prebuilt wheel is fetched); nice keeps the
    # machine usable while it builds.
    "llamacpp": PeerSpec(
        "llamacpp", ("--no-binary", "llama-cpp-python", "llama-cpp-python"), "llama_cpp", 3600,
        (("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1)),),
    ),
}


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """``state`` is ``ok``, ``missing`` or ``failed``; ``python`` is set when ``ok``."""

    name: str
    state: str
    reason: str = ""
    python: str | None = None
    versions: dict | None = None


def peers_dir() -> Path:
    return Path(os.environ.get("HETERO_BENCH_PEERS") or Path(__file__).parent / ".peers")


def status(name: str) -> PeerStatus:
    """Whether a peer can run, without running anything."""
    if name == "hf":
        return PeerStatus("hf", "ok", python=sys.executable)
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: hf, {', '.join(PEERS)}")
    venv, failed = peers_dir() / name, peers_dir() / f"{name}.failed"
    if (pid := _builder(name)) is not None:
        return PeerStatus(name, "missing", f"being set up by process {pid} (see "
                          f"{peers_dir() / (name + '-setup.log')})")
    if failed.is_file():
        return PeerStatus(name, "failed", failed.read_text().strip())
    ok = venv / ".bench-ok"
    if not ok.is_file():
        return PeerStatus(name, "missing", "not installed: run `hetero bench setup`")
    return PeerStatus(name, "ok", python=str(venv / "bin" / "python"),
                      versions=json.loads(ok.read_text()))


def setup(name: str, force: bool = False) -> PeerStatus:
    """Create the peer's venv and install it (a no-op when done; ``force`` starts over).

    Output goes to ``<peers_dir>/<name>-setup.log``; a failure is recorded, not raised.
    """
    spec = PEERS[name]
    root, venv = peers_dir(), peers_dir() / name
    failed = root / f"{name}.failed"
    if force:
        shutil.rmtree(venv, ignore_errors=True)
        failed.unlink(missing_ok=True)
    current = status(name)
    if current.state != "missing" or _builder(name) is not None:
        return current
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f"{name}.building"
    marker.write_text(str(os.getpid()))
    try:
        return _install(spec, root, venv)
    finally:
        marker.unlink(missing_ok=True)


def _builder(name: str) -> int | None:
    """Pid of a live process setting the peer up, if any."""
    try:
        pid = int((peers_dir() / f"{name}.building").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return None if pid == os.getpid() else pid


def _install(spec: PeerSpec, root: Path, venv: Path) -> PeerStatus:
    name = spec.name
    log_path = root / f"{name}-setup.log"
    py = venv / "bin" / "python"
    env = {**os.environ, **dict(spec.build_env)}
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        ["nice", "-n", "19", str(py), "-m", "pip", "install", *spec.packages],
        [str(py), "-c", f"import {spec.check}"],
    ]
    with open(log_path, "w") as log:
        for cmd in steps:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      timeout=spec.timeout_s)
            except subprocess.TimeoutExpired:
                return _fail(name, f"`{' '.join(cmd[-3:])}` timed out after {spec.timeout_s} s")
            if proc.returncode:
                return _fail(name, f"`{' '.join(cmd)}` failed: {_tail(log_path)}")
    versions = _versions(py)
    (venv / ".bench-ok").write_text(json.dumps(versions))
    return status(name)


def _fail(name: str, reason: str) -> PeerStatus:
    (peers_dir() / f"{name}.failed").write_text(reason + "\n")
    logger.warning("peer %s could not be set up: %s", name, reason)
    return status(name)


def _tail(log_path: Path, n: int = 3) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-n:])


def _versions(py: Path) -> dict:
    code = ("import json, importlib.metadata as m; print(json.dumps({d.metadata['Name'].lower(): "
            "d.version for d in m.distributions() if d.metadata['Name'].lower() in "
            "('torch', 'transformers', 'kvpress', 'llama_cpp_python', 'llama-cpp-python')}))")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


class WorkerError(RuntimeError):
    """A worker process failed as a whole (crash, timeout, no reply)."""


def run_worker(python: str, script: str, job: dict, timeout_s: float,
               log_path: Path | None = None) -> dict:
    """Run ``bench/workers/<script>`` under ``python`` with ``job`` on stdin; its reply.

    The worker's stderr is appended to ``log_path`` (or discarded).
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    log = open(log_path, "a") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.run([python, str(WORKERS / script)], input=json.dumps(job), text=True,
                              stdout=subprocess.PIPE, stderr=log, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise WorkerError(f"{script} timed out after {timeout_s:.0f} s") from None
    finally:
        if log_path:
            log.close()
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        where = f" (see {log_path})" if log_path else ""
        raise WorkerError(f"{script} exited with status {proc.returncode}{where}")
    return json.loads(lines[-1])
