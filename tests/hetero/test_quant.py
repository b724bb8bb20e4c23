"""weights="quantized": a GGUF's block-quantised linear layers stay in their blocks and run
through the numba GEMV; the result equals the dense (dequantised) path."""

import gguf
import pytest
import torch

from hetero import LLM, SamplingParams
from hetero.quant import QuantLinear
from tests.hetero.test_loader import isolated_cache, tiny_hf_model, write_gguf  # noqa: F401

TEXT = "the cat sat on the mat and the dog sat on the log " * 6


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q8_0"])
def test_quantized_weights_equal_the_dequantised_dense_path(quant, tmp_path, tiny_tokenizer, isolated_cache):
    model = tiny_hf_model("llama", tie_word_embeddings=True, intermediate_size=128)
    path = write_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer,
                      quant=getattr(gguf.GGMLQuantizationType, quant))
    dense = LLM(str(path), device="cpu", device_kv_budget="8MiB", page_size=4)
    quantized = LLM(str(path), device="cpu", device_kv_budget="8MiB", page_size=4, weights="quantized")
    linears = [m for m in quantized.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 4 * 2 + 1  # q/k/v, o, gate/up, down per layer; the (tied) LM head
    assert quantized.model.lm_head.blocks.q.shape == (262, 64)
    # prefill chunks dequantise the blocks: the float weights of the dense path, exactly
    assert quantized.logprobs(TEXT).logprobs == dense.logprobs(TEXT).logprobs
    # decode rows go through the GEMV (int16 activations): logits within 1e-4 of their scale
    ids = tiny_tokenizer(TEXT)["input_ids"]
    want = dense.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    got = quantized.generate(ids, SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert got.token_ids == want.token_ids
    x = torch.randn(2, 64)
    ref = torch.nn.functional.linear(x, dense.model.lm_head.weight)
    torch.testing.assert_close(quantized.model.lm_head(x), ref, atol=1e-4 * ref.abs().max(), rtol=0)


@pytest.mark.parametrize("kind", ["q8_0", "q4_1"])
def test_an_hf_model_quantised_at_load(kind, tiny_model_dir):
    dense = LLM(tiny_model_dir, device="cpu", device_kv_budget="8MiB")
    quantized = LLM(tiny_model_dir, device="cpu", device_kv_budget="8MiB", weights=kind)
    head = quantized.model.lm_head  # the tied embedding, quantised
    w = dense.model.lm_head.weight
    step = w.abs().amax() / (127 if kind == "q8_0" else 15)  # the coarsest block step
    assert isinstance(head, QuantLinear)
    assert (torch.from_numpy(head.blocks.dequantize()) - w).abs().max() <= step
    got = torch.tensor(quantized.logprobs(TEXT).logprobs)
    want = torch.tensor(dense.logprobs(TEXT).logprobs)
    # close, not equal: the tiny random model's log-probabilities are about -60
    rel = (got - want).abs().mean() / want.abs().mean()
    assert 0 < rel < (0.005 if kind == "q8_0" else 0.03), rel
    (out,) = quantized.generate(TEXT, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out.token_ids) == 4


def test_bad_weights_options(tiny_model_dir):
    with pytest.raises(ValueError, match="keeps a GGUF's blocks.*weights='q8_0'"):
        LLM(tiny_model_dir, device="cpu", weights="quantized")
    with pytest.raises(ValueError, match="weights must be one of 'dense', 'quantized', 'q4_0'"):
        LLM(tiny_model_dir, device="cpu", weights="int4")
    with pytest.raises(ValueError, match="in float32 on the CPU"):
        LLM(tiny_model_dir, device="cpu", dtype="bfloat16", weights="q8_0")


def test_the_device_path_of_a_quantized_layer(tiny_model_dir, monkeypatch):
    """The branch a CUDA tensor takes (gpu_kernels.quant_linear; its torch path here) gives
    what the numba GEMV gives, and prefill-sized inputs the dequantised matmul."""
    llm = LLM(tiny_model_dir, device="cpu", weights="q4_1")
    layer = llm.model.blocks[0].w13
    x = torch.randn(3, layer.in_features)
    numba_out = layer(x)
    monkeypatch.setattr("hetero.quant._on_gpu", lambda t: True)
    torch.testing.assert_close(layer(x), numba_out, atol=1e-4, rtol=1e-4)
    many = torch.randn(20, layer.in_features)
    torch.testing.assert_close(layer(many), many @ layer.dequantize().T)
