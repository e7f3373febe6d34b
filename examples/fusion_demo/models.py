"""Random-init tiny Llamas on the bundled tokenizer, in sizes of the demo's own choosing."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from wrpo.train.tiny import build_tiny_tokenizer, tiny_model_config


def save_init_model(path: str | Path, *, hidden: int, layers: int, seed: int) -> Path:
    """``tiny_model_config`` (wrpo/train/tiny.py) of ``hidden`` width (MLP 2x, heads of 16), ``layers``,
    random init for ``seed``, saved with the tiny tokenizer (a model directory ``wrpo sft --model`` takes)."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_model_config(len(tokenizer))
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden, 2 * hidden, layers
    config.num_attention_heads = hidden // 16
    config.num_key_value_heads = hidden // 16
    config.head_dim = 16
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
