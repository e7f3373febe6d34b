"""Exact gradient accumulation and the alpha schedule of the trainers' shared core (``wrpo/train/core.py``).

The batch loss is a mean over groups (and, with ``nll_weight``, over first-chosen tokens). With N
micro-batches per optimizer step on W processes, each micro-batch returns its summed group losses
divided by the step's group count over all processes, times W (DDP and FSDP average gradients over
the processes): the gradients then add up to exactly those of one batch holding every group, also
when micro-batches differ in size.
"""

from __future__ import annotations

import torch

from wrpo.data.collate import batch_counts
from wrpo.train.alpha_schedule import alpha_at
from wrpo_kernels import Totals


class ExactAccumulation:
    """Mixin for a transformers ``Trainer`` whose ``compute_loss`` passes :meth:`step_totals` to
    :func:`wrpo.preference_loss` (``wrpo/train/core.py``)."""

    # compute_loss divides by the whole optimizer step's counts: the Trainer must not divide again
    loss_is_scaled_for_ga = True

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The optimizer step's micro-batches and their counts [2] (groups, first-chosen tokens) summed
        over the processes, handed to ``compute_loss`` as ``num_items_in_batch`` (transformers would
        count label tokens, which is not what a mean over groups divides by)."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            return batch_samples, None
        counts = torch.stack([batch_counts(b) for b in batch_samples]).sum(0).to(device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return batch_samples, counts

    def step_totals(self, num_items_in_batch) -> Totals:
        """The fused loss's denominators: the step's counts over the number of processes (which average
        the gradients); this micro-batch's own counts (``Totals()``) without them, e.g. in evaluation."""
        if num_items_in_batch is None:
            return Totals()
        world = self.accelerator.num_processes
        return Totals(groups=num_items_in_batch[0] / world, tokens=num_items_in_batch[1] / world)

    def current_alpha(self) -> float:
        """alpha at this optimizer step (global step g of N; an evaluation after the last sees g = N), by
        ``args.alpha_schedule`` (``linear``: alpha * g / N, the official WRPO trainer's)."""
        total = max(self.state.max_steps, 1)
        step = min(self.state.global_step, total)
        return alpha_at(step, total, alpha=self.args.alpha, schedule=self.args.alpha_schedule)
