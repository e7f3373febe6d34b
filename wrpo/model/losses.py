"""The model-level entry point: body + fused head loss *inside* the call to the model.

Wrappers that shard or synchronise parameters act when the model is called: DDP prepares its gradient
reduction, FSDP2 (``fully_shard``) all-gathers the root's parameters (the LM head among them) in a
forward pre-hook, DeepSpeed ZeRO-3 gathers a submodule's parameters when that submodule is called.
Reading ``lm_head.weight`` outside such a call sees a shard (a DTensor) or a released, 0-element
parameter. :func:`preference_loss` therefore swaps the model's ``forward`` for one step so that
calling the (wrapped) model runs the body and the fused loss, then restores it; the head itself is
never called, so under ZeRO-3 its parameters are gathered explicitly around the loss.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel

from wrpo.data.collate import block_causal_mask, shared_prefix_mask
from wrpo.model.attention import FLASH_ATTENTION
from wrpo.model.attention import NAME as SEGMENT_ATTENTION
from wrpo.model.capabilities import body_of, causal_lm, read_capabilities, sliding_window
from wrpo.model.layout import refuse_unsupported
from wrpo.model.mixers import separate_sequences
from wrpo_kernels import WRPOOutput, fused_linear_nll_loss, fused_linear_wrpo_loss, linear_logprobs
from wrpo_kernels.vocab_parallel import is_dtensor

__all__ = ["causal_lm", "preference_loss", "sequence_logps", "sft_loss"]


def body_hidden_states(lm: PreTrainedModel, batch) -> torch.Tensor:
    """Final hidden states of the model body (the LM head skipped): packed [R, L, H] or padded [S, T, H].

    Packed rows are separated by ``position_ids``: flash-attention varlen and ``wrpo_segments`` do it
    alone; other attention implementations get a dense block-causal mask. Shared-prefix rows
    (``head_index`` in the batch) need ``wrpo_segments`` or a dense mask: flash-attention varlen would
    run each response on from the one before it. A packed batch whose sequences would attend to each
    other is refused first (:func:`check_sequences_separated`)."""
    check_sequences_separated(lm, batch)
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
        impl = lm.config._attn_implementation
        if "head_index" in batch and impl != SEGMENT_ATTENTION:
            if varlen_attention(lm):
                raise ValueError(
                    f"shared-prefix batches need attn_implementation={SEGMENT_ATTENTION!r} (or sdpa/eager "
                    f"with a dense mask); {impl} separates packed sequences at position 0 only"
                )
            refuse_windows_in_dense_masks(lm, batch["position_ids"])
            kwargs["attention_mask"] = shared_prefix_mask(batch["position_ids"], lm.dtype)
        elif not varlen_attention(lm):
            refuse_windows_in_dense_masks(lm, batch["position_ids"])
            kwargs["attention_mask"] = block_causal_mask(batch["position_ids"], lm.dtype)
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "cu_seqlens" in batch:
        separate_sequences(lm)  # hybrid models: conv / recurrent layers one sequence at a time
    out = body_of(lm)(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def refuse_windows_in_dense_masks(lm, position_ids: torch.Tensor) -> None:
    """A dense packed mask replaces the model's own masks, sliding windows included: refuse a batch with
    a sequence longer than the window (one host sync) rather than attend past it."""
    window = sliding_window(lm.config)
    if window is not None and int(position_ids.max()) + 1 > window:
        raise ValueError(
            f"{type(lm).__name__} attends within {window}-token sliding windows, which the dense packed "
            f"mask for {lm.config._attn_implementation} does not apply, and this batch has sequences of "
            f"{int(position_ids.max()) + 1} tokens: use attn_implementation={SEGMENT_ATTENTION!r}, which "
            "applies the windows (or packing=False)"
        )


def check_sequences_separated(lm: PreTrainedModel, batch) -> None:
    """Refuse a packed batch whose sequences the body would let attend to each other (docs/method.md §5).

    A packed row (``cu_seqlens`` in the batch) holds several sequences; the attention finds where
    each starts only from ``position_ids`` restarting at 0. Without them, with positions that do not
    restart at every start in ``cu_seqlens``, or under flash-attention with more than one row (its
    varlen path reads position ids of a single row only), every sequence would attend to the ones
    before it in its row and train on leaked context. Costs one host sync (the position at each
    sequence start); padded batches (one sequence per row) are not checked."""
    if "cu_seqlens" not in batch:
        return
    why = read_capabilities(lm).packing_blocker
    if why is not None:
        raise ValueError(f"packed batch refused: {why}; collate with packing=False (one sequence per row)")
    fix = (
        "build the batch with wrpo.PreferenceCollator(pad_token_id, packing=True), whose position_ids "
        "restart at 0 for every sequence, or use packing=False (one sequence per row, attention_mask)"
    )
    if "position_ids" not in batch:
        raise ValueError(
            f"packed batch (cu_seqlens: {batch['cu_seqlens'].numel() - 1} sequences in "
            f"{batch['input_ids'].shape[0]} row(s)) without position_ids: its sequences would attend to "
            f"each other; {fix}"
        )
    impl = lm.config._attn_implementation
    rows = batch["input_ids"].shape[0]
    if impl in FLASH_ATTENTION and rows > 1:
        raise ValueError(
            f"{impl} separates packed sequences only in a batch of one row (transformers reads "
            f"position_ids as varlen bounds only then), this one has {rows}: its sequences would attend "
            f"to each other; collate with row_per_group=False (one row), or use "
            f"attn_implementation={SEGMENT_ATTENTION!r} or 'sdpa' (a block mask is built)"
        )
    if "head_index" in batch:  # shared prefix: cu_seqlens counts gathered head rows, not body tokens
        return
    positions = batch["position_ids"].expand_as(batch["input_ids"]).reshape(-1)
    starts = batch["cu_seqlens"][:-1].to(device=positions.device, dtype=torch.int64)
    wrong = positions.index_select(0, starts) != 0
    if bool(wrong.any()):
        first = int(wrong.nonzero()[0])
        raise ValueError(
            f"position_ids do not restart at 0 where sequence {first} starts (token "
            f"{int(starts[first])} of the flattened rows, per cu_seqlens): the attention would let it "
            f"attend to the sequences before it; {fix}"
        )


def varlen_attention(lm) -> bool:
    """Whether ``lm`` separates packed sequences by position ids alone (flash-attention varlen, or
    :mod:`wrpo.model.attention`'s per-sequence sdpa); else a dense block mask is passed."""
    return lm.config._attn_implementation in (*FLASH_ATTENTION, SEGMENT_ATTENTION)


def head_inputs(hidden, batch):
    """Packed [R, L, H] -> rows [R*L, H], labels [R*L], cu_seqlens; padded [S, T, H] stays (cu None).

    Shared-prefix rows: the rows ``head_index`` [N] of the flattened hidden states (a prompt's last
    row once per response: autograd sums their gradients), labels and cu_seqlens over those N rows."""
    if "head_index" in batch:
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["head_index"])
        return rows, batch["labels"], batch["cu_seqlens"]
    if "cu_seqlens" in batch:
        return hidden.reshape(-1, hidden.shape[-1]), batch["labels"].reshape(-1), batch["cu_seqlens"]
    return hidden, batch["labels"], None


@contextlib.contextmanager
def gathered_head(head: torch.nn.Module, owner: torch.nn.Module):
    """The head's parameters whole for the duration: DeepSpeed ZeRO-3 partitions them (``ds_id``).

    They are also registered as used by ``owner`` (the model whose forward runs the loss): the fused
    loss computes the weight gradient in its forward, and autograd accumulates it into the parameter in
    the backward, when ZeRO-3 has partitioned the head again unless the owner's backward gathers it."""
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed  # a ZeRO-3 parameter implies deepspeed is installed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if all(p.ds_status == ZeroParamStatus.AVAILABLE for p in params):
        # registered by an earlier call, the owner's forward has gathered them and releases them
        # after it: partitioning them here would free parameters the owner still holds
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, fwd_module=owner):
        yield


def call_inside_forward(model, lm: torch.nn.Module, fn):
    """Run ``fn()`` as ``lm.forward`` while calling ``model`` (``lm`` or a wrapper around it), so that
    the wrappers' forward hooks (gathering, gradient sync) act around it; returns ``fn()``'s result."""
    had_own = "forward" in vars(lm)
    original = lm.forward

    def restore():
        if had_own:
            lm.forward = original
        else:
            vars(lm).pop("forward", None)

    def redirected(*_args, **_kwargs):
        restore()  # a nested call of the model inside fn gets its real forward
        return fn()

    lm.forward = redirected
    try:
        return model()
    finally:
        restore()


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
