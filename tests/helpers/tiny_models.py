"""Tiny random transformers models of named families, built from configs (no download), in fp64.

:data:`FAMILIES` names the config and model classes of the families the model tests build by name;
each test passes the sizes and the options its case needs (soft caps, windows, logit scales), and
:func:`tiny_model` seeds torch first, so a test's model is the same whichever test built one before.
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

# the two-layer Llama most tests train or compare: 32 wide, 4 query and 2 key/value heads
LLAMA_2x32 = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def tiny_model(family: str, *, seed: int = 0, **config) -> transformers.PreTrainedModel:
    """``FAMILIES[family]`` built from ``config`` after ``torch.manual_seed(seed)``, in fp64."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).double()
