"""``hetero bench``: argument parsing and the driver that writes JSON, report and plots.

    hetero bench decode|prefill|fidelity|memory|kernels|all [--quick] [--out DIR] [--peers ...]
    hetero bench longctx [--quick] [--contexts N ...] [--out DIR]   # bench.longctx; not in 'all'
    hetero bench runahead [--quick] [--contexts N ...] [--repeats N] [--out DIR]  # bench.runahead; not in 'all'
    hetero bench needles [--quick | --past] [--contexts N ...] [--out DIR]  # bench.needle_suite; not in 'all'
    hetero bench setup [--peers ...] [--force]      # build the peers' venvs
    hetero bench report [--out DIR]                 # report.md + PNGs from DIR/*.json
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

from bench.results import WORKLOADS

logger = logging.getLogger(__name__)

COMMANDS = (*WORKLOADS, "all", "setup", "report")
PEER_NAMES = ("kvpress", "llamacpp")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to ``hetero``'s subparsers (registered in pyproject.toml as
    the entry point ``bench`` of the group ``hetero.commands``)."""
    b = sub.add_parser(
        "bench", help="benchmarks side by side with peers: JSON, report.md and PNG plots",
        description="Time and check hetero against HF transformers, kvpress and llama.cpp on "
        "the embedded model and real text. Each workload writes DIR/<workload>.json; "
        "'all' also writes DIR/report.md and DIR/<workload>.png.")
    b.add_argument("what", choices=COMMANDS, help="workload to run, or setup / report")
    b.add_argument("--quick", action="store_true",
                   help="small lengths, one repeat (under 10 minutes on 2 cores)")
    b.add_argument("--out", type=Path, default=None,
                   help="output directory (default bench/out/quick or bench/out/full)")
    b.add_argument("--peers", nargs="*", default=list(PEER_NAMES), choices=PEER_NAMES,
                   help="peers in their own venvs to include (HF transformers always runs)")
    b.add_argument("--no-setup", action="store_true",
                   help="do not build missing peers; report them as missing")
    b.add_argument("--force", action="store_true", help="setup: rebuild the peers from scratch")
    b.add_argument("--contexts", type=int, nargs="+", default=None,
                   help="override the decode, prefill and memory context lengths")
    b.add_argument("--repeats", type=int, default=None, help="override the repeats per point")
    b.add_argument("--resume", action="store_true",
                   help="reuse the speed points an interrupted run timed (DIR/*.json and "
                        "DIR/points.jsonl, where each point is journaled as it is timed)")
    b.add_argument("--past", action="store_true",
                   help="needles: actqkv at 16k, past the trained context, instead of the full run")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(run=run)
    return b


def plan_from_args(args):
    """The plan ``args`` ask for (``--quick`` and the overrides)."""
    from bench.plan import FULL, QUICK

    plan = QUICK if args.quick else FULL
    if args.contexts:
        if any(n < 64 for n in args.contexts):
            raise ValueError("--contexts must be at least 64 tokens")
        plan = replace(plan, decode_contexts=tuple(args.contexts),
                       prefill_contexts=tuple(args.contexts), memory_contexts=tuple(args.contexts),
                       batch_context=min(plan.batch_context, max(args.contexts)))
    if args.repeats is not None:
        if args.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        plan = replace(plan, repeats=args.repeats)
    return plan


def out_dir(args) -> Path:
    return args.out or Path("bench/out") / ("quick" if args.quick else "full")


def write_report(out: Path) -> Path:
    """``report.md`` and one PNG per workload from the JSON documents in ``out``."""
    from bench.findings import findings
    from bench.plots import plot_all
    from bench.report import render
    from bench.results import read_doc

    docs = {w: read_doc(out / f"{w}.json") for w in WORKLOADS if (out / f"{w}.json").is_file()}
    if not docs:
        raise ValueError(f"no result documents (<workload>.json) in {out}")
    plot_all(docs, out)
    path = out / "report.md"
    path.write_text(render(docs, findings(docs)))
    return path


def run(args) -> None:
    """Carry out ``hetero bench ...``."""
    from bench import peers

    out = out_dir(args)
    if args.what == "setup":
        for name in args.peers:
            st = peers.setup(name, force=args.force)
            print(f"{name}: {st.state}{': ' + st.reason if st.reason else ''}")
        return
    if args.what == "report":
        print(write_report(out))
        return
    if args.what == "longctx":  # hetero alone (no peers); hours on 2 cores, so not in 'all'
        from bench import longctx

        spec = longctx.QUICK if args.quick else longctx.DEFAULT
        spec = replace(spec, lengths=tuple(args.contexts)) if args.contexts else spec
        print(longctx.run(spec, out, progress=not args.no_progress, quick=args.quick))
        return

    if args.what == "runahead":  # the chain prefill against one process; not in 'all'
        from bench import runahead

        spec = runahead.QUICK if args.quick else runahead.DEFAULT
        spec = replace(spec, lengths=tuple(args.contexts)) if args.contexts else spec
        spec = replace(spec, repeats=(args.repeats,)) if args.repeats else spec
        print(runahead.run(spec, out, quick=args.quick))
        return

    if args.what == "needles":  # the needle suite, every sparse policy at shares of the keys; not in 'all'
        from bench import needle_suite

        spec = needle_suite.QUICK if args.quick else needle_suite.PAST if args.past else needle_suite.DEFAULT
        if args.contexts:
            at = sorted(spec.cells)
            spec = replace(spec, cells={n: v for n, v in spec.cells.items() if n in args.contexts})
            if not spec.cells:
                raise ValueError(f"--contexts: the needle suite runs at {at}")
        print(needle_suite.run(spec, out, progress=not args.no_progress, quick=args.quick))
        return

    from bench.fidelity import fidelity
    from bench.kernels import kernels
    from bench.results import write_doc
    from bench.session import Session
    from bench.speed import decode, memory, prefill

    plan = plan_from_args(args)
    session = Session(plan, out, args.quick, list(args.peers), setup=not args.no_setup,
                      progress=not args.no_progress, resume=args.resume)
    for name, st in session.peers.items():
        if st.state != "ok":
            logger.warning("peer %s %s: %s", name, st.state, st.reason)
    workloads = {"decode": decode, "prefill": prefill, "fidelity": fidelity, "memory": memory,
                 "kernels": kernels}
    todo = list(workloads) if args.what == "all" else [args.what]
    for name in todo:
        path = write_doc(workloads[name](session), out)
        print(path)
    if args.what == "all":
        print(write_report(out))
    sys.stdout.flush()
