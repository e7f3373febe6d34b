"""The row work a chunked backend plugs into the shared chunk schedule (docs/method.md §4).

The schedule (:mod:`.fused_loss`, :mod:`.logprobs`) decides which rows share a buffer of logits and
runs the GEMMs for the gradients; a backend supplies what happens inside one chunk: torch element-wise
ops (``torch_backend.torch_rows``), the native CPU kernels (``torch_backend.native_rows``) or the Triton
kernels (``triton_backend.ops``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..objective import PreferenceSpec
    from .options import HeadOptions
    from .schedule import GroupChunk
    from .targets import Targets


@runtime_checkable
class RowOps(Protocol):
    """What a chunked backend does within one chunk of n rows of logits over a vocabulary of V."""

    name: str

    def workspace(
        self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device, *, softcap_grad: bool
    ) -> Any:
        """Buffers for one chunk of logits (at most ``rows`` rows), allocated once per call and reused."""

    def logits(
        self, ws: Any, hidden: torch.Tensor, weight, bias, opts: HeadOptions, *, for_grad: bool
    ) -> Any:
        """The chunk's GEMM into ``ws``, plus what the row work needs (``for_grad``: the gradient will be
        taken from this state); returns the state that :meth:`stats` and :meth:`grad` read."""

    def stats(
        self, state: Any, safe_labels: torch.Tensor, opts: HeadOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: lse [n] and the target logit z[label] [n], in the math dtype."""

    def grad(
        self, state: Any, safe_labels, scale: torch.Tensor, lse: torch.Tensor, opts: HeadOptions
    ) -> torch.Tensor:
        """dL/dx [n, V] (any strides, computed in place where possible) for dL/d(log p) = ``scale`` [n]:
        ``scale * (onehot(label) - exp(z - lse))`` times the soft cap's derivative, with the given ``lse``
        (which may normalise over a wider vocabulary than these columns: a shard of the head)."""

    def lowp(self, ws: Any, n: int) -> torch.Tensor | None:
        """A buffer [n, V] in the input dtype for the gradient GEMMs, when :meth:`grad` returns the math
        dtype; None when it already returns the input dtype."""

    def group_loss(
        self, spec: PreferenceSpec, tok: torch.Tensor, targets: Targets, chunk: GroupChunk, ref, lengths
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sequence sums s [b*K] of the chunk's b groups, their losses [b] and dL/ds [b, K], from
        per-token log-probs ``tok`` [N]; ``ref`` and ``lengths`` are the whole batch's [B, K]."""
