"""A decode step reads nothing back from the device: every policy plans from host-side
state once per step and its layers launch kernels (counted on the CPU, where each such read
would be a synchronisation on a GPU; the one read a step needs, the sampled tokens, happens
in the scheduler after ``Engine.decode``). And no module of the decode path builds a device
tensor with ``torch.tensor(..., device=...)``, which on CUDA waits for the stream: host data
goes up through ``Device.tensor`` (pinned, non-blocking)."""

import ast
import threading
from pathlib import Path

import pytest
import torch

from hetero import LLM, SamplingParams

TEXT = open("/usr/share/common-licenses/Apache-2.0").read()[:2000]
# .numpy() is not counted: on a CUDA tensor it raises instead of synchronising, so only CPU
# kernels (quest's head cache in numba) call it, on the CPU path
READS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")
ROOT = Path(__file__).resolve().parents[2]
DECODE_PATH = ["hetero/engine.py", "hetero/cache/store.py",
               *(str(p.relative_to(ROOT)) for p in (ROOT / "hetero/policies").glob("*.py"))]


class HostReads:
    """Counts reads of tensor values into Python (``.item()``, ``.tolist()``, ``.cpu()``,
    ``int(t)``, ``bool(t)``, ...) made by this thread during ``Engine.decode``: ``count`` in
    all, ``in_layers`` while a transformer block runs."""

    def __init__(self, llm, monkeypatch):
        self.count, self.in_layers, self.where, self._in_block, self._decoding = 0, 0, [], False, False
        main = threading.get_ident()
        for name in READS:
            real = getattr(torch.Tensor, name)

            def spy(t, *args, _real=real, _name=name, **kwargs):
                if self._decoding and threading.get_ident() == main:
                    self.count += 1
                    self.in_layers += self._in_block
                    self.where.append(_name)
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, spy)
        decode = llm.engine.decode

        def decoding(*args, **kwargs):
            self._decoding = True
            try:
                return decode(*args, **kwargs)
            finally:
                self._decoding = False

        monkeypatch.setattr(llm.engine, "decode", decoding)
        for block in llm.model.blocks:
            forward = block.forward

            def inside(*args, _forward=forward):
                self._in_block = True
                try:
                    return _forward(*args)
                finally:
                    self._in_block = False

            monkeypatch.setattr(block, "forward", inside)


POLICIES = [
    ("dense", {}, "8MiB"),  # in place
    ("dense", {"n_sink": 4, "n_local": 16, "stream_pages": 8}, "96KiB"),  # offloaded, streamed back
    ("streaming", {"n_sink": 4, "n_local": 16}, "8MiB"),
    ("quest", {"n_sink": 4, "n_local": 16, "token_budget": 48, "dense_layers": 1}, "8MiB"),
    ("magicpig", {"n_sink": 4, "n_local": 16, "lsh_k": 4, "lsh_l": 8, "dense_layers": 1}, "8MiB"),
    ("actqkv", {"n_sink": 4, "n_local": 16, "window": 16, "top_blocks": 4, "min_blocks": 2}, "8MiB"),
]


@pytest.mark.parametrize("policy, params, budget", POLICIES, ids=[f"{p[0]}-{i}" for i, p in enumerate(POLICIES)])
def test_no_host_read_inside_the_layer_loop_of_a_decode_step(tiny_model_dir, monkeypatch, policy, params, budget):
    llm = LLM(tiny_model_dir, device="cpu", page_size=4, prefill_chunk=32, policy=policy,
              policy_params=params, device_kv_budget=budget)
    reads = HostReads(llm, monkeypatch)
    ids = llm.tokenizer(TEXT)["input_ids"][:300]
    (out,) = llm.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert len(out.token_ids) == 12
    if budget != "8MiB" or policy != "dense":  # the sequence offloaded: the offloaded path ran
        assert out.stats.d2h_bytes > 0
    if policy == "quest":
        assert llm.memory_report()["cache_misses"] > 0  # picks were fetched into the head cache
    assert reads.count == 0, reads.where


def test_the_counter_sees_a_read(tiny_model_dir, monkeypatch):
    llm = LLM(tiny_model_dir, device="cpu", device_kv_budget="8MiB")
    reads = HostReads(llm, monkeypatch)
    run = type(llm.policy).run
    monkeypatch.setattr(type(llm.policy), "run",
                        lambda self, layer, q, plan: run(self, layer, q, plan) + 0 * q.sum().item())
    llm.generate("Hello there", SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert reads.count == reads.in_layers == 2 * 2 and reads.where == ["item"] * 4  # 2 steps x 2 layers


def _device_tensor_calls(path: Path) -> list[int]:
    """Lines of ``torch.tensor(...)``/``torch.as_tensor(...)`` calls given a ``device=``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("tensor", "as_tensor") and any(k.arg == "device" for k in node.keywords)):
            lines.append(node.lineno)
    return lines


def test_the_decode_path_uploads_host_data_without_waiting():
    assert len(DECODE_PATH) > 5
    found = {p: _device_tensor_calls(ROOT / p) for p in DECODE_PATH}
    assert {p: lines for p, lines in found.items() if lines} == {}


def test_the_upload_check_sees_a_blocking_upload(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nx = torch.tensor([1], device='cuda')\ny = torch.tensor([1])\n")
    assert _device_tensor_calls(bad) == [2]
