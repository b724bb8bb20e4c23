"""The ``hetero`` command: ``generate``, ``info`` and ``bench`` (driven from ``bench/``).

Results go to stdout (one JSON object with ``--json``); logs and progress go to stderr.
A bad input exits 2 with one line, ``hetero: error: ...``; Ctrl-C at any point exits 130
with ``hetero: interrupted``. Everything the command can check itself (arguments, prompt,
sampling parameters) is checked before the model loads.

The module imports only the standard library: torch and the model stack are imported
inside :func:`main`, where a Ctrl-C during the imports ends the process at once
(``_import_model_stack``) and a later one unwinds to ``main``'s handler.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import threading

logger = logging.getLogger("hetero")

# Caller mistakes (a bad flag, file, model or budget): the message is the whole story.
USAGE_ERRORS = (ValueError, TypeError, OSError, ImportError)
# Failures that may come from an input (an allocation the machine cannot make, a CPU
# worker that died: ``WorkerError`` is a RuntimeError) or from a bug: one line too, but
# naming the exception's type so a bug does not pass for a bad flag; ``-v`` re-raises.
SETUP_ERRORS = (RuntimeError, MemoryError, OverflowError)


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (not usage + message), still exit status 2."""

    def error(self, message: str):
        self.exit(2, f"hetero: error: {_one_line(message)} (see '{self.prog} --help')\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--policy", default="dense", help="dense | streaming | quest | magicpig (default: dense)")
    p.add_argument("--device-kv-budget", default=None, metavar="SIZE", help="device KV memory, e.g. 64MiB, 2GiB or bytes")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page (power of two)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per prefill step (default: 1024 on the CPU, 4096 on CUDA)")
    p.add_argument("--token-budget", type=int, default=None, help="quest: tokens attended per step")
    p.add_argument("--lsh-k", type=int, default=None, help="magicpig: SimHash bits per table (default 8)")
    p.add_argument("--lsh-l", type=int, default=None, help="magicpig: hash tables (default 75)")
    p.add_argument("--n-sink", type=int, default=None, help="attention-sink tokens kept on the device")
    p.add_argument("--n-local", type=int, default=None, help="local-window tokens kept on the device")
    p.add_argument("--dense-layers", type=int, default=None, help="first layers kept exact (sparse policies)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's trained context)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="where CPU workers run: local (threads) or ray (actors; default: a local Ray instance)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --backend ray: join this cluster (host:port of the head, or auto)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="hetero", description="Long-context LLM inference on CPU and GPU.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    i = sub.add_parser("info", help="device, dtype, model, budget and versions")
    _add_model_args(i)

    from bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    return ap


def _import_model_stack() -> None:
    """Import torch and the model stack, a Ctrl-C meanwhile ending the process at once.

    Nothing needs cleaning up yet, and an interrupt is not safe to unwind through these
    imports: torch swallows one that lands in its import of numpy and goes on half
    initialised, and half-imported modules still run their exit hooks."""

    def stop(signum, frame):
        os.write(2, b"hetero: interrupted\n")
        os._exit(130)

    # only where Python's own handler is in place (not where SIGINT is ignored, nor off
    # the main thread, where handlers cannot be set)
    own = (threading.current_thread() is threading.main_thread()
           and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if own:
        signal.signal(signal.SIGINT, stop)
    try:
        import hetero.llm  # noqa: F401
    finally:
        if own:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _make_llm(args):
    from hetero import LLM

    names = ("token_budget", "lsh_k", "lsh_l", "n_sink", "n_local", "dense_layers")
    params = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return LLM(
        model=args.model, device=args.device, dtype=args.dtype, policy=args.policy,
        policy_params=params, device_kv_budget=args.device_kv_budget, page_size=args.page_size,
        prefill_chunk=args.prefill_chunk, max_model_len=args.max_model_len, backend=args.backend,
        ray_address=args.ray_address,
    )


def _read_prompt(args) -> str:
    """The prompt text: ``--prompt``, or ``--prompt-file`` read as UTF-8; never empty."""
    if args.prompt_file is None:
        prompt, source = args.prompt, "--prompt"
    else:
        path, source = args.prompt_file, f"--prompt-file {args.prompt_file}"
        try:
            with open(path, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise ValueError(f"cannot read --prompt-file: {e.strerror or e}: {path}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompt-file is not UTF-8 text ({e.reason}): {path}") from None
    if not prompt:
        raise ValueError(f"the prompt must be non-empty: {source} is empty")
    try:  # an argument with bytes the locale could not decode holds surrogates
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("--prompt is not UTF-8 text") from None
    return prompt


def _generate(args) -> None:
    # the cheap checks first: a bad prompt or parameter fails before the model loads
    prompt = _read_prompt(args)
    _import_model_stack()
    from hetero.device import format_size
    from hetero.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop,
    )
    with _make_llm(args) as llm:
        (out,) = llm.generate(prompt, params, chat=args.chat, progress=True)
    if args.json:
        print(json.dumps(out.to_dict()))
        return
    print(out.text)
    s = out.stats
    print(
        f"[{s.prompt_tokens} prompt tokens, {s.generated_tokens} generated ({out.finish_reason}); "
        f"TTFT {s.ttft_s:.2f} s, decode {s.decode_tokens_per_s:.1f} tok/s; device KV peak "
        f"{format_size(s.device_kv_bytes_peak)} of {format_size(s.device_kv_budget)}; "
        f"host KV {format_size(s.host_kv_bytes)}; h2d {format_size(s.h2d_bytes)}, "
        f"d2h {format_size(s.d2h_bytes)}; per decoded token h2d "
        f"{format_size(int(s.h2d_bytes_per_token))}; page-cache hits {s.cache_hit_rate:.0%}"
        + (f"; LSH tables {format_size(s.lsh_table_bytes)}" if s.lsh_table_bytes else "") + "]",
        file=sys.stderr,
    )


def _info(args) -> None:
    _import_model_stack()
    with _make_llm(args) as llm:
        rows = _info_rows(args, llm)
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")


def _info_rows(args, llm) -> dict[str, str]:
    import numba
    import torch
    import transformers
    import triton

    from hetero.device import format_size

    cfg = llm.config
    return {
        "device": str(llm.device.device),
        "dtype": str(llm.dtype).removeprefix("torch."),
        "model": f"{llm.model_name} ({cfg.model_type}, {cfg.n_layers} layers, {cfg.n_heads} q / "
        f"{cfg.n_kv_heads} kv heads, head_dim {cfg.head_dim})",
        "context limit": str(llm.max_model_len),
        "policy": args.policy,
        "backend": llm.backend.describe(),
        "device KV budget": f"{format_size(llm.store.budget)} "
        f"({llm.store.allocator.n_pages} pages of {llm.store.page_size} tokens)",
        "KV per token": format_size(cfg.kv_bytes_per_token(llm.dtype.itemsize)),
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numba": numba.__version__,
        "transformers": transformers.__version__,
    }


def _bench(args) -> None:
    from bench.cli import run

    run(args)


COMMANDS = {"generate": _generate, "info": _info, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    """Run ``hetero`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Everything runs inside the handlers, parsing and the imports of torch and the model
    included, so Ctrl-C exits 130 without a traceback wherever it lands."""
    verbose = False
    try:
        args = _parser().parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
            format="%(levelname)s %(name)s: %(message)s",
        )
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("hetero: interrupted", file=sys.stderr)
        # CPython remembers a KeyboardInterrupt that left an exec() of a string (dataclasses
        # and namedtuples are made that way, so one landing in an import often does) and,
        # under ``python -m``, exits by SIGINT instead of with our status; an exec() that
        # completes clears the memory
        exec("")
        return 130
    except (*USAGE_ERRORS, *SETUP_ERRORS) as e:
        if verbose:
            raise
        print(f"hetero: error: {_describe_error(e)}", file=sys.stderr)
        return 2
    return 0


def _describe_error(e: BaseException) -> str:
    """``e`` as one line; with its type (and where to see more) unless it is a usage error."""
    msg = _one_line(str(e))
    if isinstance(e, USAGE_ERRORS):
        return msg or type(e).__name__
    return f"{type(e).__name__}{': ' + msg if msg else ''} (run with -v for the traceback)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
