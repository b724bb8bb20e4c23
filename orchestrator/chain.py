"""KV-Runahead's chain prefill over local worker processes (``torch.distributed``).

Worker ``i`` of ``P`` computes the prompt's tokens ``[s_i, s_{i+1})`` (``bounds``; later
parts shorter, ``orchestrator.partition``) layer by layer (``orchestrator.chain_part``): at
each layer a blocking ``recv`` from worker ``i - 1`` of the earlier parts' K/V (their size is
known from the bounds), its own appended, an ``isend`` of the grown K/V to worker ``i + 1``
(the handles kept, with the tensors, and waited for: at most two layers' K/V in flight),
then the attention. Point to point, no all-gather. The last worker sends the launcher the
last token's logits first (the time to first token), then every layer's whole K/V.

Processes: ``torch.multiprocessing``'s spawn context. Spawn starts a fresh interpreter
(fork would copy the launcher's OpenMP and gloo threads, or a Ray or CUDA state, into a
child that cannot use them); a ``Process`` has a sentinel the launcher waits on beside the
pipes, so a worker's death is seen at once; and torch's pipes pass the result tensors
through shared memory rather than as pickled bytes. (A module entry point run with
``subprocess`` isolates as well, but would need its own tensor transport.) Each worker sets
``torch.set_num_threads(threads)`` (default: the machine's cores over the workers), so the
workers share the cores; each loads the model as ``hetero.LLM`` does (dense weights). As
with any spawn-based launcher, a script that starts a chain must keep its main code under
``if __name__ == "__main__":`` (the workers import the main module; the ``hetero`` command
and ``python -m`` entry points do).

Rendezvous: the launcher holds a ``TCPStore`` on localhost, port 0 (the OS picks a free
one: no race for it); the workers join the process group through it, gloo's sockets on
the loopback interface (``GLOO_SOCKET_IFNAME=lo`` unless set otherwise). The backend follows
the device: ``gloo`` on the CPU, ``nccl`` on CUDA (one GPU per worker, rank modulo the
GPUs; only gloo is tested here).

Faults: the launcher waits on the workers' pipes and process sentinels together. A worker
that dies, or reports an error (e.g. its ``recv`` failed because its neighbour died), fails
the prefill with a :class:`ChainError` naming the worker and its tokens, after a short grace
to collect what the others report; every worker is then killed (the process group cannot
recover). A silence longer than ``timeout_s`` (also gloo's timeout on each send and
receive) fails the same way. The launcher writes nothing: a caller saving the result does
so afterwards, atomically (``hetero.kvcache.KVCache.save``).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from hetero.backend import ChainProgress, ChainResult, WorkerError
from hetero.model import Transformer
from orchestrator.chain_part import load_model, run_part

logger = logging.getLogger(__name__)

TIMEOUT_S = 120.0  # longest silence of the workers during a prefill (and gloo's timeout)
START_TIMEOUT_S = 600.0  # longest start-up (spawn, model load: a GGUF is converted once)
GRACE_S = 1.0  # after a failure, time to collect the other workers' reports


class ChainError(WorkerError):
    """A chain prefill failed: a worker died, failed or went silent (named in the message)."""


def backend_name(device: torch.device | str) -> str:
    """The ``torch.distributed`` backend for workers on ``device``: nccl on CUDA, else gloo."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of ``workers`` workers sharing this machine's cores."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


@dataclass(frozen=True)
class _Spec:
    """What a worker process is started with (pickled by spawn)."""

    rank: int
    world: int
    port: int
    source: str | None
    dtype: torch.dtype
    device: str
    threads: int
    timeout_s: float


class Chain:
    """``workers`` processes holding the model, in a chain, ready to prefill prompts.

    Parameters
    ----------
    source : the model, as ``hetero.loader.load_checkpoint`` takes it (None: embedded).
    dtype : the weights' and the KV's dtype.
    workers : processes in the chain (>= 1).
    device : "cpu" (gloo) or "cuda" (nccl; worker ``i`` on GPU ``i % device_count``).
    threads : torch threads per worker; default :func:`threads_per_worker`.
    timeout_s : longest silence of the workers during a prefill; gloo's timeout.
    start_timeout_s : longest start-up.

    ``with Chain(...) as chain: chain.prefill(ids, bounds)``: the workers start on entering
    (the start-up time is ``startup_s``) and are stopped on leaving. After a failure the
    chain is closed; start a new one.
    """

    def __init__(self, source: str | None, dtype: torch.dtype = torch.float32, workers: int = 2,
                 device: str = "cpu", threads: int | None = None, timeout_s: float = TIMEOUT_S,
                 start_timeout_s: float = START_TIMEOUT_S):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if torch.device(device).type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.source, self.dtype, self.workers, self.device = source, dtype, workers, str(device)
        self.threads = threads_per_worker(workers) if threads is None else threads
        self.timeout_s, self.start_timeout_s = float(timeout_s), float(start_timeout_s)
        self.startup_s = 0.0
        self.n_layers = 0
        self._procs: list = []
        self._conns: list = []
        self._store = None
        self._bounds: list[int] | None = None  # of the last prefill, to name the parts
        self._busy = False  # a prefill is under way
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (started or dead)."""
        return [p.pid for p in self._procs]

    def __enter__(self) -> Chain:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Spawn the workers; return when every one has loaded the model and joined the
        process group. Raises :class:`ChainError` naming a worker that failed to."""
        if self._procs or self._closed:
            raise RuntimeError("a Chain starts once")
        t0 = time.monotonic()
        self._store = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=self.start_timeout_s),
                                    wait_for_workers=False)
        ctx = mp.get_context("spawn")
        try:
            for rank in range(self.workers):
                ours, theirs = ctx.Pipe()
                spec = _Spec(rank, self.workers, self._store.port, self.source, self.dtype, self.device,
                             self.threads, self.timeout_s)
                proc = ctx.Process(target=_worker_main, args=(spec, theirs), daemon=True,
                                   name=f"hetero-chain-{rank}")
                proc.start()
                theirs.close()
                self._procs.append(proc)
                self._conns.append(ours)
            ready = set()
            while len(ready) < self.workers:
                for rank, msg in self._messages(self.start_timeout_s, "starting"):
                    if msg[0] == "ready":
                        ready.add(rank)
                        self.n_layers = msg[1]
        except BaseException:
            self._kill()
            raise
        self.startup_s = time.monotonic() - t0

    def prefill(self, token_ids: list[int], bounds: list[int], progress: ChainProgress | None = None,
                partition: str = "given") -> ChainResult:
        """Prefill ``token_ids``, worker ``i`` computing ``[bounds[i], bounds[i+1])``.

        ``progress(worker, layers_done, n_layers)`` is called here as workers finish layers;
        ``partition`` is recorded in the result. Raises :class:`ChainError` (the chain is
        closed then) when a worker dies, fails or is silent for ``timeout_s``.
        """
        ids = [int(t) for t in token_ids]
        _check_bounds(bounds, len(ids), self.workers)
        if self._closed or not self._procs:
            raise RuntimeError("the chain is not running: use it as `with Chain(...) as chain:`")
        self._bounds, self._busy = list(bounds), True
        t0 = time.monotonic()
        try:
            for rank, conn in enumerate(self._conns):
                conn.send(("job", ids[bounds[rank]:bounds[rank + 1]], self._bounds))
        except OSError:
            self._fail({}, "while being handed the prompt")
        logits, t_logits, stats, kv = None, 0.0, {}, None
        while len(stats) < self.workers:
            for rank, msg in self._messages(self.timeout_s, "prefilling"):
                if msg[0] == "layer" and progress is not None:
                    progress(rank, msg[1], self.n_layers)
                elif msg[0] == "logits":
                    logits, t_logits = msg[1], time.monotonic()
                elif msg[0] == "done":
                    stats[rank] = msg[1]
                    kv = msg[2] if msg[2] is not None else kv
        t_kv = time.monotonic()
        self._busy = False
        n, (k_all, v_all) = len(ids), kv
        return ChainResult(
            token_ids=ids, k=[k_all[layer, :n] for layer in range(self.n_layers)],
            v=[v_all[layer, :n] for layer in range(self.n_layers)], logits=logits, bounds=list(bounds),
            partition=partition, busy_s=[stats[r]["busy_s"] for r in range(self.workers)],
            wait_s=[stats[r]["wait_s"] for r in range(self.workers)], ttft_s=t_logits - t0,
            kv_s=t_kv - t_logits)

    def close(self) -> None:
        """Stop the workers (killed if they do not stop within a few seconds). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self._busy:  # a worker mid-prefill (Ctrl-C, an error in progress) is killed
            for conn in self._conns:
                try:
                    conn.send(None)
                except OSError:
                    pass
            for proc in self._procs:
                proc.join(5)
        self._kill()

    # -- the launcher's side of the pipes ----------------------------------------------------

    def _messages(self, timeout_s: float, doing: str) -> list[tuple[int, tuple]]:
        """The ``(rank, message)`` pairs that arrive next (at least one): a worker's death
        (its pipe closes, its sentinel fires), an error report, or ``timeout_s`` without any
        message fails the chain (:meth:`_fail`)."""
        conns = {c: r for r, c in enumerate(self._conns)}
        sentinels = [p.sentinel for p in self._procs]
        ready = multiprocessing.connection.wait([*conns, *sentinels], timeout_s)
        if not ready:
            self._fail({}, f"while {doing}: no worker reported for {timeout_s:.0f} s")
        got = []
        for conn in (obj for obj in ready if obj in conns):
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # its end closed: the worker is gone
                self._fail({}, f"while {doing}")
            if msg[0] == "error":
                self._fail({conns[conn]: msg[1]}, f"while {doing}")
            got.append((conns[conn], msg))
        if not got:  # a process ended, which no job asks of it
            self._fail({}, f"while {doing}")
        return got

    def _fail(self, errors: dict[int, str], when: str) -> None:
        """Collect for ``GRACE_S`` which workers died and what the others reported, kill them
        all and raise a ChainError naming the dead first (the cause), then the reports."""
        deadline = time.monotonic() + GRACE_S
        live, closed = {c: r for r, c in enumerate(self._conns)}, []
        while live and time.monotonic() < deadline:
            for conn in multiprocessing.connection.wait(list(live), max(0.0, deadline - time.monotonic())):
                rank = live[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    closed.append(live.pop(conn))
                    continue
                if msg[0] == "error":
                    errors.setdefault(rank, msg[1])
        for rank in closed:  # its pipe closed as it exited: its exit code comes a moment later
            self._procs[rank].join(max(0.1, deadline - time.monotonic()))
        dead = {r: p.exitcode for r, p in enumerate(self._procs) if p.exitcode is not None}
        self._kill()
        self._closed = True
        parts = [f"{self._name(r)} died ({_exit_text(code)})" for r, code in sorted(dead.items())
                 if r not in errors]
        parts += [f"{self._name(r)} failed: {text}" for r, text in sorted(errors.items())]
        if not parts:
            parts = ["the workers stopped answering"]
        hint = ""
        if self._bounds is None and any(code == 1 for r, code in dead.items() if r not in errors):
            hint = (" (a worker that exits while starting, reporting nothing, often means the main "
                    "script lacks `if __name__ == '__main__':`: spawned workers import it)")
        raise ChainError(f"chain prefill failed {when}: {'; '.join(parts)}; the other workers were "
                         f"stopped{hint}")

    def _name(self, rank: int) -> str:
        where = "" if self._bounds is None else \
            f", prompt tokens {self._bounds[rank]}:{self._bounds[rank + 1]}"
        return f"worker {rank} (pid {self._procs[rank].pid}{where})"

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self._procs:
            proc.join(10)
        for conn in self._conns:
            conn.close()
        self._conns, self._store = [], None


def _check_bounds(bounds: list[int], n: int, workers: int) -> None:
    ok = (len(bounds) == workers + 1 and bounds[0] == 0 and bounds[-1] == n
          and all(isinstance(b, int) for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:])))
    if not ok:
        raise ValueError(f"bounds must be {workers + 1} increasing integers from 0 to the prompt's {n} "
                         f"tokens, got {bounds!r}")


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# -- the worker process -----------------------------------------------------------------------


def _worker_main(spec: _Spec, conn) -> None:
    """A worker: load the model, join the group, run jobs until told to stop (None) or the
    launcher goes away. An error is reported (one line and the innermost frame) and ends
    the process."""
    torch.set_num_threads(spec.threads)
    try:
        device = torch.device(spec.device)
        if device.type == "cuda":
            device = torch.device("cuda", spec.rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:  # the workers are on this machine: gloo's sockets stay on the loopback interface
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        net = load_model(spec.source, spec.dtype, device)
        store = dist.TCPStore("127.0.0.1", spec.port, None, False, timedelta(seconds=spec.timeout_s))
        dist.init_process_group(backend_name(device), store=store, rank=spec.rank, world_size=spec.world,
                                timeout=timedelta(seconds=spec.timeout_s))
        conn.send(("ready", net.cfg.n_layers))
        while (job := conn.recv()) is not None:
            _, ids, bounds = job
            _run_job(net, spec, conn, ids, bounds)
    except (EOFError, BrokenPipeError):  # the launcher went away: nothing to report to
        os._exit(0)
    except BaseException as e:  # noqa: BLE001 - reported to the launcher, then the process ends
        frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
        text = str(e).splitlines()[0] if str(e) else ""
        text = text if len(text) <= 160 else text[:160] + "..."  # gloo's run on for lines
        try:
            conn.send(("error", f"{type(e).__name__}: {text}{where}"))
        except OSError:
            pass
        os._exit(1)  # not through gloo's teardown, which may wait for the peer that failed
    os._exit(0)


def _wire(t: Tensor) -> Tensor:
    """``t`` (contiguous) as bytes: every dtype travels, whatever the backend supports."""
    return t.view(torch.uint8)


class _GlooLink:
    """The :class:`orchestrator.chain_part.Link` of the process group: a blocking ``recv``
    from the previous rank; an ``isend`` to the next whose handles are kept with the tensors
    they send and waited for, at most two layers' K/V in flight."""

    def __init__(self, rank: int):
        self.rank = rank
        self.sends: deque = deque()

    def recv(self, layer: int, k: Tensor, v: Tensor) -> None:
        dist.recv(_wire(k), self.rank - 1)
        dist.recv(_wire(v), self.rank - 1)

    def send(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.sends.append(([dist.isend(_wire(k), self.rank + 1), dist.isend(_wire(v), self.rank + 1)], k, v))
        self._settle(2)

    def flush(self) -> None:
        self._settle(0)

    def _settle(self, keep: int) -> None:
        while len(self.sends) > keep:
            for work in self.sends.popleft()[0]:
                work.wait()


def _run_job(net: Transformer, spec: _Spec, conn, ids: list[int], bounds: list[int]) -> None:
    """This worker's part (``orchestrator.chain_part.run_part``) over the process group;
    progress per layer, the logits (last worker), then busy/wait times (and the K/V) go to
    the launcher."""
    out = run_part(net, ids, bounds, spec.rank, _GlooLink(spec.rank), lambda n: conn.send(("layer", n)))
    if out.logits is not None:
        conn.send(("logits", out.logits))
    kv = None if out.k is None else (out.k.cpu(), out.v.cpu())
    conn.send(("done", {"busy_s": out.busy_s, "wait_s": out.wait_s}, kv))
