"""The result document every workload writes: machine, model, settings, systems, rows.

Schema (``SCHEMA``)::

    {"schema": "hetero-bench/1", "workload": str, "created": ISO time, "quick": bool,
     "machine": {...}, "model": {...}, "settings": {...},
     "systems": {name: {"family": str, "status": "ok" | "missing" | "failed" | "error",
                        "reason": str, "versions": {...}}},
     "rows": [{"system": str, "metrics": {name: Summary}, "labels": [str], ...keys}]}

A ``Summary`` is ``{"median", "min", "max", "mean", "n", "runs"}`` over repeated runs. Row
keys name the point measured (``context``, ``batch``, ``kv_fraction``, ``test``...).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = "hetero-bench/1"
WORKLOADS = ("decode", "prefill", "fidelity", "memory", "kernels", "longctx", "runahead", "needles")
SUMMARY_KEYS = {"median", "min", "max", "mean", "n", "runs"}
STATUSES = {"ok", "missing", "failed", "error"}


def summary(xs: list[float]) -> dict:
    """Median, min, max and mean of repeated measurements (the runs kept too)."""
    if not xs:
        raise ValueError("summary of no runs")
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "mean": statistics.fmean(xs), "n": len(xs), "runs": list(xs)}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's machine name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo, else the logical count."""
    cores, phys = set(), "0"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                phys = value.strip()
            elif key.strip() == "core id":
                cores.add((phys, value.strip()))
    except OSError:
        pass
    return len(cores) or (os.cpu_count() or 1)


def machine() -> dict:
    """What the numbers were measured on."""
    import numba
    import psutil
    import torch
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other work on the machine skews every timing: a 1-minute load above the thread
        # count at the start says the numbers are not to be trusted
        "load_average_1m": os.getloadavg()[0],
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "transformers": transformers.__version__,
    }


def int_list(text: str) -> tuple[int, ...]:
    """A command line's list of counts or lengths: ``8k,16384`` -> (8192, 16384)."""
    return tuple(int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in text.split(","))


def new_doc(workload: str, quick: bool, machine_info: dict, model: dict, settings: dict) -> dict:
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known: {', '.join(WORKLOADS)}")
    return {
        "schema": SCHEMA, "workload": workload,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick, "machine": machine_info, "model": model, "settings": settings,
        "systems": {}, "rows": [],
    }


def validate(doc: dict) -> None:
    """Raise ``ValueError`` naming the first thing that breaks the schema."""
    need = {"schema", "workload", "created", "quick", "machine", "model", "settings",
            "systems", "rows"}
    if missing := need - set(doc):
        raise ValueError(f"result document lacks {sorted(missing)}")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"schema {doc['schema']!r}, expected {SCHEMA!r}")
    if doc["workload"] not in WORKLOADS:
        raise ValueError(f"unknown workload {doc['workload']!r}")
    for key in ("cpu", "cores", "threads", "torch", "numba"):
        if key not in doc["machine"]:
            raise ValueError(f"machine description lacks {key!r}")
    for name, sys_ in doc["systems"].items():
        if sys_.get("status") not in STATUSES:
            raise ValueError(f"system {name!r}: status must be one of {sorted(STATUSES)}")
    for i, row in enumerate(doc["rows"]):
        if row.get("system") not in doc["systems"]:
            raise ValueError(f"row {i}: system {row.get('system')!r} is not in 'systems'")
        if not isinstance(row.get("labels", []), list):
            raise ValueError(f"row {i}: labels must be a list")
        for metric, s in row.get("metrics", {}).items():
            if not isinstance(s, dict) or set(s) != SUMMARY_KEYS:
                raise ValueError(f"row {i}: metric {metric!r} is not a summary {sorted(SUMMARY_KEYS)}")
            if s["n"] != len(s["runs"]) or not s["min"] <= s["median"] <= s["max"]:
                raise ValueError(f"row {i}: metric {metric!r} is inconsistent")


def write_doc(doc: dict, out_dir: Path) -> Path:
    validate(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{doc['workload']}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def read_doc(path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    validate(doc)
    return doc
