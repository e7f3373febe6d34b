"""Row work on one chunk of logits, in place on a reused buffer (docs/method.md §4).

For a chunk of n rows: ``z = softcap(h W^T + b) / T`` (one GEMM into the buffer, then in place),
``lse = log sum_v exp z_v``, ``log p = z[label] - lse``, and the gradient of the head

    dL/dx = scale * (onehot(label) - softmax(z)) * (1 - tanh^2(x / cap)) / T

written over the same buffer, where ``scale`` is dL/d(log p) of the row. Math runs in fp32
(fp64 for fp64 inputs); fp16/bf16 logits are copied to an fp32 twin of the buffer.
"""

from __future__ import annotations

import torch

from ..chunked.options import HeadOptions
from ..chunked.schedule import GroupChunk
from ..objective import PreferenceSpec, group_loss_and_grad, math_dtype
from ..packing import segment_sum


class Workspace:
    """One chunk of logits [rows, V], allocated once per call and reused for every chunk.

    ``raw`` holds the GEMM output in the input dtype; ``math`` is the same buffer for fp32/fp64
    inputs and an fp32 twin for fp16/bf16. ``cap`` holds the softcap derivative when needed.
    """

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device, *, softcap: bool):
        self.raw = torch.empty(rows, vocab, dtype=dtype, device=device)
        md = math_dtype(dtype)
        self.math = self.raw if md == dtype else torch.empty(rows, vocab, dtype=md, device=device)
        self.cap = torch.empty(rows, vocab, dtype=md, device=device) if softcap else None


def head_logits_(ws: Workspace, hidden, weight, bias, opts: HeadOptions, *, keep_capgrad: bool):
    """z [n, V] = softcap(hidden @ weight^T + bias) / T in ``ws.math``; also dz/dx * T if asked."""
    n = hidden.shape[0]
    raw = ws.raw[:n]
    if bias is None:
        torch.mm(hidden, weight.t(), out=raw)
    else:
        torch.addmm(bias, hidden, weight.t(), out=raw)
    z = ws.math[:n]
    if z.data_ptr() != raw.data_ptr():
        z.copy_(raw)
    capgrad = None
    if opts.softcap is not None:
        z.div_(opts.softcap).tanh_()
        if keep_capgrad:
            capgrad = torch.mul(z, z, out=ws.cap[:n]).neg_().add_(1.0)
        z.mul_(opts.softcap)
    if opts.temperature != 1.0:
        z.div_(opts.temperature)
    return z, capgrad


def softmax_stats_(z: torch.Tensor, safe_labels: torch.Tensor):
    """In place z <- exp(z - rowmax). Returns lse [n], target logit z[label] [n], rowmax [n]."""
    rowmax = z.amax(1, keepdim=True)
    target = z.gather(1, safe_labels[:, None]).squeeze(1)
    sumexp = z.sub_(rowmax).exp_().sum(1)
    rowmax = rowmax.squeeze(1)
    return rowmax + sumexp.log(), target, rowmax


def softmax_grad_(z, safe_labels, scale, lse, *, rowmax=None, capgrad=None):
    """In place: z <- scale * (onehot(label) - exp(z - lse)) [* capgrad].

    ``z`` holds either logits, or ``exp(z - rowmax)`` from :func:`softmax_stats_` (pass ``rowmax``):
    then the softmax is ``z * exp(rowmax - lse)``. ``lse`` may be that of a wider softmax than these
    columns (a vocabulary shard's rows). ``scale`` [n] already includes the 1/T of the temperature.
    """
    if rowmax is None:
        z.sub_(lse[:, None]).exp_()
        coef = -scale
    else:
        coef = -scale * (rowmax - lse).exp()
    z.mul_(coef[:, None]).scatter_add_(1, safe_labels[:, None], scale[:, None])
    if capgrad is not None:
        z.mul_(capgrad)
    return z


class _RowState:
    """A chunk's logits in ``ws.math`` (``z``), the softcap derivative, and the row maxima once
    :func:`softmax_stats_` has turned z into ``exp(z - rowmax)``."""

    def __init__(self, z, capgrad):
        self.z, self.capgrad, self.rowmax = z, capgrad, None


class TorchRowOps:
    """Row work with torch element-wise ops on an fp32 copy of the chunk's logits."""

    name = "torch"

    def workspace(self, rows, vocab, dtype, device, *, softcap_grad: bool) -> Workspace:
        return Workspace(rows, vocab, dtype, device, softcap=softcap_grad)

    def logits(self, ws, hidden, weight, bias, opts: HeadOptions, *, for_grad: bool) -> _RowState:
        return _RowState(*head_logits_(ws, hidden, weight, bias, opts, keep_capgrad=for_grad))

    def stats(self, st: _RowState, safe, opts: HeadOptions):
        lse, target, st.rowmax = softmax_stats_(st.z, safe)
        return lse, target

    def grad(self, st: _RowState, safe, scale, lse, opts: HeadOptions):
        """dL/dx [n, V] (math dtype) for dL/d(log p) = ``scale`` [n], the softmax normalised by ``lse``."""
        return softmax_grad_(st.z, safe, scale / opts.temperature, lse, rowmax=st.rowmax, capgrad=st.capgrad)

    def lowp(self, ws: Workspace, n: int):
        return ws.raw[:n]

    def group_loss(self, spec: PreferenceSpec, tok, targets, c: GroupChunk, ref, lengths):
        """Per-sequence sums s [b*K] of the chunk's groups, their losses [b] and dL/ds [b, K].

        ``tok`` [N] per-token log-probs; ``ref`` and ``lengths`` [B, K] for the whole batch.
        """
        K = spec.responses_per_prompt
        s0, s1 = c.g0 * K, c.g1 * K
        s = segment_sum(tok[c.t0 : c.t1], targets.seq[c.t0 : c.t1] - s0, s1 - s0)
        ref = None if ref is None else ref[c.g0 : c.g1]
        loss, ds = group_loss_and_grad(spec, s.view(-1, K), ref, lengths[c.g0 : c.g1])
        return s, loss, ds


TORCH_ROW_OPS = TorchRowOps()
