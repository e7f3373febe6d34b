"""Row ops of the Triton backend for the shared chunk schedule (see ``wrpo_kernels.chunked``).

The chunk's logits stay in the input dtype in one buffer: the GEMM writes them (cuBLAS via
``torch.mm``), the stats kernel reads them once, the grad kernel overwrites them with dL/dlogits.
"""

from __future__ import annotations

import torch

from ..chunked.schedule import GroupChunk
from ..objective import PreferenceSpec
from .loss_kernel import group_loss
from .row_kernels import row_grad_, row_stats


class TritonRowOps:
    name = "triton"

    def workspace(self, rows, vocab, dtype, device, *, softcap_grad: bool):
        return torch.empty(rows, vocab, dtype=dtype, device=device)

    def logits(self, ws, hidden, weight, bias, opts, *, for_grad: bool):
        out = ws[: hidden.shape[0]]
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)

    def stats(self, logits, safe, opts):
        return row_stats(logits, safe, opts)

    def grad(self, logits, safe, scale, lse, opts):
        return row_grad_(logits, safe, scale, lse, opts)

    def lowp(self, ws, n: int):
        return None  # the grad kernel already writes dL/dlogits in the input dtype

    def group_loss(self, spec: PreferenceSpec, tok, targets, c: GroupChunk, ref, lengths):
        # the kernel's n in c = beta / n (simpo), 1 / n (ipo); 1 where the loss does not divide by it
        n = targets.counts if spec.divides_by_length else torch.ones_like(targets.counts)
        return group_loss(spec, tok, targets.cu, n, ref, c.g0, c.g1)


TRITON_ROW_OPS = TritonRowOps()
