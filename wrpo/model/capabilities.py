"""What a causal LM can do, read once from the model: the one place that inspects models.

:func:`read_capabilities` returns a frozen :class:`Capabilities` record: where the decoder body lives
and whether it takes ``position_ids``, the token mixer of each layer (full or sliding attention, short
convolution, state-space scan, linear attention), which of those run through transformers' attention
interface (and so can switch implementation), the positional scheme (rope scaling, ALiBi), the window,
and the head's logit transform and bias. The layouts (``wrpo/model/layout.py``) decide from this record;
the model entry (``wrpo/model/losses.py``) and the per-sequence mixers (``wrpo/model/mixers.py``) use it.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

# keyword names under which transformers passes a KV / recurrent cache to a token mixer
CACHE_ARGUMENTS = ("cache", "cache_params", "past_key_values", "past_key_value", "layer_past")


@dataclass(frozen=True)
class Capabilities:
    """A causal LM's capabilities (see the module docstring). Mixer paths are ``named_modules`` names
    relative to the body."""

    model_type: str
    class_name: str
    body_path: str  # attribute path from the causal LM to its decoder body ("model", ...)
    takes_position_ids: bool
    attention: str | None  # the attention implementation at reading time
    interface_attention: bool  # every attention layer runs through transformers' attention interface
    mixer_kinds: tuple[str, ...]  # distinct token-mixer kinds, in layer order
    attention_mixers: tuple[str, ...]  # paths of the attention modules
    sequence_mixers: tuple[str, ...]  # paths of the conv / ssm / linear-attention mixers
    unknown_mixers: tuple[str, ...]  # class names of token mixers of no known kind
    sliding_window: int | None
    alibi: bool
    rope_type: str | None
    softcap: float | None
    temperature: float
    head_bias: bool

    @property
    def packing_blocker(self) -> str | None:
        """Why packed rows cannot be exact on this model whatever its attention, or None."""
        name = self.class_name
        if self.alibi:
            return (
                f"{name} uses ALiBi attention biases, built from the attention mask rather than position_ids"
            )
        if not self.takes_position_ids:
            return (
                f"{name} takes no position_ids (packed sequences are told apart by positions restarting at 0)"
            )
        if self.unknown_mixers:
            return (
                f"{name} has token-mixing layers of no known kind ({', '.join(self.unknown_mixers)}), which "
                "would carry state from one packed sequence into the next"
            )
        return None

    @property
    def hybrid(self) -> bool:
        return bool(self.sequence_mixers)

    @property
    def mixer_kinds_text(self) -> str:
        """The non-attention mixers in words, e.g. "convolution layers"."""
        names = {"conv": "convolution", "ssm": "state-space", "linear_attention": "linear-attention"}
        return " and ".join(names[k] for k in self.mixer_kinds if k in names) + " layers"


def causal_lm(model) -> PreTrainedModel:
    """The transformers model inside ``model``'s wrappers (DDP, DeepSpeed engine, FSDP1, PEFT, compile)."""
    m, seen = model, 0
    while not isinstance(m, PreTrainedModel):
        inner = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        if inner is None and hasattr(m, "get_base_model"):
            inner = m.get_base_model()
        if not isinstance(inner, torch.nn.Module) or seen > 8:
            raise TypeError(f"found no transformers PreTrainedModel inside {type(model).__name__}")
        m, seen = inner, seen + 1
    if m.get_output_embeddings() is None:
        raise TypeError(f"{type(m).__name__} has no LM head (get_output_embeddings() is None)")
    return m


def read_capabilities(model) -> Capabilities:
    """The :class:`Capabilities` of ``model`` (bare or wrapped); the module walk runs once per model."""
    lm = causal_lm(model)
    # what the modules say, read once per model (plain values: names, not modules); the config each call
    structure = vars(lm).get("_wrpo_structure")
    if structure is None:
        path, body = _body(lm)
        takes_positions = "position_ids" in _forward_parameters(type(body))
        structure = (path, takes_positions, _uses_alibi(body), *_mixers(body, lm.config))
        vars(lm)["_wrpo_structure"] = structure
    path, takes_positions, body_alibi, kinds, attention, sequence, unknown, interface = structure
    softcap, temperature = head_transform(lm.config)
    text = _text_config(lm.config)
    caps = Capabilities(
        model_type=getattr(lm.config, "model_type", "") or "",
        class_name=type(lm).__name__,
        body_path=path,
        takes_position_ids=takes_positions,
        attention=lm.config._attn_implementation,
        interface_attention=interface,
        mixer_kinds=kinds,
        attention_mixers=attention,
        sequence_mixers=sequence,
        unknown_mixers=unknown,
        sliding_window=sliding_window(lm.config),
        alibi=bool(getattr(text, "alibi", False)) or body_alibi,
        rope_type=_rope_type(text),
        softcap=softcap,
        temperature=temperature,
        head_bias=getattr(lm.get_output_embeddings(), "bias", None) is not None,
    )
    return caps


def body_of(lm: PreTrainedModel) -> torch.nn.Module:
    """The decoder body of a causal LM (its head skipped): ``Capabilities.body_path`` resolved."""
    return _resolve(lm, read_capabilities(lm).body_path)


def _resolve(module: torch.nn.Module, path: str) -> torch.nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _body(lm) -> tuple[str, torch.nn.Module]:
    """(path, module) of the decoder body: ``base_model_prefix`` when the class has that attribute
    (most), else ``get_decoder()``, else ``model`` (Llama-4 text names a prefix it does not have)."""
    prefix = lm.base_model_prefix
    body = getattr(lm, prefix, None) if prefix else None
    if isinstance(body, torch.nn.Module) and body is not lm:
        return prefix, body
    decoder = lm.get_decoder()
    if decoder is not lm:
        for name, child in lm.named_children():
            if child is decoder:
                return name, child
    if isinstance(getattr(lm, "model", None), torch.nn.Module):
        return "model", lm.model
    raise TypeError(
        f"{type(lm).__name__}: found no decoder body (base_model_prefix {prefix!r}, get_decoder())"
    )


def _takes_cache(module: torch.nn.Module) -> bool:
    return bool(set(_forward_parameters(type(module))) & set(CACHE_ARGUMENTS))


@functools.cache
def _forward_parameters(cls) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return ()


@functools.cache
def _runs_attention_interface(cls) -> bool:
    """Whether ``cls.forward`` dispatches through transformers' attention interface (switchable)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source or "_attn_implementation" in source


def mixer_kind(module: torch.nn.Module) -> str | None:
    """The kind of a token mixer module: attention, conv, ssm, linear_attention; None if unknown."""
    if _runs_attention_interface(type(module)):
        return "attention"
    name = type(module).__name__.lower()
    if "conv" in name:
        return "conv"
    if "mamba" in name or "ssm" in name or name.endswith("mixer"):
        return "ssm"
    if "delta" in name or "linearattention" in name or "lightning" in name:
        return "linear_attention"  # gated delta nets / delta attention, linear and lightning attention
    if name.endswith("attention"):
        return "attention"  # an attention module outside the interface (switching it is refused)
    return None


def _mixers(body, config) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...], bool]:
    """The innermost modules that take a cache are the token mixers (a decoder layer takes one too,
    but passes it on). -> (kinds in order, attention paths, sequence-mixer paths, unknown class names,
    whether every attention mixer runs through the attention interface)."""
    taking = {name for name, m in body.named_modules() if name and _takes_cache(m)}
    kinds, attention, sequence, unknown, interface = [], [], [], [], True
    for name, module in body.named_modules():
        if name not in taking or any(other.startswith(name + ".") for other in taking):
            continue
        kind = mixer_kind(module)
        if kind is None and not _mixes_tokens(module):
            continue  # a layer that takes the cache but mixes no tokens itself (Nemotron-H's MLP blocks)
        if kind is None:
            unknown.append(type(module).__name__)
            continue
        if kind == "attention":
            attention.append(name)
            interface &= _runs_attention_interface(type(module))
            if sliding_window(config) is not None and getattr(module, "sliding_window", None):
                kind = "sliding_attention"
        else:
            sequence.append(name)
        if kind not in kinds:
            kinds.append(kind)
    if sliding_window(config) is not None and "attention" in kinds and "sliding_attention" not in kinds:
        kinds[kinds.index("attention")] = "sliding_attention"  # one window for every layer (Mistral)
    return tuple(kinds), tuple(attention), tuple(sequence), tuple(sorted(set(unknown))), interface


# words in the class names of modules that combine tokens (sparse-attention indexers select keys)
TOKEN_MIXING_WORDS = ("attention", "recurrent", "scan", "mixer", "indexer", "compressor")


def _mixes_tokens(module: torch.nn.Module) -> bool:
    """Whether a module of no known kind may mix tokens: it holds a convolution over time or a module
    named like one that does (:data:`TOKEN_MIXING_WORDS`); else it is an MLP / MoE-only layer."""
    for sub in module.modules():
        name = type(sub).__name__.lower()
        if isinstance(sub, torch.nn.Conv1d) or any(w in name for w in TOKEN_MIXING_WORDS):
            return True
        if sub is not module and _takes_cache(sub):
            return True
    return False


def _uses_alibi(body) -> bool:
    """ALiBi read from the body's forward (Bloom, MPT build the bias from the attention mask)."""
    try:
        source = inspect.getsource(type(body).forward)
    except (OSError, TypeError):
        return False
    return "alibi" in source.lower() and "position_ids" not in _forward_parameters(type(body))


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _rope_type(config) -> str | None:
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict):
            params = params.get("full_attention", params) if "rope_type" not in params else params
            if isinstance(params, dict) and params.get("rope_type", params.get("type")):
                return str(params.get("rope_type", params.get("type")))
    return None


def sliding_window(config) -> int | None:
    """The model's attention window in tokens if any layer uses one (Mistral, Gemma 2, Qwen2 with
    ``use_sliding_window``), else None."""
    config = _text_config(config)
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def head_transform(config) -> tuple[float | None, float]:
    """(softcap, temperature) that turn the head's output z into the model's logits, from its config.

    Gemma-style ``final_logit_softcapping`` c: ``c tanh(z / c)``. A multiplier s (Cohere's
    ``logit_scale``, ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``): ``s z``, temperature
    1/s. Granite's ``logits_scaling`` d: ``z / d``, temperature d (HyperCLOVA X multiplies by it).
    """
    config = _text_config(config)
    softcap = getattr(config, "final_logit_softcapping", None) or None
    temperature = 1.0
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(config, name, None)
        if scale is not None:
            temperature /= float(scale)
            break
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None:
        multiplies = getattr(config, "model_type", "") == "hyperclovax"
        temperature = temperature / float(divisor) if multiplies else temperature * float(divisor)
    if softcap is not None and temperature != 1.0:
        raise NotImplementedError(
            f"{type(config).__name__} both soft-caps and scales its logits; the fused loss applies the "
            "soft cap first, which may not be this model's order"
        )
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{type(config).__name__}: logit scaling gives temperature {temperature}")
    return softcap, temperature
