"""Tiny random Hugging Face causal LMs, built in code (no downloads, no hub)."""

from __future__ import annotations

from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB = 160
COMMON: dict[str, Any] = {"vocab_size": VOCAB, "attn_implementation": "eager"}
LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

# name -> (config class, model class, config kwargs)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**LLAMA_LIKE, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 2.0, "sliding_window": 8},
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 64,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
    ),
}


def make_model(name: str, *, dtype: Any = None, seed: int = 0) -> Any:
    """A tiny random model in training mode (deterministic: dropout off, fixed seed)."""
    config_cls, model_cls, kwargs = MODELS[name]
    config = getattr(transformers, config_cls)(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.train()
