"""Public functions: validate, pick a backend, run (docs/method.md §2)."""

from __future__ import annotations

import dataclasses
import functools

import torch

from .autoselect import BACKENDS, resolve_backend, triton_unavailable_reason
from .chunked.options import HeadOptions
from .head_inputs import HeadInputs
from .metrics import fused_loss_metrics, reward_metrics
from .objective import make_spec, math_dtype
from .output import WRPOOutput
from .packing import PackedRows, sequence_ids
from .totals import Totals, resolve_totals
from .validation import as_packed_rows, check_head, check_labels, check_preference_tensor
from .vocab_parallel import check_replicated, vocab_shard

__all__ = [
    "BACKENDS",
    "REDUCTIONS",
    "fused_linear_nll_loss",
    "fused_linear_wrpo_loss",
    "linear_logprobs",
    "resolve_backend",
    "triton_unavailable_reason",
    "wrpo_loss",
]
REDUCTIONS = ("sum", "mean", "none")


def _sequence(s: int) -> str:
    return f"sequence {s}"


def head_inputs(
    hidden, weight, labels, cu_seqlens, bias, opts: HeadOptions, *, require_tokens, describe=_sequence
):
    """Check and pack a public call's head arguments (padded [S, T, H] or packed [N, H]) into
    :class:`HeadInputs`; ``describe(s)`` names sequence s in errors."""
    hidden, labels, cu, cu_host = as_packed_rows(hidden, labels, cu_seqlens)
    weight, bias, shard = vocab_shard(weight, bias)
    check_head(hidden, weight, bias, labels)
    if shard is not None:
        check_replicated(shard, labels, cu)
    hidden = hidden.contiguous()
    seq = sequence_ids(cu, hidden.shape[0])
    opts = dataclasses.replace(opts, shard=shard)
    vocab = opts.vocab(weight)
    counts, counts_host = check_labels(
        labels, cu, seq, vocab, opts.ignore_index, require_tokens=require_tokens, describe=describe
    )
    return HeadInputs(hidden, weight, bias, labels, PackedRows(cu, cu_host, seq, counts, counts_host), opts)


def head_options(ignore_index, softcap, temperature, chunk_tokens) -> HeadOptions:
    """Check the options of the head; ``chunk_tokens`` is checked but not kept: it changes how the rows
    are scheduled, not the logits."""
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be a positive int or None, got {chunk_tokens!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return HeadOptions(ignore_index, softcap, float(temperature))


def compile_boundary(fn):
    """Run ``fn`` eagerly when ``torch.compile`` meets it: the compiled graph stops at the call.

    The public functions sync with the host (``cu_seqlens`` and label checks read values) and pick
    their chunks in Python from those values. Traced, a small body + fused loss became 14 graphs (13
    breaks, 2 recompilations over 4 batch layouts) and took about twice as long to compile, for no
    faster step (benchmarks/compile_boundary.py; benchmarks/results/compile_boundary_cpu.json). The
    native CPU operators have fake kernels all the same. ``torch.compiler.disable`` is looked up at call
    time, only while compiling, so that importing wrpo_kernels does not import ``torch._dynamo``.
    """

    @functools.wraps(fn)
    def public(*args, **kwargs):
        run = outside_autocast(fn)
        if torch.compiler.is_compiling():
            return torch.compiler.disable(run)(*args, **kwargs)
        return run(*args, **kwargs)

    return public


def outside_autocast(fn):
    """Run ``fn`` with autocast off for its first tensor's device: the head computes in its weight's
    dtype, accumulating in fp32, whatever mixed precision the caller runs under. Under autocast a
    ``hidden`` of another dtype than ``weight`` (a bf16 activation beside fp32 parameters) is cast
    to the weight's dtype; without autocast a dtype mismatch stays an error."""

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        device = first.device.type if isinstance(first, torch.Tensor) else None
        if device is None or not torch.is_autocast_enabled(device):
            return fn(first, *args, **kwargs)
        weight = args[0] if args else kwargs.get("weight")
        if isinstance(weight, torch.Tensor) and first.dtype != weight.dtype:
            first = first.to(weight.dtype)
        with torch.autocast(device, enabled=False):
            return fn(first, *args, **kwargs)

    return run


@compile_boundary
def linear_logprobs(
    hidden,
    weight,
    labels,
    cu_seqlens=None,
    *,
    bias=None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    reduction: str = "sum",
    backend: str = "auto",
    chunk_tokens: int | None = None,
):
    """Log-probs of labels under ``softcap(hidden @ weight^T + bias) / temperature``, chunk by chunk.

    hidden: [N, H] packed rows with ``cu_seqlens`` [S+1], or [S, T, H] padded sequences with
    ``cu_seqlens=None``. Labels are shifted, ``labels[t] = ids[t+1]`` within a sequence, so the last
    position of every sequence is ``ignore_index`` (a labelled one is refused as unshifted). Returns
    fp32 (fp64 for fp64 inputs): ``reduction="sum"`` -> [S] sum over tokens with label !=
    ignore_index; ``"mean"`` -> [S] that sum over the token count; ``"none"`` -> per-token log-probs
    shaped like ``labels`` (0 where ignored). Differentiable w.r.t. hidden, weight and bias.
    ``chunk_tokens`` bounds the rows of logits held at once (default: ~1 GiB of fp32 logits on a GPU,
    ~256 MiB on a CPU).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    opts = head_options(ignore_index, softcap, temperature, chunk_tokens)
    out_shape = labels.shape if isinstance(labels, torch.Tensor) else None
    x = head_inputs(hidden, weight, labels, cu_seqlens, bias, opts, require_tokens=reduction == "mean")
    _, impl = resolve_backend(backend, x.hidden.device, x.hidden.dtype)
    out = impl.linear_logprobs(x, reduction=reduction, chunk_tokens=chunk_tokens)
    return out.view(out_shape) if reduction == "none" else out


@compile_boundary
def fused_linear_nll_loss(
    hidden,
    weight,
    labels,
    cu_seqlens=None,
    *,
    bias=None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    totals: Totals | None = None,
    num_tokens=None,
):
    """LM head + mean NLL (SFT) in one pass: ``loss = -(1/n) * sum_t log p(labels[t])`` over the labelled
    rows, n = ``totals.tokens`` (:class:`Totals`; default: this call's labelled rows).

    Inputs as :func:`linear_logprobs` (packed [N, H] with ``cu_seqlens``, or padded [S, T, H]; shifted
    labels). Returns ``(loss, logps)``: the loss, differentiable w.r.t. hidden, weight and bias, and the
    per-sequence log-prob sums [S] (fp32, fp64 for fp64 inputs), detached. The gradients are computed in
    the forward from the logits of each chunk (6NHV, as the preference loss), where ``linear_logprobs``
    and autograd compute the logits twice (8NHV). Under gradient accumulation pass the whole batch's
    token count as ``totals=Totals(tokens=n)``: the micro-batch losses then sum to the whole batch's mean.
    ``num_tokens=n`` is an alias of ``totals=Totals(tokens=n)`` (not both).
    """
    opts = head_options(ignore_index, softcap, temperature, chunk_tokens)
    totals = resolve_totals(totals, num_tokens=num_tokens)
    x = head_inputs(hidden, weight, labels, cu_seqlens, bias, opts, require_tokens=False)
    totals = totals.as_tensors(math_dtype(x.hidden.dtype), x.hidden.device)
    if totals.tokens is None and sum(x.rows.counts_host) == 0:
        raise ValueError(f"no label != ignore_index={ignore_index} in the batch: its mean NLL is undefined")
    _, impl = resolve_backend(backend, x.hidden.device, x.hidden.dtype)
    return impl.fused_linear_nll_loss(x, totals=totals, chunk_tokens=chunk_tokens)


@compile_boundary
def fused_linear_wrpo_loss(
    hidden,
    weight,
    labels,
    cu_seqlens,
    *,
    responses_per_prompt: int = 3,
    num_chosen: int = 2,
    alpha: float = 0.1,
    chosen_weights=None,
    ref_logps=None,
    loss_type: str = "dpo",
    beta: float = 0.01,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    logp_reduction: str = "sum",
    nll_weight: float = 0.0,
    bias=None,
    ignore_index: int = -100,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_tokens: int | None = None,
    totals: Totals | None = None,
    num_groups=None,
    num_nll_tokens=None,
) -> WRPOOutput:
    """LM head + WRPO loss in one pass over chunks of whole groups (docs/method.md §3, §4).

    hidden [N, H]: the S = B*K responses back to back, group-major (per group: ``num_chosen`` chosen
    ones, sources first and the target last, then the rejected ones); ``cu_seqlens`` [S+1] their
    bounds (or hidden [S, T, H] padded with ``cu_seqlens=None``). ``ref_logps`` [B, K] or [S]:
    reference log-probs (required for dpo and ipo, unused by simpo). Chosen weights default to
    ``[alpha, 1 - alpha]`` for K = 3 (sources share alpha in general). Returns a :class:`WRPOOutput`:
    ``loss`` = mean group loss + ``nll_weight`` * mean NLL over the first chosen response's tokens.

    ``logp_reduction``: what the loss compares per response, ``"sum"`` (the paper's summed log-probs)
    or ``"mean"`` (that sum over the response's n labelled tokens, label != ignore_index). With
    ``"mean"``, ``out.logps``, the ``logps/*`` metrics and the rewards are the means; ``ref_logps`` must
    be means too (e.g. ``linear_logprobs(..., reduction="mean")`` under the reference model); dpo
    becomes length-normalised DPO. simpo and ipo are defined on per-token log-probs already
    (``beta s / n``, ``(s - s_ref) / n``): with ``"mean"`` they do not divide by n again, so their loss
    and rewards equal those of ``"sum"`` (ipo given averaged ``ref_logps``); only ``out.logps`` and the
    ``logps/*`` metrics change. The NLL term is the same under both: a mean over tokens.

    ``totals`` (:class:`Totals`): the denominators of those two means, by default this call's B groups
    and its first-chosen tokens. To split a batch into micro-batches (gradient accumulation, data
    parallel ranks) pass the whole batch's counts: the micro-batch losses then sum to the whole batch's
    loss, and so do their gradients. ``num_groups`` / ``num_nll_tokens`` are aliases of
    ``totals=Totals(groups=..., tokens=...)`` (not both).
    Metrics also hold ``logits/chosen`` and ``logits/rejected``: the mean raw logit ``h W^T + b``
    over the vocabulary and the response tokens (as TRL logs them), from ``h . sum_v W_v`` (no logits).
    """
    spec = make_spec(
        responses_per_prompt=responses_per_prompt,
        num_chosen=num_chosen,
        alpha=alpha,
        chosen_weights=chosen_weights,
        loss_type=loss_type,
        beta=beta,
        gamma=gamma,
        label_smoothing=label_smoothing,
        logp_reduction=logp_reduction,
    )
    opts = head_options(ignore_index, softcap, temperature, chunk_tokens)
    totals = resolve_totals(totals, num_groups=num_groups, num_nll_tokens=num_nll_tokens)
    K = spec.responses_per_prompt

    def describe(s):
        role = "chosen" if s % K < spec.num_chosen else "rejected"
        return f"sequence {s} (group {s // K}, response {s % K} of {K}, {role})"

    x = head_inputs(hidden, weight, labels, cu_seqlens, bias, opts, require_tokens=True, describe=describe)
    h, rows = x.hidden, x.rows
    S = len(rows.cu_host) - 1
    if S % K:
        raise ValueError(f"cu_seqlens describes S={S} sequences, not a multiple of responses_per_prompt={K}")
    B = S // K
    md = math_dtype(h.dtype)
    if ref_logps is None and spec.needs_reference:
        raise ValueError(f"loss_type={loss_type!r} needs ref_logps ([B, K] = [{B}, {K}] or [S] = [{S}])")
    ref = check_preference_tensor("ref_logps", ref_logps, B, K, h.device) if spec.needs_reference else None
    ref = None if ref is None else ref.detach().to(md)
    _, impl = resolve_backend(backend, h.device, h.dtype)
    totals = totals.as_tensors(md, h.device)
    out = impl.fused_linear_wrpo_loss(
        x, spec=spec, ref_logps=ref, nll_weight=nll_weight, totals=totals, chunk_tokens=chunk_tokens
    )
    metrics = fused_loss_metrics(spec, x, out, ref, nll_weight)
    return WRPOOutput(loss=out.loss, metrics=metrics, logps=out.logps)


@compile_boundary
def wrpo_loss(
    policy_logps,
    ref_logps,
    lengths,
    *,
    num_chosen: int = 2,
    alpha: float = 0.1,
    chosen_weights=None,
    loss_type: str = "dpo",
    beta: float = 0.01,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    logp_reduction: str = "sum",
    backend: str = "auto",
):
    """(loss, metrics) from per-response log-probs: the backend for trainers that compute log-probs.

    policy_logps [B, K] (summed over response tokens; differentiable), ref_logps [B, K] (dpo, ipo),
    lengths [B, K] response token counts (simpo, ipo; may be None for dpo). ``logp_reduction="mean"``:
    both log-probs are per-token means, as in :func:`fused_linear_wrpo_loss` (lengths unused). The
    arithmetic runs in fp32
    (fp64 for fp64 log-probs), lengths included, so that bf16 log-probs keep counts above 256 exact; the
    loss comes back in the dtype of ``policy_logps``, the reward metrics in fp32 (fp64).
    """
    if not isinstance(policy_logps, torch.Tensor) or policy_logps.dim() != 2:
        shape = (
            tuple(policy_logps.shape)
            if isinstance(policy_logps, torch.Tensor)
            else type(policy_logps).__name__
        )
        raise ValueError(f"policy_logps must be [B, K], got {shape}")
    if not policy_logps.dtype.is_floating_point:
        raise ValueError(f"policy_logps must be a floating tensor, got {policy_logps.dtype}")
    B, K = policy_logps.shape
    spec = make_spec(
        responses_per_prompt=K,
        num_chosen=num_chosen,
        alpha=alpha,
        chosen_weights=chosen_weights,
        loss_type=loss_type,
        beta=beta,
        gamma=gamma,
        label_smoothing=label_smoothing,
        logp_reduction=logp_reduction,
    )
    dev, dt = policy_logps.device, policy_logps.dtype
    md = math_dtype(dt)
    if spec.needs_reference and ref_logps is None:
        raise ValueError(f"loss_type={loss_type!r} needs ref_logps [B, K] = [{B}, {K}]")
    ref = check_preference_tensor("ref_logps", ref_logps, B, K, dev) if spec.needs_reference else None
    ref = None if ref is None else ref.to(md)
    if not spec.divides_by_length:
        lengths = None  # no backend reads them
    else:
        if lengths is None:
            raise ValueError(f"loss_type={loss_type!r} needs lengths [B, K] (response token counts)")
        lengths = torch.as_tensor(lengths, device=dev)
        if tuple(lengths.shape) != (B, K):
            raise ValueError(f"lengths must be [B, K] = [{B}, {K}], got {tuple(lengths.shape)}")
        if bool((lengths <= 0).any()):
            b, k = (lengths <= 0).nonzero()[0].tolist()
            raise ValueError(f"lengths[{b}, {k}] = {lengths[b, k].item()}: every response needs >= 1 token")
        lengths = lengths.to(md)
    _, impl = resolve_backend(backend, dev, dt)
    loss = impl.wrpo_loss(spec, policy_logps, ref, lengths)
    return loss, reward_metrics(spec, policy_logps, ref, lengths)
