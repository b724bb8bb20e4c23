"""The fidelity workload: passkey accuracy, attention-output error and perplexity delta of
the sparse systems against exact attention, at several KV budgets.

- needle: a passkey in ~1.3k tokens of real text (where the embedded model finds it with
  full attention), at several depths; accuracy per budget.
- attention_error: relative error of each decode step's attention output against exact
  attention over the whole KV (``hetero.probe.AttentionProbe``; hetero only, the sparse
  layers only).
- perplexity: teacher-forced perplexity of a real continuation through the system's decode
  attention (``LLM.decode_logprobs``), and its delta against the same family's exact run (hetero dense for hetero,
  HF without a press for kvpress).

Budgets are ``plan.fractions`` of the context in hetero's sparse layers; a kvpress press
keeps the same share of all KV (``systems.kv_share``).
"""

from __future__ import annotations

import math

from bench import peers
from bench.corpus import needle_cases
from bench.results import summary
from bench.session import Session
from bench.systems import System, hetero, hetero_llm_args, hetero_sparse, kv_share, kvpress
from hetero.probe import TopKOracle, probe_attention

SPARSE = ("quest", "streaming")
ORACLE = System("oracle-topk", "hetero", "oracle token top-k (exact scores; a bound, not a runtime)",
                {"policy": "dense"}, sparse=True)
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
        share = 1.0 if fraction is None else kv_share(_budget(fraction, context) / context,
                                                      self.plan.dense_layers)
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
        defaults; of oracle token top-k at those budgets and at the keys magicpig touched;
        and of quest and streaming at magicpig's keys touched (the paper's comparison)."""
        plan, cfg = self.plan, self.s.config
        for n in plan.error_contexts:
            ids, steps = self.s.text_ids(n), plan.error_steps
            bar.set_postfix_str(f"attention error magicpig {n} tok")
            pig = _magicpig(plan)
            llm = self.llm(pig, n + steps + 16)
            read0, _ = llm.policy.key_counts()
            probe = probe_attention(llm, ids, steps)
            read = llm.policy.key_counts()[0] - read0
            calls = steps * (cfg.n_layers - plan.dense_layers)
            touched = round(probe.mean_resident(plan.dense_layers) + read / (cfg.n_heads * calls))
            llm.close()
            self.error_row(pig, n, touched / n, probe.step_errors(plan.dense_layers),
                           keys_touched=touched)
            bar.update()

            fractions = {**{f: _budget(f, n) for f in plan.fractions}, touched / n: touched}
            bar.set_postfix_str(f"attention error oracle top-k {n} tok")
            llm = self.llm(hetero("dense"), n + steps + 16)
            oracle = TopKOracle(sorted(set(fractions.values())), plan.dense_layers)
            probe_attention(llm, ids, steps, oracle)
            for f, budget in fractions.items():
                self.error_row(ORACLE, n, f, oracle.step_errors(budget), keys_touched=budget)
            bar.update()

            for policy in SPARSE:
                for f, budget in fractions.items():
                    system = _sparse(policy, budget, plan.dense_layers)
                    bar.set_postfix_str(f"attention error {system.name} {f:.3f} {n} tok")
                    probe = probe_attention(self.llm(system, n + steps + 16), ids, steps)
                    self.error_row(system, n, f, probe.step_errors(plan.dense_layers),
                                   keys_touched=budget)
                    bar.update()

    def error_row(self, system: System, n: int, f: float, errors: list[float], **extra) -> None:
        matched = f not in self.plan.fractions  # at the keys magicpig touched
        self.row(system, "attention_error_matched" if matched else "attention_error", n, f,
                 {"attention_error": summary(errors)}, params=system.params, **extra)

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
        hetero_n = (len(self.cases) * n_cfg + len(plan.error_contexts) * per_error_context
                    + len(plan.ppl_contexts) * n_cfg)
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
               _magicpig(session.plan), ORACLE, *kv_systems]
    doc = session.doc("fidelity", systems, {"needle_prompt_tokens": [len(c) + len(q) for _, c, q in f.cases]})
    doc["rows"] = f.rows
    return doc
