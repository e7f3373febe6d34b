"""``WRPOTrainer``: transformers' Trainer with the fused WRPO head loss (the loss step of
``wrpo/train/core.py``), as ``wrpo train`` and ``wrpo sft`` run it.

Every loss goes through :func:`wrpo.preference_loss` (:func:`wrpo.sft_loss` for SFT, and
:func:`wrpo.sequence_logps` for the reference model), which runs the body and the fused head inside
the call to the (wrapped) model, so DDP, FSDP2 and ZeRO-3 hooks see the head weight. Under gradient
accumulation each micro-batch's loss is divided by the counts of the whole optimizer step (groups,
first-chosen tokens; summed over the processes): the micro-batch gradients add up to exactly the
gradient of the whole batch's mean.
"""

from __future__ import annotations

from transformers import Trainer

from wrpo.model.layout import LayoutPlan, plan_and_prepare
from wrpo.train.checkpoints import CompleteCheckpoints, keeping_the_newest_complete
from wrpo.train.core import STAGES, LossOptions, TrainerCore


class WRPOTrainer(TrainerCore, Trainer):
    """Trains with the fused WRPO loss (``stage="train"``) or NLL on the first chosen response (``"sft"``).

    ``ref_model``: a frozen model for on-the-fly reference log-probs (dpo/ipo), unless the dataset
    has a ``ref_logps`` column (precomputed). ``layout``: the batch layout already planned and applied
    (``wrpo/model/layout.py``); None: planned here from ``args.packing`` / ``args.prefix_sharing``. Logs
    the official WRPO metric names and ``cur_alpha``.
    """

    def __init__(
        self,
        model,
        args,
        *,
        ref_model=None,
        stage: str = "train",
        pad_token_id: int = 0,
        layout: LayoutPlan | None = None,
        **kwargs,
    ):
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        self.stage = stage
        self._layout = layout or plan_and_prepare(args, model, ref_model)  # logs on, or off and why
        kwargs.setdefault("data_collator", self.collator(pad_token_id))
        super().__init__(model=model, args=args, **kwargs)
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self.model_accepts_loss_kwargs = True  # transformers versions without ``loss_is_scaled_for_ga``
        if not any(isinstance(cb, CompleteCheckpoints) for cb in self.callback_handler.callbacks):
            self.add_callback(CompleteCheckpoints())  # marks checkpoints complete (kill-safe resume)

    def loss_options(self) -> LossOptions:
        a = self.args
        return LossOptions.of(a, loss_type=a.loss_type, nll_weight=a.nll_weight)

    def _save_checkpoint(self, model, trial):
        with keeping_the_newest_complete():  # the previous complete checkpoint stays until this is marked
            super()._save_checkpoint(model, trial)
