"""``WRPOTrainer``: transformers' Trainer with the fused WRPO head loss (DESIGN §1-§3, issue 4).

The model body runs without its LM head (``logits_to_keep`` selects no position, a hook takes the
body's final hidden states); :func:`wrpo_kernels.fused_linear_wrpo_loss` takes those and the head's
weight. Going through the (DDP-wrapped) model's own forward keeps distributed gradient sync intact.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from transformers import Trainer

from wrpo_kernels import fused_linear_wrpo_loss, linear_logprobs

from .attention import NAME as SEGMENT_ATTENTION
from .packing import PreferenceCollator, block_causal_mask
from .schedule import alpha_at

STAGES = ("train", "sft")


@contextmanager
def _final_hidden(model):
    """Capture the final hidden states of ``model``'s body during a forward (list with one tensor)."""
    body = getattr(model, model.base_model_prefix)
    captured = []

    def hook(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = body.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def varlen_attention(model) -> bool:
    """Whether ``model`` separates packed sequences by position ids alone (flash-attention varlen, or
    :mod:`wrpo.attention`'s per-sequence sdpa); else the trainer passes a dense block mask."""
    return model.config._attn_implementation in ("flash_attention_2", "flash_attention_3", SEGMENT_ATTENTION)


def body_hidden_states(model, unwrapped, inputs) -> torch.Tensor:
    """Final hidden states [rows, T, H] of the batch, the LM head skipped."""
    kwargs = {"input_ids": inputs["input_ids"], "use_cache": False}
    if "position_ids" in inputs:  # packed row
        kwargs["position_ids"] = inputs["position_ids"]
        if not varlen_attention(unwrapped):
            kwargs["attention_mask"] = block_causal_mask(inputs["position_ids"], unwrapped.dtype)
    else:
        kwargs["attention_mask"] = inputs["attention_mask"]
    no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    with _final_hidden(unwrapped) as captured:
        model(**kwargs, logits_to_keep=no_position)
    return captured[-1]


@torch.no_grad()
def reference_logps(ref_model, inputs, backend: str) -> torch.Tensor:
    """Per-sequence reference log-probs [S] of a collated batch (forward-only path)."""
    hidden = body_hidden_states(ref_model, ref_model, inputs)
    h, labels, cu = head_inputs(hidden, inputs["labels"], inputs)
    head = ref_model.get_output_embeddings()
    return linear_logprobs(h, head.weight, labels, cu, bias=head.bias, backend=backend)


def head_inputs(hidden, labels, inputs):
    """Packed [R, L, H] -> rows [R*L, H] with cu_seqlens; padded [S, T, H] stays (cu_seqlens None)."""
    if "cu_seqlens" in inputs:
        return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), inputs["cu_seqlens"]
    return hidden, labels, None


class WRPOTrainer(Trainer):
    """Trains with the fused WRPO loss (``stage="train"``) or NLL on the first chosen response (``"sft"``).

    ``ref_model``: a frozen model for on-the-fly reference log-probs (dpo/ipo), unless the dataset
    has a ``ref_logps`` column (precomputed). Logs the metrics of DESIGN §2 and ``cur_alpha``.
    """

    def __init__(self, model, args, *, ref_model=None, stage: str = "train", pad_token_id: int = 0, **kwargs):
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        collator = PreferenceCollator(
            pad_token_id, packing=args.packing, row_per_group=not varlen_attention(model)
        )
        kwargs.setdefault("data_collator", collator)
        super().__init__(model=model, args=args, **kwargs)
        self.stage = stage
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def current_alpha(self) -> float:
        """alpha at this optimizer step, by the schedule (linear: 0 -> alpha over all steps)."""
        total = max(self.state.max_steps, 1)
        step = min(self.state.global_step, total - 1)
        return alpha_at(step, total, alpha=self.args.alpha, schedule=self.args.alpha_schedule)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.get_output_embeddings()
        hidden = body_hidden_states(model, unwrapped, inputs)
        h, labels, cu = head_inputs(hidden, inputs["labels"], inputs)
        a = self.args
        common = dict(bias=head.bias, softcap=getattr(unwrapped.config, "final_logit_softcapping", None),
                      backend=a.kernel_backend, chunk_tokens=a.chunk_tokens)  # fmt: skip
        if self.stage == "sft":
            logps = linear_logprobs(h, head.weight, labels, cu, reduction="sum", **common)
            n = (labels != -100).sum()
            loss = -logps.sum() / n
            self._store({"nll_loss": loss.detach()})
            return (loss, None) if return_outputs else loss
        out = fused_linear_wrpo_loss(
            h, head.weight, labels, cu, responses_per_prompt=inputs["responses_per_prompt"],
            num_chosen=inputs["num_chosen"], alpha=self.current_alpha(), chosen_weights=a.chosen_weights,
            ref_logps=self._ref_logps(inputs), loss_type=a.loss_type,
            beta=a.beta, gamma=a.gamma, label_smoothing=a.label_smoothing, nll_weight=a.nll_weight, **common,
        )  # fmt: skip
        self._store(out.metrics)
        return (out.loss, out) if return_outputs else out.loss

    def _ref_logps(self, inputs):
        if "ref_logps" in inputs:
            return inputs["ref_logps"]
        if self.args.loss_type == "simpo":
            return None
        if self.ref_model is None:
            raise ValueError(
                f"loss_type={self.args.loss_type!r} needs a reference model or precomputed ref_logps"
            )
        return reference_logps(self.ref_model, inputs, self.args.kernel_backend)

    def _store(self, metrics: dict):
        mode = "train" if self.model.training else "eval"
        for k, v in metrics.items():
            self._metrics[mode][k].append(v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time=None):
        """Adds the mean of each stored metric since the last log (train steps, or an evaluation),
        averaged over the processes like the loss (every process calls ``log``)."""
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None and self._metrics[mode]:
            prefix = "eval_" if mode == "eval" else ""
            names = sorted(self._metrics[mode])  # the same order on every process
            means = torch.stack(
                [torch.stack([v.float() for v in self._metrics[mode][k]]).mean() for k in names]
            )
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            logs.update(zip((prefix + k for k in names), means.tolist(), strict=True))
            self._metrics[mode].clear()
        super().log(logs, start_time)
