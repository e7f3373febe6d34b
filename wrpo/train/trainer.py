"""``WRPOTrainer``: transformers' Trainer with the fused WRPO head loss.

Every loss goes through :func:`wrpo.preference_loss` (:func:`wrpo.sft_loss` for SFT, and
:func:`wrpo.sequence_logps` for the reference model), which runs the body and the fused head inside
the call to the (wrapped) model, so DDP, FSDP2 and ZeRO-3 hooks see the head weight. Under gradient
accumulation each micro-batch's loss is divided by the counts of the whole optimizer step (groups,
first-chosen tokens; summed over the processes): the micro-batch gradients add up to exactly the
gradient of the whole batch's mean.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from transformers import Trainer

from wrpo.data.collate import batch_counts
from wrpo.model.layout import LayoutPlan, plan_and_prepare
from wrpo.model.losses import preference_loss, sequence_logps, sft_loss
from wrpo.train.accumulation import ExactAccumulation
from wrpo.train.checkpoints import CompleteCheckpoints, keeping_the_newest_complete

STAGES = ("train", "sft")
logger = logging.getLogger(__name__)


@torch.no_grad()
def reference_logps(ref_model, inputs, backend: str) -> torch.Tensor:
    """Per-sequence reference log-probs [S] of a collated batch (forward-only path)."""
    return sequence_logps(ref_model, inputs, backend=backend)


class WRPOTrainer(ExactAccumulation, Trainer):
    """Trains with the fused WRPO loss (``stage="train"``) or NLL on the first chosen response (``"sft"``).

    ``ref_model``: a frozen model for on-the-fly reference log-probs (dpo/ipo), unless the dataset
    has a ``ref_logps`` column (precomputed). ``layout``: the batch layout already planned and applied
    (``wrpo/model/layout.py``); None: planned here from ``args.packing`` / ``args.prefix_sharing``. Logs the
    official WRPO metric names and ``cur_alpha``.
    """

    def __init__(
        self, model, args, *, ref_model=None, stage: str = "train", pad_token_id: int = 0,
        layout: LayoutPlan | None = None, **kwargs,
    ):  # fmt: skip
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        self.layout = layout or plan_and_prepare(args, model, ref_model)  # logs on, or off and why
        kwargs.setdefault("data_collator", self.layout.collator(pad_token_id))
        super().__init__(model=model, args=args, **kwargs)
        self.stage = stage
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self.model_accepts_loss_kwargs = True  # transformers versions without ``loss_is_scaled_for_ga``
        if not any(isinstance(cb, CompleteCheckpoints) for cb in self.callback_handler.callbacks):
            self.add_callback(CompleteCheckpoints())  # marks checkpoints complete (kill-safe resume)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the optimizer step's loss: its summed group losses over the step's
        groups (``num_items_in_batch``, see ``wrpo.train.accumulation``), times the number of processes
        since DDP/FSDP average the gradients over them. Without counts (evaluation): the batch mean."""
        a = self.args
        norms = self.loss_normalisers(num_items_in_batch)
        common = {"backend": a.kernel_backend, "chunk_tokens": a.chunk_tokens}
        if self.stage == "sft":
            with self.accelerator.autocast():
                loss, logps = sft_loss(model, inputs, num_tokens=norms.get("num_nll_tokens"), **common)
            self._store({"nll_loss": -logps.sum() / batch_counts(inputs)[1].to(logps.device)})
            return (loss, None) if return_outputs else loss
        ref = self._ref_logps(inputs)
        with self.accelerator.autocast():  # the body in the run's mixed precision (the head stays exact)
            out = preference_loss(
                model, inputs, ref_logps=ref, alpha=self.current_alpha(),
                chosen_weights=a.chosen_weights, loss_type=a.loss_type, beta=a.beta, gamma=a.gamma,
                label_smoothing=a.label_smoothing, nll_weight=a.nll_weight, **norms, **common,
            )  # fmt: skip
        self._store(out.metrics)
        return (out.loss, out) if return_outputs else out.loss

    def _save_checkpoint(self, model, trial):
        with keeping_the_newest_complete():  # the previous complete checkpoint stays until this is marked
            super()._save_checkpoint(model, trial)

    def _ref_logps(self, inputs):
        if "ref_logps" in inputs:
            return inputs["ref_logps"]
        if self.args.loss_type == "simpo":
            return None
        if self.ref_model is None:
            raise ValueError(
                f"loss_type={self.args.loss_type!r} needs a reference model or precomputed ref_logps"
            )
        with self.accelerator.autocast():
            return reference_logps(self.ref_model, inputs, self.args.kernel_backend)

    def _store(self, metrics: dict):
        """Keeps this batch's metrics for the next train log (training) or for the end of the running
        evaluation (model in eval mode; see ``evaluation_loop``)."""
        mode = "train" if self.model.training else "eval"
        for k, v in metrics.items():
            self._metrics[mode][k].append(v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v))

    def _stored_means(self, mode: str, prefix: str) -> dict[str, float]:
        """``{prefix + name: mean}`` of each metric stored since the last call, averaged over the processes
        like the loss (every process calls this at the same point); the store is emptied."""
        stored = self._metrics[mode]
        if not stored:
            return {}
        names = sorted(stored)  # the same order on every process
        means = torch.stack([torch.stack([v.float() for v in stored[k]]).mean() for k in names])
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
        stored.clear()
        return dict(zip((prefix + k for k in names), means.tolist(), strict=True))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The loop of ``evaluate`` and ``predict`` (each eval dataset of a dict runs its own): the means of
        the metrics of this loop's batches only, under its ``metric_key_prefix`` (``eval_``, ``test_``,
        ``eval_<name>_``), in the returned metrics (which ``evaluate`` logs)."""
        self._metrics["eval"].clear()  # nothing stored before (an interrupted loop, a manual call) counts
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only=prediction_loss_only, ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )  # fmt: skip
        output.metrics.update(self._stored_means("eval", f"{metric_key_prefix}_"))
        return output

    def log(self, logs: dict, start_time=None):
        """Adds the mean of each metric stored since the last train log to a train log (evaluations add
        theirs in ``evaluation_loop``)."""
        if "loss" in logs:
            logs.update(self._stored_means("train", ""))
        super().log(logs, start_time)
