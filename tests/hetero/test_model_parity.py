"""Our ``Transformer`` (loaded by ``load_checkpoint``) gives HF transformers' logits.

Each family is a tiny random model built by transformers itself, saved as an HF directory and
read back through our loader; the embedded SmolLM2 is compared on its converted GGUF weights.
Attention is one exact causal pass (the shared float64 oracle), so the test covers the model
and the loader, not the engine. All in float32.
"""

import pytest
import torch
import transformers

from hetero.loader import hf_reference_dir, load_checkpoint
from hetero.model import Transformer
from tests.oracle import attention_oracle

TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# head_dim 16, theta 1e4: wavelengths 6, 20, 63, ... so with an original context of 32 the
# llama3 rule keeps one frequency, blends one and stretches the rest; 80 tokens pass 32.
FAMILIES = {
    "llama3_rope_scaling": lambda: transformers.LlamaConfig(**TINY, rope_scaling=LLAMA3_ROPE),
    "llama2": lambda: transformers.LlamaConfig(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None),
    "qwen2_qkv_bias": lambda: transformers.Qwen2Config(**TINY),
    "smollm2_tied": lambda: transformers.LlamaConfig(
        **{**TINY, "num_key_value_heads": 1}, tie_word_embeddings=True, rope_theta=100000.0
    ),
}
SEQ_LEN = 80
TINY_ATOL = 1e-4  # logits are O(1..10) here; fp32 implementations differ by ~1e-6
EMBEDDED_ATOL = 5e-4  # 30 layers, logits up to ~40; measured max difference 6e-5


def exact_attend(positions):
    """attend(layer, q, k, v) for one full causal forward over ``positions``."""

    def attend(layer, q, k, v):
        out, _ = attention_oracle(q, k, v, positions, positions, q.shape[-1] ** -0.5)
        return out.to(q.dtype)

    return attend


def our_logits(ckpt, tokens):
    model = Transformer(ckpt.config)
    model.load_hf_state_dict(ckpt.state_dict)
    model.eval()
    positions = torch.arange(len(tokens))
    with torch.no_grad():
        return model.logits(model(tokens, positions, exact_attend(positions)))


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(tokens[None]).logits[0].float()


@torch.no_grad()
def randomize(model):
    """Weights large enough that every term shows in the logits (HF's init is tiny, and zero
    for biases, one for norms)."""
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embed" not in name:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
        elif p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=gen))
        elif "norm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        else:  # q/k/v biases: large enough that RoPE on them matters
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_family_matches_transformers(family, tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
    randomize(hf)
    hf.eval()
    hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    ckpt = load_checkpoint(tmp_path, torch.float32)
    assert ckpt.config.tie_word_embeddings == (family == "smollm2_tied")
    assert ckpt.config.attention_bias == (family == "qwen2_qkv_bias")
    assert (ckpt.config.rope_scaling is not None) == (family == "llama3_rope_scaling")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY["vocab_size"], (SEQ_LEN,), generator=gen)
    ours, ref = our_logits(ckpt, tokens), hf_logits(hf, tokens)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero logits
    torch.testing.assert_close(ours, ref, atol=TINY_ATOL, rtol=0)


def test_embedded_model_matches_transformers(embedded_checkpoint):
    tok = embedded_checkpoint.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    tokens = torch.tensor(ids[:24])
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        hf_reference_dir(embedded_checkpoint.source), dtype=torch.float32
    ).eval()
    ours, ref = our_logits(embedded_checkpoint, tokens), hf_logits(hf, tokens)
    torch.testing.assert_close(ours, ref, atol=EMBEDDED_ATOL, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
