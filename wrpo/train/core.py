"""The loss step both trainers share: ``wrpo train``'s :class:`~wrpo.train.trainer.WRPOTrainer` and the TRL
adapter's (``wrpo/integrations/trl.py``) are :class:`TrainerCore` on top of their host trainer.

One step: the batch's reference log-probs (:meth:`TrainerCore.reference_logps`: precomputed in the batch,
unused by simpo, else from the reference model), the fused loss inside the model call
(:func:`wrpo.preference_loss`, :func:`wrpo.sft_loss`) with the step's :class:`~wrpo_kernels.Totals`
(``wrpo/train/accumulation.py``) and the alpha of this step, then the metrics: stored per batch, averaged
over the batches and the processes when a log (training) or an evaluation loop (its own prefix) ends.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from wrpo.data.collate import PreferenceCollator, batch_counts
from wrpo.model.layout import LayoutPlan, plan_and_prepare
from wrpo.model.losses import preference_loss, sequence_logps, sft_loss
from wrpo.train.accumulation import ExactAccumulation

STAGES = ("train", "sft")


@dataclass(frozen=True)
class LossOptions:
    """The options of a run's loss (alpha comes per step, the totals per optimizer step)."""

    loss_type: str
    beta: float
    gamma: float = 0.0
    label_smoothing: float = 0.0
    nll_weight: float = 0.0
    chosen_weights: tuple[float, ...] | None = None
    backend: str = "auto"
    chunk_tokens: int | None = None

    @classmethod
    def of(cls, args, *, loss_type: str, nll_weight: float) -> LossOptions:
        """From a config holding the shared fields (``wrpo.train.config.WRPOOptions``, ``beta`` and
        ``label_smoothing``); ``loss_type`` and ``nll_weight`` as the config's trainer reads them."""
        weights = args.chosen_weights
        return cls(
            loss_type,
            args.beta,
            args.gamma,
            args.label_smoothing,
            float(nll_weight),
            None if weights is None else tuple(weights),
            args.kernel_backend,
            args.chunk_tokens,
        )

    @property
    def head(self) -> dict:
        """The keywords every head function takes (``backend``, ``chunk_tokens``)."""
        return {"backend": self.backend, "chunk_tokens": self.chunk_tokens}

    @property
    def preference(self) -> dict:
        """The keywords of :func:`wrpo.preference_loss` besides ``alpha``, ``ref_logps`` and ``totals``."""
        return asdict(self)


@torch.no_grad()
def reference_logps(ref_model, batch, *, backend: str = "auto", chunk_tokens: int | None = None):
    """[B, K] log-probs of a collated batch under the frozen ``ref_model`` (forward-only path)."""
    logps = sequence_logps(ref_model, batch, backend=backend, chunk_tokens=chunk_tokens)
    return logps.view(-1, batch["responses_per_prompt"])


class TrainerCore(ExactAccumulation):
    """Mixin for a transformers ``Trainer`` (or a subclass such as TRL's ``DPOTrainer``): the loss step.

    The subclass provides :meth:`loss_options`, sets ``stage`` ("train": preference loss; "sft": NLL of
    the first chosen response) and may plan its batch layout before ``Trainer.__init__``
    (``self._layout``); :meth:`compute_loss` only dispatches to the model-level losses."""

    stage: str = "train"
    ref_model = None

    def loss_options(self) -> LossOptions:
        raise NotImplementedError

    # ---- batches --------------------------------------------------------------------------------

    @property
    def layout(self) -> LayoutPlan:
        """The batch layout, planned for the policy and the reference model, applied and logged once."""
        if getattr(self, "_layout", None) is None:
            self._layout = plan_and_prepare(self.args, self.model, self.ref_model)
        return self._layout

    def collator(self, pad_token_id: int) -> PreferenceCollator:
        """The collator of the planned layout."""
        return self.layout.collator(pad_token_id)

    # ---- loss -----------------------------------------------------------------------------------

    def reference_logps(self, inputs) -> torch.Tensor | None:
        """[B, K] reference log-probs of the batch: precomputed (``ref_logps``), None for simpo (which has
        no reference), else :meth:`reference_model_logps`."""
        if "ref_logps" in inputs:
            return inputs["ref_logps"]
        if self.loss_options().loss_type == "simpo":
            return None
        return self.reference_model_logps(inputs)

    def reference_model_logps(self, inputs) -> torch.Tensor:
        """[B, K] log-probs of the batch under the reference model."""
        if self.ref_model is None:
            loss_type = self.loss_options().loss_type
            raise ValueError(f"loss_type={loss_type!r} needs a reference model or precomputed ref_logps")
        with self.accelerator.autocast():
            return reference_logps(self.ref_model, inputs, **self.loss_options().head)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the optimizer step's loss (``num_items_in_batch``: the step's
        counts, see ``wrpo/train/accumulation.py``); without counts (evaluation) the batch mean."""
        options, totals = self.loss_options(), self.step_totals(num_items_in_batch)
        if self.stage == "sft":
            with self.accelerator.autocast():
                loss, logps = sft_loss(model, inputs, totals=totals, **options.head)
            tokens = batch_counts(inputs)[1].to(logps.device)
            self.store_metrics({"nll_loss": -logps.sum() / tokens})
            return (loss, None) if return_outputs else loss
        ref = self.reference_logps(inputs)
        with self.accelerator.autocast():  # the body in the run's mixed precision (the head stays exact)
            out = preference_loss(
                model, inputs, ref_logps=ref, alpha=self.current_alpha(), totals=totals, **options.preference
            )
        self.store_metrics(self.step_metrics(out, inputs, ref))
        return (out.loss, out) if return_outputs else out.loss

    def step_metrics(self, out, inputs, ref) -> dict:
        """The metrics to log of one step's :class:`~wrpo_kernels.WRPOOutput` (the TRL adapter renames)."""
        return out.metrics

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- metrics --------------------------------------------------------------------------------

    @property
    def _stored(self) -> dict[str, defaultdict]:
        if getattr(self, "_stored_metrics", None) is None:
            self._stored_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        return self._stored_metrics

    def store_metrics(self, metrics: dict) -> None:
        """Keeps this batch's metrics for the next train log (training) or for the end of the running
        evaluation loop (model in eval mode)."""
        mode = "train" if self.model.training else "eval"
        for k, v in metrics.items():
            self._stored[mode][k].append(v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v))

    def stored_means(self, mode: str, prefix: str) -> dict[str, float]:
        """``{prefix + name: mean}`` of each metric stored since the last call, averaged over the processes
        like the loss (every process calls this at the same point: one all-reduce); the store is emptied."""
        stored = self._stored[mode]
        if not stored:
            return {}
        names = sorted(stored)  # the same order on every process
        means = torch.stack([torch.stack([v.float() for v in stored[k]]).mean() for k in names])
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
        stored.clear()
        return dict(zip((prefix + k for k in names), means.tolist(), strict=True))

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The loop of ``evaluate`` and ``predict`` (each eval dataset of a dict runs its own): the means of
        this loop's metrics only, under its ``metric_key_prefix`` (``eval_``, ``test_``, ``eval_<name>_``),
        in the returned metrics (which ``evaluate`` logs)."""
        self._stored["eval"].clear()  # nothing stored before (an interrupted loop, a manual call) counts
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        output.metrics.update(self.stored_means("eval", f"{metric_key_prefix}_"))
        return output

    def log(self, logs: dict, start_time=None):
        """Adds the mean of each metric stored since the last train log to a train log (evaluations add
        theirs in :meth:`evaluation_loop`)."""
        if "loss" in logs:
            logs.update(self.stored_means("train", ""))
        super().log(logs, start_time)
