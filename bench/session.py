"""One bench run: the model, the machine, the peers, and speed points shared by workloads.

``all`` runs decode, prefill and memory from the same timed points (a point is one system,
context and batch, timed in a fresh worker process so its peak RSS is its own), so each
prompt is prefilled once per repeat, not once per workload.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from bench import peers
from bench.corpus import real_token_ids
from bench.plan import Plan
from bench.results import machine, new_doc, summary
from bench.systems import System, speed_job, speed_kv_share
from hetero.config import ModelConfig

logger = logging.getLogger(__name__)

SPEED_METRICS = ("ttft_s", "prefill_tok_s", "decode_ms", "decode_tok_s", "device_kv_bytes",
                 "device_kv_budget", "host_kv_bytes", "h2d_bytes_per_token", "cache_hit_rate",
                 "lsh_table_bytes")


def model_info() -> dict:
    """The embedded model as each system loads it (GGUF for llama.cpp, the converted HF
    directory for HF and kvpress, the GGUF through hetero's cache for hetero)."""
    from hetero.loader import default_model_path, hf_reference_dir

    gguf = default_model_path()
    hf_dir = hf_reference_dir(gguf)
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    return {"name": Path(gguf).stem, "source": None, "gguf": gguf, "hf_dir": hf_dir,
            "config": config,
            "trained_context": config.get("max_position_embeddings"),
            "n_layers": config["num_hidden_layers"]}


JOURNAL = "points.jsonl"
"""Each speed point of a run is appended to ``DIR/points.jsonl`` as it is timed, so that a
run cut off in the middle of a workload resumes from its last point."""


def load_points(out_dir: Path) -> dict[tuple, dict]:
    """Speed points already timed in ``out_dir``'s documents and journal, keyed as
    ``Session`` keys them (system, context, batch, n_decode); points that failed are left
    out."""
    rows = []
    for path in sorted(Path(out_dir).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("workload") in ("decode", "prefill", "memory"):
            rows += doc.get("rows", [])
    journal = Path(out_dir) / JOURNAL
    for line in journal.read_text().splitlines() if journal.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # the last line of a run killed while writing it
            continue
    return {(r["system"], r["context"], r["batch"], r["n_decode"]): r
            for r in rows if "error" not in r and r.get("metrics")}


def record_point(out_dir: Path, row: dict) -> None:
    """Append a timed point to ``out_dir``'s journal."""
    with open(Path(out_dir) / JOURNAL, "a") as f:
        f.write(json.dumps(row) + "\n")


class Session:
    """State shared by the workloads of one ``hetero bench`` call."""

    def __init__(self, plan: Plan, out_dir: Path, quick: bool, peer_names: list[str],
                 setup: bool = True, progress: bool = True, resume: bool = False):
        import torch
        from transformers import AutoTokenizer

        self.plan, self.out_dir, self.quick, self.progress = plan, Path(out_dir), quick, progress
        self.log_dir = self.out_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.machine = machine()
        self.threads = torch.get_num_threads()
        self.model = model_info()
        self.trained = self.model["trained_context"] or 8192
        self.config = ModelConfig.from_hf(self.model["config"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.model["hf_dir"])
        self.peers = {"hf": peers.status("hf")}
        for name in peer_names:
            st = peers.status(name)
            if setup and st.state == "missing":
                logger.info("setting up peer %s (once; log in %s)", name, peers.peers_dir())
                st = peers.setup(name)
            self.peers[name] = st
        # with resume, points timed by an earlier (interrupted) run are not timed again
        if not resume:
            (self.out_dir / JOURNAL).unlink(missing_ok=True)
        self._points: dict[tuple, dict] = load_points(self.out_dir) if resume else {}
        self._versions: dict[str, dict] = {}
        self._text: list[int] | None = None

    # -- inputs --------------------------------------------------------------------------

    def text_ids(self, n: int, offset: int = 0) -> list[int]:
        """``n`` tokens of real text ``offset`` tokens in."""
        if self._text is None or len(self._text) < offset + n:
            self._text = real_token_ids(self.tokenizer, max(offset + n, 40000))
        return self._text[offset : offset + n]

    def labels(self, context: int) -> list[str]:
        return ["beyond trained context: speed only"] if context > self.trained else []

    # -- documents -----------------------------------------------------------------------

    def doc(self, workload: str, systems: list[System], settings: dict) -> dict:
        model = {k: v for k, v in self.model.items() if k != "config"}
        d = new_doc(workload, self.quick, self.machine, model, {**self.plan.to_dict(), **settings})
        for s in systems:
            d["systems"][s.name] = self.system_entry(s)
        return d

    def system_entry(self, system: System) -> dict:
        st = self.peers.get(system.peer) or peers.PeerStatus(system.peer, "missing",
                                                               "not selected (--peers)")
        return {"family": system.family, "label": system.label, "params": system.params,
                "status": st.state, "reason": st.reason,
                "versions": self._versions.get(system.family) or st.versions or {}}

    def available(self, system: System) -> bool:
        st = self.peers.get(system.peer)
        return st is not None and st.state == "ok"

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="pt", file=sys.stderr, disable=not self.progress,
                    dynamic_ncols=True)

    # -- speed points --------------------------------------------------------------------

    def speed_point(self, system: System, context: int, batch: int = 1,
                    n_decode: int | None = None) -> dict:
        """Time ``system`` on ``batch`` prompts of ``context`` real tokens: a result row
        (``metrics`` summaries over the repeats, or ``error``). Memoised per run."""
        n_decode = n_decode or self.plan.n_decode
        repeats = self.plan.repeats_at(context, self.trained, batch)
        key = (system.name, context, batch, n_decode)
        if key not in self._points:
            self._points[key] = self._time(system, context, batch, n_decode, repeats)
            record_point(self.out_dir, self._points[key])
        return self._points[key]

    def _time(self, system: System, context: int, batch: int, n_decode: int, repeats: int) -> dict:
        row = {"system": system.name, "context": context, "batch": batch, "n_decode": n_decode,
               "kv_fraction": speed_kv_share(system, self.plan, context),
               "labels": self.labels(context), "metrics": {}}
        # different text per sequence: a batch must not be one prompt repeated
        prompts = [self.text_ids(context, offset=i * 997) for i in range(batch)]
        job = speed_job(system, self.plan, self.model, self.threads, prompts, n_decode, repeats,
                        self.config)
        st = self.peers[system.peer]
        try:
            reply = peers.run_worker(st.python, system.script, job, self.plan.worker_timeout_s,
                                     self.log_dir / f"{system.name}.log")
        except peers.WorkerError as e:
            row["error"] = str(e)
            return row
        self._versions[system.family] = reply.get("versions", {})
        (result,) = reply["results"]
        if "error" in result:
            row["error"] = result["error"]
            return row
        runs = result["runs"]
        for m in SPEED_METRICS:
            xs = [r[m] for r in runs if r.get(m) is not None]
            if xs:
                row["metrics"][m] = summary(xs)
        row["metrics"]["peak_rss_bytes"] = summary([reply["peak_rss_bytes"]])
        return row
