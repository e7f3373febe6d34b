"""Loading the policy, its tokenizer and the reference model; GPU speed-ups when they are installed."""

from __future__ import annotations

import copy
import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from wrpo.train.tiny import build_tiny_tokenizer, tiny_model_config


def _attn_implementation(packing: bool | None) -> str | None:
    """flash-attention 2 for packed rows on a GPU when installed; else the model's default (sdpa).
    The layout plan (``wrpo/model/layout.py``) switches packed rows to ``wrpo_segments`` where it applies."""
    if packing is False:
        return None
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def load_policy(config):
    """-> (model, tokenizer): ``config.model`` = 'tiny' (random init, seed ``seed_model``) or a path."""
    if config.model == "tiny":
        tokenizer = build_tiny_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(config.seed_model)
            model = LlamaForCausalLM(tiny_model_config(len(tokenizer)))
        if impl := _attn_implementation(config.packing):
            model.set_attn_implementation(impl)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    kwargs = {"dtype": "auto"}
    if impl := _attn_implementation(config.packing):
        kwargs["attn_implementation"] = impl
    model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
    _apply_liger_patches(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_reference(config, policy):
    """The frozen reference: ``config.ref_model``, else a copy of the starting policy; None for simpo."""
    if config.loss_type == "simpo":
        return None
    if config.ref_model:
        impl = _attn_implementation(config.packing)
        kwargs = {"attn_implementation": impl} if impl else {}
        return AutoModelForCausalLM.from_pretrained(config.ref_model, dtype="auto", **kwargs)
    return copy.deepcopy(policy)


def _apply_liger_patches(model) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU kernels for the model body on a GPU (our loss replaces the head)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model, rms_norm=True, rope=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
