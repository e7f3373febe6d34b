"""Row ops of the torch backend on CPU tensors with the native kernels of ``csrc/`` (see ``native``).

A chunk's logits are kept *vocab-major*, ``logits_t = weight @ hidden^T + bias`` [V, n] in the input
dtype: on CPUs (MKL) the chunk's three GEMMs (W h^T; dX = g @ W with g a transposed view;
dW += g^T h) run faster in that layout than with [n, V].
``lse_target`` reads the buffer once (lse and target logit per token, fp32 math; fp64 for fp64),
``logit_grad_`` overwrites it with dL/dlogits (formulas in :mod:`.rows`): no fp32 twin, no softcap
buffer. The buffer is allocated once per call on transparent huge pages where the OS allows
(``workspace``): fresh 4 KiB pages cost one page fault each on first touch, 2 MiB pages 512 times
fewer.
"""

from __future__ import annotations

import torch

from ..chunked.options import HeadOptions
from .torch_rows import TorchRowOps


def padded_tokens(n: int, itemsize: int) -> int:
    """Row length (elements) of the [V, n] buffer: whole 64-byte lines, an odd number of them, so that
    reading down a column does not keep hitting the same cache sets (a measurable GEMM slowdown)."""
    per_line = 64 // itemsize
    lines = -(-n // per_line)
    return (lines + 1 - lines % 2) * per_line


class NativeRowOps:
    """The row-ops interface of ``wrpo_kernels.chunked`` on ``torch.ops.wrpo_kernels`` (CPU)."""

    name = "torch-native"

    def workspace(self, rows, vocab, dtype, device, *, softcap_grad: bool):
        """Room for [V, rows] logits in the input dtype (rows padded, see :func:`padded_tokens`)."""
        return torch.ops.wrpo_kernels.workspace(vocab, padded_tokens(rows, dtype.itemsize), dtype)

    def logits(self, ws, hidden, weight, bias, opts: HeadOptions, *, for_grad: bool):
        """Raw logits_t [V, n] = weight @ hidden^T + bias (softcap and 1/T are applied in the kernels)."""
        (V, n), ld = (weight.shape[0], hidden.shape[0]), padded_tokens(hidden.shape[0], ws.dtype.itemsize)
        out = ws.view(-1)[: V * ld].view(V, ld)[:, :n]
        if bias is None:
            return torch.mm(weight, hidden.t(), out=out)
        return torch.addmm(bias[:, None], weight, hidden.t(), out=out)

    def stats(self, logits_t, safe, opts: HeadOptions):
        """-> lse [n], target logit z[label] [n] (math dtype); ``logits_t`` untouched."""
        return torch.ops.wrpo_kernels.lse_target(logits_t, safe, opts.softcap, opts.temperature)

    def grad(self, logits_t, safe, scale, lse, opts: HeadOptions):
        """dL/dlogits [n, V] (a transposed view of the buffer, input dtype) for dL/d(log p) = ``scale``."""
        torch.ops.wrpo_kernels.logit_grad_(
            logits_t, safe, scale.to(lse.dtype).contiguous(), lse.contiguous(), opts.softcap, opts.temperature
        )
        return logits_t.t()

    def lowp(self, ws, n: int):
        return None  # dL/dlogits is already in the input dtype

    group_loss = TorchRowOps.group_loss


NATIVE_ROW_OPS = NativeRowOps()
