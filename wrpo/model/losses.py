"""The model-level losses: body + fused head loss *inside* the call to the model.

:func:`preference_loss`, :func:`sequence_logps` and :func:`sft_loss` run the body
(:mod:`wrpo.model.body`) and one fused head function of ``wrpo_kernels`` as the model's forward for one
call (:mod:`wrpo.model.redirect`), so that DDP, FSDP2 and ZeRO-3 hooks act around them and see the
head weight whole. The head's logit transform (soft cap, logit scale) comes from the model's
capabilities (:mod:`wrpo.model.capabilities`).
"""

from __future__ import annotations

import torch

from wrpo.data.batch import layout_of
from wrpo.model.body import body_hidden_states
from wrpo.model.capabilities import causal_lm, read_capabilities
from wrpo.model.layout import refuse_unsupported
from wrpo.model.redirect import call_inside_forward, gathered_head
from wrpo_kernels import WRPOOutput, fused_linear_nll_loss, fused_linear_wrpo_loss, linear_logprobs
from wrpo_kernels.vocab_parallel import is_dtensor

__all__ = ["causal_lm", "preference_loss", "sequence_logps", "sft_loss"]


def head_inputs(hidden, batch):
    """Packed [R, L, H] -> rows [R*L, H], labels [R*L], cu_seqlens; padded [S, T, H] stays (cu None).

    Shared-prefix rows: the rows ``head_index`` [N] of the flattened hidden states (a prompt's last
    row once per response: autograd sums their gradients), labels and cu_seqlens over those N rows.
    ``cu_seqlens`` is the host copy the collator recorded where there is one (the kernel then reads no
    bounds back from the device)."""
    layout = layout_of(batch)
    if not layout.packed:
        return hidden, batch["labels"], None
    cu = layout.head_cu_seqlens if layout.head_cu_seqlens is not None else batch["cu_seqlens"]
    rows = hidden.reshape(-1, hidden.shape[-1])
    if layout.kind == "shared_prefix":
        return rows.index_select(0, batch["head_index"]), batch["labels"], cu
    return rows, batch["labels"].reshape(-1), cu


def run_head(lm, batch: dict, head_fn, **options):
    """``head_fn(hidden, weight, labels, cu_seqlens, bias=..., **options)`` on the body's hidden states,
    the head's parameters gathered (ZeRO-3). The head functions run outside autocast themselves."""
    h, labels, cu = head_inputs(body_hidden_states(lm, batch), batch)
    head = lm.get_output_embeddings()
    with gathered_head(head, lm):  # (read head.weight only inside: ZeRO-3 gathers a parameter read outside)
        refuse_untied_parallel_head(lm, head)
        return head_fn(h, head.weight, labels, cu, bias=head.bias, **options)


def refuse_untied_parallel_head(lm, head) -> None:
    """A model configured with tied embeddings whose head weight is a DTensor but no longer the
    embedding's weight: ``parallelize_module`` put a new parameter on the head alone, so the step would
    train an untied model while the config says tied. Refused with the plan that keeps them tied."""
    if not is_dtensor(head.weight) or not getattr(lm.config.get_text_config(), "tie_word_embeddings", False):
        return
    embedding = lm.get_input_embeddings()
    if embedding is not None and embedding.weight is not head.weight:
        raise ValueError(
            f"{type(lm).__name__} ties its embedding and LM head (tie_word_embeddings=True), but its head "
            "weight is a DTensor the embedding does not share: parallelizing the head alone unties them, "
            "and the step would train an untied model. Shard the embedding over the same rows too "
            '(e.g. {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()), "lm_head": '
            "ColwiseParallel()}) and call model.tie_weights() after parallelize_module"
        )


def _head_options(lm, options: dict) -> dict:
    caps = read_capabilities(lm)
    refuse_unsupported(caps)
    softcap, temperature = caps.softcap, caps.temperature
    if options.get("softcap") is None:
        options["softcap"] = softcap
    options["temperature"] = options.get("temperature", 1.0) * temperature
    return options


def preference_loss(model, batch: dict, *, ref_logps=None, **options) -> WRPOOutput:
    """WRPO/DPO/SimPO/IPO loss of a collated batch of groups, computed inside the call to ``model``.

    ``model``: a transformers causal LM, bare or wrapped (DDP, FSDP2 ``fully_shard``, accelerate).
    ``batch``: what :class:`wrpo.PreferenceCollator` returns (packed or padded; ``ref_logps`` [B, K] if
    precomputed), on the model's device. ``ref_logps`` overrides the batch's. ``options``: those of
    :func:`wrpo_kernels.fused_linear_wrpo_loss` (``alpha``, ``beta``, ``loss_type``, ``num_groups``, ...);
    ``responses_per_prompt`` / ``num_chosen`` come from the batch, the head's bias from the model, and
    its logit transform (soft cap, logit scale) from the model's config (an explicit ``temperature``
    multiplies it). Returns :class:`wrpo_kernels.WRPOOutput`.
    """
    lm = causal_lm(model)
    options = _head_options(lm, dict(options))
    options.setdefault("responses_per_prompt", batch["responses_per_prompt"])
    options.setdefault("num_chosen", batch["num_chosen"])
    if ref_logps is None:
        ref_logps = batch.get("ref_logps")

    def forward():
        out = run_head(lm, batch, fused_linear_wrpo_loss, ref_logps=ref_logps, **options)
        # a dict of tensors: the wrappers' output hooks (FSDP's pre-backward) see the loss
        return {"loss": out.loss, "logps": out.logps, "metrics": out.metrics}

    out = call_inside_forward(model, lm, forward)
    return WRPOOutput(loss=out["loss"], metrics=out["metrics"], logps=out["logps"])


def sequence_logps(model, batch: dict, **options) -> torch.Tensor:
    """Per-sequence log-probs [S] (``reduction="sum"`` by default) of a collated batch under ``model``,
    computed inside the call to the model like :func:`preference_loss`; ``options`` are those of
    :func:`wrpo_kernels.linear_logprobs`. Differentiable; under ``no_grad`` the forward-only path."""
    lm = causal_lm(model)
    options = _head_options(lm, dict(options))

    def forward():
        return {"logps": run_head(lm, batch, linear_logprobs, **options)}

    return call_inside_forward(model, lm, forward)["logps"]


def sft_loss(model, batch: dict, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL of a collated batch's labelled tokens (SFT) and its per-sequence log-probs [S] (detached),
    computed inside the call to the model like :func:`preference_loss`, in one pass over the head
    (:func:`wrpo_kernels.fused_linear_nll_loss`, whose options these are: ``num_tokens``, ``backend``...)."""
    lm = causal_lm(model)
    options = _head_options(lm, dict(options))

    def forward():
        loss, logps = run_head(lm, batch, fused_linear_nll_loss, **options)
        return {"loss": loss, "logps": logps}

    out = call_inside_forward(model, lm, forward)
    return out["loss"], out["logps"]
