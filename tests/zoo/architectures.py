"""Tiny random models of every architecture in transformers' causal-LM mapping.

:func:`build_tiny` shrinks an architecture's default config field by field (:data:`SIZES`, sub-configs
such as ``text_config`` too), keeps one layer of each kind a hybrid model mixes (:func:`layer_selection`),
applies a few per-architecture :data:`OVERRIDES` where the generic shrinker does not build, builds the
model from the config (no checkpoint), and checks it with one forward. An architecture that cannot be
built or run as a text-only causal LM comes back with a one-line ``skip`` reason instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import transformers
from transformers import PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128  # the tiny models' vocabulary
TEXT_VOCAB = 120  # token ids fed to the models stay below this; special ids (image, audio, ...) above it
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
WINDOW = 4  # sliding / chunked attention window: shorter than most test sequences

# Generic shrinker: config field -> tiny value, applied where the field exists (and, for the fields of
# KEEP_NONE, is not None). Names vary by family: GPT-2's n_embd, DBRX's d_model, BLT's hidden_size_global.
SIZES = {
    # width and depth
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "hidden_size_global": 64,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "n_layers": 2,
    "intermediate_size": 128,
    "n_inner": 128,
    "ffn_dim": 128,
    "ffn_hidden_size": 128,
    "dense_intermediate_size": 128,
    "intermediate_size_mlp": 128,
    "dim_ff": 128,
    "dff": 128,
    "mlp_dim": 128,
    # attention heads
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "n_heads": 4,
    "head_dim": 16,
    "rotary_dim": 8,
    # mixture of experts
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "zero_expert_num": 2,
    "router_hidden_size": 32,
    "first_k_dense_replace": 1,  # with 2 layers: one dense, one MoE
    # multi-head latent attention (DeepSeek-style) and sparse-attention indexers
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "o_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "index_head_dim": 16,
    "index_n_heads": 2,
    # linear attention and state-space mixers (mamba heads * head width = 2 * hidden)
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    "mamba_d_state": 8,
    "state_size": 8,
    "ssm_state_size": 8,
    "mamba_n_heads": 8,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    # vocabulary, positions, windows
    "vocab_size": VOCAB,
    "unpadded_vocab_size": VOCAB - 4,  # logits sliced to the real vocabulary (Inkling): kept below VOCAB
    "vocab_size_per_layer_input": VOCAB,  # Gemma 3n / 4 per-layer embeddings
    "hidden_size_per_layer_input": 16,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "n_ctx": 256,
    "sliding_window": WINDOW,
    "sliding_window_size": WINDOW,
    "attention_window_size": WINDOW,
    "attention_chunk_size": WINDOW,
    "local_attention": 2 * WINDOW,  # ModernBERT-decoder: its window is half this
    # initialisation: a head that is not flat, log-probs far from uniform
    "initializer_range": 0.2,
    "init_std": 0.2,
}

# Fields whose None default means "absent" (no window, no query compression, derived): kept None.
KEEP_NONE = {
    "n_inner",
    "q_lora_rank",
    "sliding_window",
    "sliding_window_size",
    "attention_window_size",
    "attention_chunk_size",
}


def registry_names() -> list[str]:
    """Every model type of transformers' causal-LM auto mapping, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@dataclass(frozen=True)
class Built:
    """A tiny model of architecture ``name``, or None and a one-line ``skip`` reason."""

    name: str
    model: PreTrainedModel | None
    skip: str | None


# Per-architecture fixes on top of the generic shrinker, by config ``model_type`` (applied at every level:
# ``"gemma4_text"`` also shrinks the ``text_config`` of a ``gemma4``), each with why the generic one fails.
OVERRIDES: dict[str, dict] = {
    # hybrids whose default is all one mixer kind: one recurrent (mamba / conv) and one attention layer
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 1,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    },
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    # the hybrid layers share one transformer block, tied across them: it needs two to tie
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    # default configs that do not build
    "cohere_compass_text": {
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            t: {"rope_type": "default", "rope_theta": 1e4} for t in ("sliding_attention", "full_attention")
        },
    },
    "dbrx": {  # the attention reads attn_config.rope_theta, which checkpoints carry
        "attn_config": {"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8.0},  # clip None: clamp() fails
        "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "blt": {"encoder_hash_byte_group_vocab": 64},  # hash n-gram embeddings: 6 tables of this many rows
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": WINDOW},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},  # num_heads * head_dim = expand * hidden
    "zaya": {"num_experts_per_tok": 1},  # the only value ZAYA supports
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 4,
        "hc_lowrank": 16,
    },
    "gemma3n_text": {  # the last layers reuse the key/value cache of the layers before: one of each kind
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 2,
    },
    "dots3_note_text": {  # its sliding-window layers' sizes (a per-layer override) come from these
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 4,
        "swa_q_lora_rank": 32,
        "swa_kv_lora_rank": 16,
        "swa_head_dim": 16,
        "swa_qk_nope_head_dim": 8,
        "swa_v_head_dim": 16,
    },
    # sliding-window layers' own head counts
    "inkling_text": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16},
    "inkling2_text": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16},
    "inkling2_loop_text": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16},
    "phi4_multimodal_audio": {  # the audio encoder's convolution widths (it is built, not run)
        "num_blocks": 2,
        "ext_pw_out_channel": 64,
        "depthwise_separable_out_channel": 64,
        "nemo_conv_channels": 64,
    },
    "gemma4_text": {"global_head_dim": 32},  # full-attention layers: a wider head (a per-layer override)
    # adapters whose widths must match the encoders' and the text model's hidden sizes
    "dots3_note_vision_encoder": {"adapter_in_dim": 64, "adapter_out_dim": 64},
    "dots3_note_audio_encoder": {"adapter_input_size": 64, "adapter_out_dim": 64},
}

# Architectures skipped before building, with the reason. Encoder-decoder halves and BERT-like encoders
# are recognised from their configs (:func:`_skip_reason`); a build or forward that raises is a skip too.
_ASSISTANT = (
    "assistant (draft) model: every layer reuses the key/value states of a target model's forward, "
    "no standalone forward"
)
SKIPS: dict[str, str] = {
    "gemma4_assistant": _ASSISTANT,
    "gemma4_unified_assistant": _ASSISTANT,
    "reformer": "encoder model: its causal class needs is_decoder=True (and sequence lengths fitting its "
    "axial position embeddings)",
    "trocr": "decoder half of a vision encoder-decoder: its layers cross-attend to an image encoder",
    "xlm": "encoder model: a masked LM unless configured causal=True (a bidirectional encoder turned causal)",
    "xlnet": "encoder model: permutation LM attending in both directions, not a left-to-right causal LM",
}


def _field(config, name: str):
    """A config field's value; for a field that varies per layer (heterogeneous configs), its default."""
    try:
        return getattr(config, name, None)
    except RuntimeError:  # AmbiguousGlobalPerLayerAttributeError
        f = {f.name: f for f in dataclasses.fields(config)}[name]
        return None if f.default is dataclasses.MISSING else f.default


def _is_dropout(field: str) -> bool:
    return "dropout" in field or field.endswith("pdrop") or field.endswith("layerdrop")


def _is_index_list(value) -> bool:
    """A list of distinct layer indices (``full_attn_idxs``, ``moe_layers``), not one entry per layer."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return ints and len(set(value)) == len(value)


def _per_layer_fields(config) -> dict[str, list]:
    """The fields of ``config`` that hold one entry per layer (``layer_types``, ``mlp_layer_types``...)."""
    n = _field(config, "num_hidden_layers")
    out = {}
    for f in dataclasses.fields(config):
        value = _field(config, f.name)
        if isinstance(value, (list, tuple)) and n and len(value) == n and not _is_index_list(value):
            out[f.name] = list(value)
    return out


def layer_selection(config) -> dict:
    """kwargs keeping one layer of each kind ``config`` mixes: for its per-layer fields, the first layer
    of every distinct combination of their values, in order; {} if all layers are alike."""
    # per-layer widths (Gemma 3n's intermediate_size) are shrunk to one scalar by SIZES instead
    per_layer = {k: v for k, v in _per_layer_fields(config).items() if k not in SIZES}
    first = {}
    for i, combo in enumerate(zip(*per_layer.values(), strict=True)):
        first.setdefault(combo, i)
    if len(first) <= 1:
        return {}
    keep = sorted(first.values())
    return {"num_hidden_layers": len(keep), **{k: [v[i] for i in keep] for k, v in per_layer.items()}}


def _token_ids(config, kwargs: dict) -> None:
    """Special token ids into the tiny vocabulary: pad/bos/eos to 0/1/2, others (image, audio, ...) to
    distinct ids >= TEXT_VOCAB, so that no token the zoo feeds is mistaken for one."""
    spare = iter(range(VOCAB - 1, TEXT_VOCAB - 1, -1))
    fixed = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    for f in dataclasses.fields(config):
        if not (f.name.endswith("token_id") or f.name.endswith("token_index")):
            continue
        value = _field(config, f.name)
        if f.name in fixed:
            if value is not None:
                kwargs[f.name] = [fixed[f.name]] if isinstance(value, (list, tuple)) else fixed[f.name]
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            kwargs[f.name] = next(spare, TEXT_VOCAB)  # distinct while spare ids last


def shrink_kwargs(config) -> dict:
    """kwargs that rebuild ``config``'s class tiny: :data:`SIZES`, dropouts 0, special ids in range,
    one layer of each kind, sub-configs (``text_config``, ``vision_config`` ...) shrunk alike, and the
    :data:`OVERRIDES` of its ``model_type`` last."""
    kwargs = {}
    for f in dataclasses.fields(config):
        name, value = f.name, _field(config, f.name)
        if name == "use_cache":
            kwargs[name] = False
        elif isinstance(value, bool):
            continue
        elif name in SIZES and (value is not None or name not in KEEP_NONE):
            kwargs[name] = SIZES[name]
        elif _is_dropout(name) and isinstance(value, (int, float)):
            kwargs[name] = 0 if isinstance(value, int) else 0.0
    if "num_key_value_heads" in {f.name for f in dataclasses.fields(config)}:
        # grouped-query attention stays grouped, multi-head (or unset: the same) stays multi-head
        grouped = _field(config, "num_key_value_heads") not in (None, _field(config, "num_attention_heads"))
        kwargs["num_key_value_heads"] = 2 if grouped else SIZES["num_attention_heads"]
    if _field(config, "qk_rope_head_dim") is not None and _field(config, "head_dim") == _field(
        config, "qk_rope_head_dim"
    ):
        kwargs["head_dim"] = SIZES["qk_rope_head_dim"]  # multi-head latent attention: rotary part's width
    _token_ids(config, kwargs)
    kwargs.update(layer_selection(config))
    for sub in getattr(config, "sub_configs", {}):
        value = _field(config, sub)
        if isinstance(value, transformers.PreTrainedConfig):
            kwargs[sub] = _sub_config_dict(value)
    override = OVERRIDES.get(config.model_type, {})
    for name in ("layer_types", "layers_block_type"):  # an explicit layer pattern sets the depth
        if name in override and "num_hidden_layers" in kwargs:
            kwargs["num_hidden_layers"] = len(override[name])
    kwargs.update(override)
    return kwargs


def _sub_config_dict(config) -> dict:
    """A sub-config as its parent takes it: the parent's settings of it (where they differ from the
    sub-config class's defaults) with :func:`shrink_kwargs` on top; per-layer settings only if shrunk."""
    # fields only: attributes that __post_init__ derives (head_dim from the old width ...) are derived anew
    fields = {f.name for f in dataclasses.fields(config)} - set(_per_layer_fields(config))
    diff = {k: v for k, v in config.to_diff_dict().items() if k in fields and k != "transformers_version"}
    return {**diff, **shrink_kwargs(config), "model_type": config.model_type}


def tiny_config(name: str):
    """The tiny config of model type ``name`` (generic shrinker + :data:`OVERRIDES`)."""
    default = CONFIG_MAPPING[name]()
    return type(default)(**shrink_kwargs(default))


def _skip_reason(default) -> str | None:
    if getattr(default, "is_encoder_decoder", False):
        return "encoder-decoder model: its causal class is the decoder half, fed by an encoder"
    fields = {f.name for f in dataclasses.fields(default)}
    if {"is_decoder", "add_cross_attention"} <= fields and not default.is_decoder:  # BERT-like encoders
        return "encoder model: its causal class needs is_decoder=True (a bidirectional encoder turned causal)"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _keep_fp32(model) -> None:
    """Back to float32: what a model keeps in float32 whatever its dtype (``_keep_in_fp32_modules_strict``:
    routers computed in float32 on purpose, HY-V4's LM head), which ``model.to(float64)`` cast, as loading
    a checkpoint in bf16 keeps them. Without it their forward mixes dtypes and fails."""
    keep = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and any(k in name for k in keep):
            tensor.data = tensor.data.float()


def build_tiny(name: str, *, dtype=torch.float64, seed: int = 0) -> Built:
    """A tiny random ``name`` model (seeded, eval mode, in ``dtype``) checked by one forward, or a skip."""
    if name in SKIPS:
        return Built(name, None, SKIPS[name])
    try:
        default = CONFIG_MAPPING[name]()
    except Exception as exc:
        return Built(name, None, f"default config fails: {_first_line(exc)}")
    reason = _skip_reason(default)
    if reason is not None:
        return Built(name, None, reason)
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name])
    try:
        config = tiny_config(name)
        if not isinstance(config, model_class.config_class):  # a text-only class of a multimodal type
            config = config.get_text_config()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = model_class(config)
        if model._can_set_experts_implementation():
            model.set_experts_implementation("eager")  # grouped_mm, the default, has no float64 kernel
        model = model.to(dtype).eval()
        _keep_fp32(model)
    except Exception as exc:
        return Built(name, None, f"build failed: {_first_line(exc)}")
    try:
        ids = torch.arange(3, 3 + 2 * WINDOW)[None]
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        if not bool(torch.isfinite(logits).all()):
            return Built(name, None, "forward gives non-finite logits")
    except Exception as exc:
        return Built(name, None, f"forward failed: {_first_line(exc)}")
    return Built(name, model, None)
