import functools
import os

# Triton kernels run in the interpreter here (no GPU); it must be set before triton is imported.
# `make test-cuda` sets it to 0 for the `cuda` tests: Triton reads it when kernels are
# decorated, at import, so interpreted and compiled kernels cannot share a process.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@functools.cache
def cuda_skip_reason() -> str | None:
    """Why tests marked ``cuda`` cannot run in this process, or None if they can."""
    import torch

    if not torch.cuda.is_available():
        return "cuda test: no CUDA GPU (torch.cuda.is_available() is False)"
    if os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "on", "yes", "y"):
        return ("cuda test: TRITON_INTERPRET=1 would run Triton's interpreter, not the compiled "
                "kernels; run `make test-cuda` (TRITON_INTERPRET=0 pytest -m cuda)")
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and cuda_skip_reason() is not None:
        pytest.skip(cuda_skip_reason())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, GQA 4/2, head_dim 16) with the embedded model's
    tokenizer, saved as an HF directory: fast, and runs the real loading path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hetero.loader import hf_reference_dir

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(hf_reference_dir(None))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper logits than the default init: greedy ties are unlikely
        model.model.embed_tokens.weight.normal_(0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
