"""``hetero bench``: hetero side by side with HF transformers, kvpress and llama.cpp.

Where things are:

- ``cli``: arguments of ``hetero bench`` and the driver (JSON, ``report.md``, plots).
- ``plan``: lengths, repeats and budgets of the full run and of ``--quick``.
- ``systems``: what is compared, at which KV budget, and the job each worker gets.
- ``session``: one run's model, machine, peers and the memo of timed points.
- ``speed`` (decode, batch, prefill, memory) and ``fidelity``: the workloads (``fidelity``
  measures through ``hetero.probe`` and ``LLM.decode_logprobs``).
- ``peers``: the peers' venvs (``bench/.peers/``) and the worker subprocess call.
- ``workers/``: one script per system family, run in that family's environment.
- ``results``, ``report``, ``findings``, ``plots``: the result schema and what is made of it.
"""
