"""The ``hetero`` command: ``generate``, ``prefill`` (a document's KV saved to a file, which
``generate --kv-cache`` continues), ``info``, and the subcommands other packages register as
entry points of the group ``hetero.commands`` (``bench``, from ``bench/``).

Results go to stdout (one JSON object with ``--json``); logs and progress go to stderr.
A bad input exits 2 with one line, ``hetero: error: ...``; Ctrl-C at any point exits 130
with ``hetero: interrupted``. Everything the command can check itself (arguments, prompt,
sampling parameters) is checked before the model loads.

The module imports only the standard library (and ``hetero.backend``'s registry, which is
as light): torch and the model stack are imported inside :func:`main`, where a Ctrl-C
during the imports ends the process at once (``_import_model_stack``) and a later one
unwinds to ``main``'s handler. The policies and their options come from the registry
``hetero.policies.POLICIES``, imported once the arguments are parsed (or for ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import signal
import sys
import threading
from importlib.metadata import entry_points

from hetero.backend import backend_names

logger = logging.getLogger("hetero")

# Caller mistakes (a bad flag, file, model or budget): the message is the whole story.
USAGE_ERRORS = (ValueError, TypeError, OSError, ImportError)
# Failures that may come from an input (an allocation the machine cannot make, a CPU
# worker that died: ``WorkerError`` is a RuntimeError) or from a bug: one line too, but
# naming the exception's type so a bug does not pass for a bad flag; ``-v`` re-raises.
SETUP_ERRORS = (RuntimeError, MemoryError, OverflowError)
COMMAND_GROUP = "hetero.commands"  # entry points: name = add_parser(subparsers), see _parser
# Today's dedicated policy flags, aliases of --policy-param NAME=VALUE.
POLICY_FLAGS = {"--token-budget": "token_budget", "--lsh-k": "lsh_k", "--lsh-l": "lsh_l",
                "--n-sink": "n_sink", "--n-local": "n_local", "--dense-layers": "dense_layers"}


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (not usage + message), still exit status 2; the help of
    a command with ``--policy`` lists the registered policies and their options."""

    def error(self, message: str):
        self.exit(2, f"hetero: error: {_one_line(message)} (see '{self.prog} --help')\n")

    def format_help(self) -> str:
        policy = next((a for a in self._actions if a.dest == "policy"), None)
        if policy is not None:
            _import_model_stack()
            from hetero.policies import POLICIES

            policy.choices = list(POLICIES)
            self.epilog = _policies_help(POLICIES)
        return super().format_help()


class _PolicyFlag(argparse.Action):
    """A dedicated flag, ``--n-sink N``: appends ``("n_sink", "N")`` to ``--policy-param``."""

    def __call__(self, parser, namespace, values, option_string=None):
        pairs = list(getattr(namespace, self.dest) or [])
        setattr(namespace, self.dest, [*pairs, (POLICY_FLAGS[option_string], str(values))])


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or GGUF file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")
    p.add_argument("--weights", choices=("dense", "quantized", "q4_0", "q4_1", "q8_0"), default="dense",
                   help="how the linear layers' weights are held: dense (the compute dtype), quantized "
                        "(a GGUF's Q4_0/Q4_1/Q8_0 blocks, numba GEMV), or a format to quantise any "
                        "model to at load; CPU only")
    p.add_argument("--policy", default="dense", help="decode-attention policy (default: dense); the "
                   "policies and their options are listed below")
    p.add_argument("--policy-param", action="append", default=[], type=_name_value,
                   metavar="NAME=VALUE", help="an option of the policy (repeatable), e.g. token_budget=512")
    p.add_argument("--device-kv-budget", default=None, metavar="SIZE", help="device KV memory, e.g. 64MiB, 2GiB or bytes")
    p.add_argument("--page-size", type=int, default=None,
                   help="tokens per KV page (power of two; default: the policy's, 8 for quest, else 16)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per prefill step (default: 1024 on the CPU, 4096 on CUDA)")
    for flag, name in POLICY_FLAGS.items():
        p.add_argument(flag, type=int, action=_PolicyFlag, dest="policy_param", metavar="N",
                       help=f"--policy-param {name}=N")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's trained context)")
    p.add_argument("--backend", default="local", choices=backend_names(),
                   help="where CPU workers run: a backend registered under the entry points "
                   "hetero.backends (default: local, threads in this process)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --backend ray: join this cluster (host:port of the head, or auto)")


def _policies_help(policies: dict) -> str:
    """The epilog of ``--help``: each policy of the registry with its options and defaults."""
    from hetero.policies import policy_options

    width = max(map(len, policies))
    lines = ["policies (hetero.policies.POLICIES) and their options (--policy-param NAME=VALUE):"]
    for name, cls in policies.items():
        opts = []
        for f in policy_options(cls).values():
            if f.default is not dataclasses.MISSING:
                opts.append(f"{f.name}={f.default!r}")
            else:
                opts.append(f"{f.name} ({f.type if isinstance(f.type, str) else f.type.__name__})")
        lines.append(f"  {name:<{width}}  {' '.join(opts) or '(none)'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The parser: the built-in commands, then those registered under ``hetero.commands``.

    Such an entry point is a function ``add_parser(subparsers)`` that adds the command (named
    as the entry point) and sets its ``run`` default to a function of the parsed arguments.
    """
    ap = _Parser(prog="hetero", description="Long-context LLM inference on CPU and GPU.")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter  # keeps the policies' epilog as it is laid out

    g = sub.add_parser("generate", help="generate text for one prompt", formatter_class=raw)
    g.set_defaults(run=_generate)
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (with "
                   "--kv-cache: close the user turn the saved document opened)")
    g.add_argument("--kv-cache", metavar="KV_FILE", default=None,
                   help="continue from a document's KV saved by 'hetero prefill': the prompt is a question, "
                   "tokenised on its own (no BOS) and prefilled on top of it")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    p = sub.add_parser("prefill", help="prefill a document once and save its KV to a file",
                       formatter_class=raw)
    p.set_defaults(run=_prefill)
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", help="read the document from this file")
    src.add_argument("--prompt", help="the document's text")
    p.add_argument("--out", required=True, metavar="KV_FILE",
                   help="write the KV here (safetensors, written atomically)")
    p.add_argument("--chat", action="store_true", help="open a user turn of the chat template with the "
                   "document ('hetero generate --kv-cache KV_FILE --chat' closes it)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="prefill in a chain of N worker processes (KV-Runahead); 1: in this process")

    i = sub.add_parser("info", help="device, dtype, model, budget and versions", formatter_class=raw)
    i.set_defaults(run=_info)
    _add_model_args(i)

    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name):
        if ep.name in sub.choices:
            continue
        try:
            add_parser = ep.load()
        except Exception as e:  # a broken command fails when it is used, not every command
            # no prefix characters: every argument is taken as it comes, none is refused
            p = sub.add_parser(ep.name, help=f"(cannot load: {_one_line(str(e))})",
                               prefix_chars="\0", add_help=False)
            p.add_argument("args", nargs="*")
            p.set_defaults(run=_cannot_load(ep.name, e))
        else:
            add_parser(sub)
    return ap


def _cannot_load(name: str, error: Exception):
    def run(args):
        raise ImportError(f"the {name!r} command cannot load: {type(error).__name__}: {error}")

    return run


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
    from hetero.policies import parse_policy_params

    return LLM(
        model=args.model, device=args.device, dtype=args.dtype, policy=args.policy,
        policy_params=parse_policy_params(args.policy, args.policy_param),
        device_kv_budget=args.device_kv_budget, page_size=args.page_size,
        prefill_chunk=args.prefill_chunk, max_model_len=args.max_model_len, backend=args.backend,
        ray_address=args.ray_address, weights=args.weights,
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
    if args.kv_cache is not None and not os.path.isfile(args.kv_cache):
        what = "Is a directory" if os.path.isdir(args.kv_cache) else "No such file or directory"
        raise ValueError(f"cannot read --kv-cache: {what}: {args.kv_cache}")
    _import_model_stack()
    from hetero.device import format_size
    from hetero.kvcache import KVCache
    from hetero.sampling import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop,
    )
    kv = None if args.kv_cache is None else KVCache.load(args.kv_cache)  # a bad file fails here
    with _make_llm(args) as llm:
        (out,) = llm.generate(prompt, params, chat=args.chat, progress=True, kv_cache=kv)
    if args.json:
        print(json.dumps(out.to_dict()))
        return
    print(out.text)
    s = out.stats
    saved = "" if kv is None else f" on {kv.n_tokens} saved"
    print(
        f"[{s.prompt_tokens} prompt tokens{saved}, {s.generated_tokens} generated ({out.finish_reason}); "
        f"TTFT {s.ttft_s:.2f} s, decode {s.decode_tokens_per_s:.1f} tok/s; device KV peak "
        f"{format_size(s.device_kv_bytes_peak)} of {format_size(s.device_kv_budget)}; "
        f"host KV {format_size(s.host_kv_bytes)}; h2d {format_size(s.h2d_bytes)}, "
        f"d2h {format_size(s.d2h_bytes)}; per decoded token h2d "
        f"{format_size(int(s.h2d_bytes_per_token))}; page-cache hits {s.cache_hit_rate:.0%}"
        + "".join(f"; {name} {format_size(v) if name.endswith('_bytes') else v}"
                  for name, v in s.policy.items() if isinstance(v, (int, float))) + "]",
        file=sys.stderr,
    )


def _prefill(args) -> None:
    # the cheap checks first: the document, --out and --workers fail before the model loads
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    prompt = _read_prompt(args)
    _check_out(args.out)
    _import_model_stack()
    from hetero.device import format_size

    with _make_llm(args) as llm:
        kv = llm.prefill(prompt, workers=args.workers, chat=args.chat, progress=True)
    path = kv.save(args.out)
    print(f"saved the KV of {kv.n_tokens} tokens ({format_size(path.stat().st_size)}) to {path}")


def _check_out(path: str) -> None:
    """``--out`` names a file in a directory that exists and that we may write to."""
    if os.path.isdir(path):
        raise ValueError(f"--out is a directory, name a file in it: {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write --out: No such directory: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --out: Permission denied: {parent}")


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
        args.run(args)
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
