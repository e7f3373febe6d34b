"""Tiny random transformers models of named families, built from configs (no download), in fp64.

:data:`FAMILIES` names the config and model classes of the families the model tests build by name;
each test passes the sizes (:func:`sizes`) and the options its case needs (soft caps, windows, logit
scales), and :func:`tiny_model` seeds torch first, so a test's model is the same whichever test built
one before.
The model zoo (tests/zoo/architectures.py) shrinks every architecture of the registry instead.
"""

from __future__ import annotations

import torch
import transformers

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "cohere": ("CohereConfig", "CohereForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
}


def sizes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None) -> dict:
    """The size options of a config: ``sizes(32, 64, 2, 4, 2)`` is 32 wide, an MLP of 64, 2 layers,
    4 query and 2 key/value heads (no ``num_key_value_heads`` where ``kv_heads`` is None)."""
    out = {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    if kv_heads is not None:
        out["num_key_value_heads"] = kv_heads
    return out


# the two-layer Llama most tests train or compare: 32 wide, 4 query and 2 key/value heads
LLAMA_2x32 = sizes(32, 64, 2, 4, 2)


def tiny_model(family: str, *, seed: int = 0, **config) -> transformers.PreTrainedModel:
    """``FAMILIES[family]`` built from ``config`` after ``torch.manual_seed(seed)``, in fp64."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).double()
