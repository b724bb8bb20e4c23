"""The speed workloads: decode (and batch throughput), prefill, memory. Each is a view of
the same timed points (``Session.speed_point``), so ``all`` times every point once."""

from __future__ import annotations

from bench.session import Session
from bench.systems import System, speed_systems


def _rows(session: Session, workload: str, points: list[tuple[System, int, int]]) -> dict:
    systems = sorted({s for s, _, _ in points}, key=[s for s, _, _ in points].index)
    rows = []
    with session.bar(len(points), workload) as bar:
        for system, context, batch in points:
            bar.set_postfix_str(f"{system.name} {context} tok x{batch}")
            if session.available(system):
                rows.append(session.speed_point(system, context, batch))
            bar.update()
    doc = session.doc(workload, systems, {})
    doc["rows"] = rows
    return doc


def decode(session: Session) -> dict:
    """Decode ms/token and tokens/s at every context, and batch throughput at
    ``batch_context`` for the systems that decode batches."""
    plan = session.plan
    systems = speed_systems(plan)
    points = [(s, n, 1) for s in systems for n in plan.decode_contexts]
    points += [(s, plan.batch_context, b) for s in systems if s.batched for b in plan.batch_sizes
               if (s, plan.batch_context, b) not in points]
    return _rows(session, "decode", points)


def prefill(session: Session) -> dict:
    """Prefill tokens/s and time to first token at every prefill context."""
    plan = session.plan
    return _rows(session, "prefill",
                 [(s, n, 1) for s in speed_systems(plan) for n in plan.prefill_contexts])


def memory(session: Session) -> dict:
    """Device-resident KV bytes (the budget's use), host KV bytes, LSH table bytes (for
    policies that build tables) and peak RSS of the worker process, per context."""
    plan = session.plan
    return _rows(session, "memory",
                 [(s, n, 1) for s in speed_systems(plan) for n in plan.memory_contexts])
