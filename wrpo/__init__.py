"""wrpo: the WRPO method on top of wrpo_kernels: the model-level loss, data collation, the alpha
schedule, the trainer (``wrpo.train.trainer.WRPOTrainer``) and the ``wrpo`` command line."""

from wrpo.data.collate import PreferenceCollator, batch_counts, pack_groups, pad_groups
from wrpo.model.capabilities import head_transform
from wrpo.model.losses import preference_loss, sequence_logps, sft_loss
from wrpo.train.alpha_schedule import ALPHA_SCHEDULES, alpha_at

__all__ = [
    "ALPHA_SCHEDULES",
    "PreferenceCollator",
    "alpha_at",
    "batch_counts",
    "head_transform",
    "pack_groups",
    "pad_groups",
    "preference_loss",
    "sequence_logps",
    "sft_loss",
]
