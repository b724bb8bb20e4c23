"""The fidelity workload: passkey accuracy, attention-output error and perplexity delta of
the sparse systems against exact attention, at several KV budgets.

- needle: a passkey in ~1.3k tokens of real text (where the embedded model finds it with
  full attention), at several depths; accuracy per budget.
- attention_error: relative error of each decode step's attention output against exact
  attention over the whole KV (``hetero.probe.AttentionProbe``; hetero only, the sparse
  layers only). magicpig and, within the trained context, actqkv run at their defaults and
  the others at the keys they touched (``attention_error_matched``, each row naming the
  system it is ``matched`` to).
- perplexity: teacher-forced perplexity of a real continuation through the system's decode
  attention (``LLM.decode_logprobs``), and its delta against the same family's exact run (hetero dense for hetero,
  HF without a press for kvpress).

Budgets are ``plan.fractions`` of the context in hetero's sparse layers; a kvpress press
keeps the same share of all KV (``systems.kv_share``).
"""

from __future__ import annotations

import math
from dataclasses import replace

from bench import peers
from bench.corpus import needle_cases
from bench.results import summary
from bench.session import Session
from bench.systems import System, hetero, hetero_llm_args, hetero_sparse, kv_share, kvpress
from hetero.probe import TopKOracle, probe_attention

SPARSE = ("quest", "streaming")
ORACLE = System("oracle-topk", "hetero", "oracle token top-k (exact scores; a bound, not a runtime)",
                {"policy": "dense"}, sparse=True)
EVERY_BLOCK = 100_000  # more blocks than any error context has
ACTQKV = hetero("actqkv", dense_layers=0)  # at its defaults; keeps no layer dense
ACTQKV_EVERY_BLOCK = replace(
    hetero("actqkv", dense_layers=0, top_blocks=EVERY_BLOCK, min_blocks=EVERY_BLOCK, final_blocks=EVERY_BLOCK),
    name="hetero-actqkv-every-block", label="hetero actqkv, every block selected (bounded positions alone)")
KVPRESS_EXACT = System("kvpress-none", "kvpress", "HF in the kvpress venv, no press (exact)",
                       {"press": None})


def forced_nll(llm, context: list[int], continuation: list[int]) -> float:
    """Mean negative log-likelihood (nats) of ``continuation[1:]`` after ``context``, every
    token scored by a decode step through ``llm``'s policy (``LLM.decode_logprobs``)."""
    logprobs = llm.decode_logprobs(context, continuation)
    return -sum(logprobs) / len(logprobs)


def _budget(fraction: float, n: int) -> int:
    return max(int(fraction * n), 40)


def _magicpig(plan) -> System:
    """magicpig at its default K and L (its keys touched are measured, not set)."""
    return hetero("magicpig", dense_layers=plan.dense_layers)


def _sparse(policy: str, budget: int, dense_layers: int) -> System:
    return hetero_sparse(policy, budget, dense_layers, n_local=min(64, max(16, budget // 4)))


class _Fidelity:
    def __init__(self, session: Session):
        self.s, self.plan = session, session.plan
        tok = session.tokenizer
        self.cases = [
            (c, tok(c.context, add_special_tokens=False)["input_ids"],
             tok(c.question, add_special_tokens=False)["input_ids"])
            for c in needle_cases(list(self.plan.needle_depths))
        ]
        self.rows: list[dict] = []

    def row(self, system: System, test: str, context: int, fraction: float | None,
            metrics: dict, **extra) -> None:
        dense = system.params.get("dense_layers", self.plan.dense_layers)
        share = 1.0 if fraction is None else kv_share(_budget(fraction, context) / context, dense)
        self.rows.append({"system": system.name, "test": test, "context": context,
                          "fraction": fraction, "kv_fraction": share,
                          "labels": self.s.labels(context), "metrics": metrics, **extra})

    # -- hetero (in this process) --------------------------------------------------------

    def llm(self, system: System, max_len: int):
        from hetero import LLM

        return LLM(device="cpu", **hetero_llm_args(system, self.plan, self.s.config, max_len))

    def hetero_configs(self, n: int) -> list[tuple[System, float | None]]:
        return [(hetero("dense"), None)] + [
            (_sparse(p, _budget(f, n), self.plan.dense_layers), f) for p in SPARSE for f in self.plan.fractions
        ]

    def needle_tokens(self) -> int:
        """Mean length of the passkey prompts (budgets are shares of it)."""
        return round(sum(len(c) + len(q) for _, c, q in self.cases) / len(self.cases))

    def hetero_needle(self, bar) -> None:
        from hetero import SamplingParams

        n = self.needle_tokens()
        longest = max(len(c) + len(q) for _, c, q in self.cases)
        for system, f in self.hetero_configs(n):
            llm, hits = self.llm(system, longest + 16), []
            for case, ctx, question in self.cases:
                bar.set_postfix_str(f"needle {system.name} {f} @{case.depth}")
                (out,) = llm.generate(ctx + question, SamplingParams(max_new_tokens=6))
                hits.append(float(case.key in out.text))
                bar.update()
            self.row(system, "needle", n, f, {"accuracy": summary(hits)}, params=system.params)

    def hetero_error(self, bar) -> None:
        """Attention error of quest and streaming at every budget; of magicpig at its
        defaults and, within the trained context, of actqkv at its defaults and with every
        block selected; of oracle token top-k at those budgets and at the keys magicpig and
        actqkv touched; and of quest and streaming at those keys touched (the paper's
        comparison). Errors are over the layers ``>= dense_layers`` for every system, actqkv
        (which keeps none dense) included."""
        plan = self.plan
        for n in plan.error_contexts:
            ids = self.s.text_ids(n)
            matched = {_magicpig(plan).name: self.magicpig_error(n, ids, bar)}
            if n <= self.s.trained:
                matched[ACTQKV.name] = self.actqkv_error(ACTQKV, n, ids, bar)
                self.actqkv_error(ACTQKV_EVERY_BLOCK, n, ids, bar)
            points = [(f, _budget(f, n), None) for f in plan.fractions]
            points += [(touched / n, touched, name) for name, touched in matched.items()]
            self.budget_errors(n, ids, points, bar)

    def budget_errors(self, n: int, ids: list[int], points: list[tuple[float, int, str | None]], bar) -> None:
        """Attention error of oracle token top-k (one dense run), quest and streaming over
        ``ids`` (``n`` tokens) at each of ``points``: (fraction, keys per query head, the
        system whose keys touched set it or None)."""
        plan, steps = self.plan, self.plan.error_steps
        bar.set_postfix_str(f"attention error oracle top-k {n} tok")
        llm = self.llm(hetero("dense"), n + steps + 16)
        oracle = TopKOracle(sorted({budget for _, budget, _ in points}), plan.dense_layers)
        probe_attention(llm, ids, steps, oracle)
        for f, budget, name in points:
            self.error_row(ORACLE, n, f, oracle.step_errors(budget), name, keys_touched=budget)
        bar.update()
        for policy in SPARSE:
            for f, budget, name in points:
                system = _sparse(policy, budget, plan.dense_layers)
                bar.set_postfix_str(f"attention error {system.name} {f:.3f} {n} tok")
                probe = probe_attention(self.llm(system, n + steps + 16), ids, steps)
                self.error_row(system, n, f, probe.step_errors(plan.dense_layers), name, keys_touched=budget)
                bar.update()

    def magicpig_error(self, n: int, ids: list[int], bar) -> int:
        """Attention error of magicpig at its defaults over ``ids`` (``n`` tokens); returns the
        keys it touched per query head in a sparse layer: the resident ones (sinks, window)
        and those its workers read."""
        plan, cfg = self.plan, self.s.config
        bar.set_postfix_str(f"attention error magicpig {n} tok")
        pig = _magicpig(plan)
        llm = self.llm(pig, n + plan.error_steps + 16)
        read0, _ = llm.policy.key_counts()
        probe = probe_attention(llm, ids, plan.error_steps)
        read = llm.policy.key_counts()[0] - read0
        calls = plan.error_steps * (cfg.n_layers - plan.dense_layers)
        touched = round(probe.mean_resident(plan.dense_layers) + read / (cfg.n_heads * calls))
        llm.close()
        self.error_row(pig, n, touched / n, probe.step_errors(plan.dense_layers), pig.name,
                       keys_touched=touched)
        bar.update()
        return touched

    def actqkv_error(self, system: System, n: int, ids: list[int], bar) -> int:
        """Attention error of an actqkv ``system`` over ``ids`` (``n`` tokens), in the layers
        ``>= dense_layers`` as the others'; returns the keys it touched per query head and
        layer: its own count (``key_counts``: local window, sinks, the blocks each KV head
        kept past its cut-off) as a share of the keys it could have read, times ``n``. The
        count spans every layer; actqkv's layers read alike (2,507 to 2,611 keys each at 4k
        tokens), so it is what the layers the error is measured over read too."""
        plan = self.plan
        bar.set_postfix_str(f"attention error {system.name} {n} tok")
        llm = self.llm(system, n + plan.error_steps + 16)
        before = llm.policy.key_counts()
        probe = probe_attention(llm, ids, plan.error_steps)
        read, seen = (after - b for after, b in zip(llm.policy.key_counts(), before))
        llm.close()
        touched = round(n * read / seen)
        self.error_row(system, n, touched / n, probe.step_errors(plan.dense_layers), ACTQKV.name,
                       keys_touched=touched)
        bar.update()
        return touched

    def error_row(self, system: System, n: int, f: float, errors: list[float], matched: str | None,
                  **extra) -> None:
        """A row of ``attention_error`` at a budget of the plan, or with ``matched`` (the
        system whose keys touched set the budget) of ``attention_error_matched``."""
        if matched is not None:
            extra["matched"] = matched
        test = "attention_error" if matched is None else "attention_error_matched"
        self.row(system, test, n, f, {"attention_error": summary(errors)}, params=system.params, **extra)

    def hetero_ppl(self, bar) -> None:
        plan = self.plan
        for n in plan.ppl_contexts:
            ids = self.s.text_ids(n + plan.ppl_tokens)
            exact = None
            for system, f in self.hetero_configs(n):
                bar.set_postfix_str(f"perplexity {system.name} {f} {n} tok")
                nll = forced_nll(self.llm(system, n + plan.ppl_tokens + 16), ids[:n], ids[n:])
                exact = nll if f is None else exact
                self.ppl_row(system, n, f, nll, exact, params=system.params)
                bar.update()

    def ppl_row(self, system: System, n: int, f: float | None, nll: float, exact: float,
                **extra) -> None:
        ppl = math.exp(nll)
        self.row(system, "perplexity", n, f, {
            "nll": summary([nll]), "perplexity": summary([ppl]),
            "perplexity_delta": summary([ppl - math.exp(exact)]),
        }, n_tokens=self.plan.ppl_tokens - 1, **extra)

    # -- kvpress (its own venv) ----------------------------------------------------------

    def kvpress_all(self, bar) -> list[System]:
        plan, s = self.plan, self.s
        systems = [KVPRESS_EXACT, *(kvpress(p) for p in plan.fidelity_presses)]
        if not s.available(KVPRESS_EXACT):
            return systems
        exact_nll = {}
        for system in systems:
            press = system.params["press"]
            fractions = [None] if press is None else list(plan.fractions)
            tasks, keys = [], []
            for f in fractions:
                n_needle = self.needle_tokens()
                keep = 1.0 if f is None else kv_share(_budget(f, n_needle) / n_needle,
                                                      plan.dense_layers)
                for case, ctx, question in self.cases:
                    tasks.append({"kind": "needle", "context_ids": ctx, "question_ids": question,
                                  "max_new_tokens": 6, "press": press, "keep": keep})
                    keys.append(("needle", f, case))
                for n in plan.ppl_contexts:
                    ids = s.text_ids(n + plan.ppl_tokens)
                    keep = 1.0 if f is None else kv_share(_budget(f, n) / n, plan.dense_layers)
                    tasks.append({"kind": "nll", "context_ids": ids[:n], "target_ids": ids[n:],
                                  "press": press, "keep": keep})
                    keys.append(("nll", f, n))
            bar.set_postfix_str(f"{system.name} ({len(tasks)} runs)")
            job = {"model_dir": s.model["hf_dir"], "threads": s.threads, "dtype": plan.dtype,
                   "tasks": tasks}
            try:
                reply = peers.run_worker(s.peers["kvpress"].python, system.script, job,
                                         plan.worker_timeout_s * 2, s.log_dir / f"{system.name}.log")
            except peers.WorkerError as e:
                self.rows.append({"system": system.name, "test": "needle", "error": str(e),
                                  "labels": [], "metrics": {}})
                bar.update(len(tasks))
                continue
            s._versions["kvpress"] = reply.get("versions", {})
            self._kvpress_rows(system, keys, reply["results"], exact_nll)
            bar.update(len(tasks))
        return systems

    def _kvpress_rows(self, system: System, keys: list, results: list, exact_nll: dict) -> None:
        tok = self.s.tokenizer
        hits: dict = {}
        for (test, f, key), res in zip(keys, results):
            if "error" in res:
                self.rows.append({"system": system.name, "test": test, "fraction": f,
                                  "error": res["error"], "labels": [], "metrics": {}})
            elif test == "needle":
                text = tok.decode(res["token_ids"], skip_special_tokens=True)
                hits.setdefault(f, []).append(float(key.key in text))
            else:
                if f is None:
                    exact_nll[key] = res["nll"]
                if key in exact_nll:
                    self.ppl_row(system, key, f, res["nll"], exact_nll[key], params=system.params)
        for f, h in hits.items():
            self.row(system, "needle", self.needle_tokens(), f, {"accuracy": summary(h)}, params=system.params)

    def n_points(self) -> int:
        plan = self.plan
        n_cfg = 1 + len(SPARSE) * len(plan.fractions)
        per_error_context = 2 + len(SPARSE) * (len(plan.fractions) + 1)  # magicpig, oracle
        per_actqkv = 2 + len(SPARSE)  # defaults, every block; quest and streaming at its keys
        n_actqkv = sum(n <= self.s.trained for n in plan.error_contexts)
        hetero_n = (len(self.cases) * n_cfg + len(plan.error_contexts) * per_error_context
                    + n_actqkv * per_actqkv + len(plan.ppl_contexts) * n_cfg)
        per_press = len(plan.fractions) * (len(self.cases) + len(plan.ppl_contexts))
        kv_n = len(self.cases) + len(plan.ppl_contexts) + len(plan.fidelity_presses) * per_press
        return hetero_n + (kv_n if self.s.available(KVPRESS_EXACT) else 0)


def fidelity(session: Session) -> dict:
    """Run every fidelity test; the result document."""
    f = _Fidelity(session)
    with session.bar(f.n_points(), "fidelity") as bar:
        f.hetero_needle(bar)
        f.hetero_error(bar)
        f.hetero_ppl(bar)
        kv_systems = f.kvpress_all(bar)
    systems = [hetero("dense"), *(hetero(p, dense_layers=session.plan.dense_layers) for p in SPARSE),
               _magicpig(session.plan), ACTQKV, ACTQKV_EVERY_BLOCK, ORACLE, *kv_systems]
    doc = session.doc("fidelity", systems, {"needle_prompt_tokens": [len(c) + len(q) for _, c, q in f.cases]})
    doc["rows"] = f.rows
    return doc
