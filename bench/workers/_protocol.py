"""The worker protocol, standard library only (workers also run in the peers' venvs).

A worker is a script run as ``PYTHON path/to/<name>_worker.py``. It reads one job (a JSON
object) on stdin and prints one JSON object on its last stdout line::

    {"results": [...one entry per task...], "peak_rss_bytes": int, "versions": {...}}

A task that fails gives ``{"error": "<message>"}`` in its slot; the others still run.
Logs go to stderr. Nothing here imports a third-party package.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback


def read_job() -> dict:
    """The job the parent wrote on stdin."""
    return json.loads(sys.stdin.read())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_tasks(job: dict, handlers: dict, versions: dict) -> None:
    """Run every task of ``job`` with ``handlers[task["kind"]](task)`` and print the reply."""
    results = []
    for task in job["tasks"]:
        try:
            handler = handlers[task["kind"]]
        except KeyError:
            results.append({"error": f"this worker has no task kind {task['kind']!r}"})
            continue
        try:
            results.append(handler(task))
        except Exception as e:  # report and go on: one bad point must not sink the run
            traceback.print_exc(file=sys.stderr)
            results.append({"error": f"{type(e).__name__}: {e}"})
    reply = {"results": results, "peak_rss_bytes": peak_rss_bytes(), "versions": versions}
    sys.stdout.write("\n" + json.dumps(reply) + "\n")
    sys.stdout.flush()


def speed_run(prefill_s: float, decode_s: float, batch: int, n_prompt: int, n_decode: int,
              **extra) -> dict:
    """One timed run in the shape every worker reports: prefill of ``batch`` prompts of
    ``n_prompt`` tokens took ``prefill_s`` (to the first token of the last one), then
    ``n_decode - 1`` batched decode steps took ``decode_s``."""
    steps = max(n_decode - 1, 1)
    return {
        "ttft_s": prefill_s,
        "prefill_tok_s": batch * n_prompt / prefill_s,
        "decode_ms": 1000.0 * decode_s / steps,
        "decode_tok_s": batch * steps / decode_s,
        **extra,
    }


class Timer:
    """``with Timer() as t: ...`` then ``t.s`` seconds (perf_counter)."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.t0
