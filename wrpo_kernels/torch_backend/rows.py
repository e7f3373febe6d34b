"""Row work on one chunk of logits, in place on a reused buffer (DESIGN §4).

For a chunk of n rows: ``z = softcap(h W^T + b) / T`` (one GEMM into the buffer, then in place),
``lse = log sum_v exp z_v``, ``log p = z[label] - lse``, and the gradient of the head

    dL/dx = scale * (onehot(label) - softmax(z)) * (1 - tanh^2(x / cap)) / T

written over the same buffer, where ``scale`` is dL/d(log p) of the row. Math runs in fp32
(fp64 for fp64 inputs); fp16/bf16 logits are copied to an fp32 twin of the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_tokens(vocab: int, device: torch.device) -> int:
    """Rows per chunk so that one fp32 chunk of logits takes ~1 GiB on a GPU, ~256 MiB on a CPU."""
    budget = (1 << 30) if device.type == "cuda" else (256 << 20)
    return max(16, budget // (4 * vocab))


@dataclass(frozen=True)
class HeadOptions:
    """How logits are formed and which labels count."""

    ignore_index: int = -100
    softcap: float | None = None
    temperature: float = 1.0


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
    """In place z <- exp(z - rowmax). Returns lse [n], target logit z[label] [n], sum of exp [n]."""
    rowmax = z.amax(1, keepdim=True)
    target = z.gather(1, safe_labels[:, None]).squeeze(1)
    sumexp = z.sub_(rowmax).exp_().sum(1)
    return rowmax.squeeze(1) + sumexp.log(), target, sumexp


def softmax_grad_(z, safe_labels, scale, *, lse=None, sumexp=None, capgrad=None):
    """In place: z <- scale * (onehot(label) - softmax) [* capgrad].

    ``z`` holds either logits (pass ``lse``) or ``exp(z - rowmax)`` from :func:`softmax_stats_`
    (pass ``sumexp``). ``scale`` [n] already includes the 1/T of the temperature.
    """
    if lse is not None:
        z.sub_(lse[:, None]).exp_()
        coef = -scale
    else:
        coef = -scale / sumexp
    z.mul_(coef[:, None]).scatter_add_(1, safe_labels[:, None], scale[:, None])
    if capgrad is not None:
        z.mul_(capgrad)
    return z


class HeadGrads:
    """dX [N, H] (input dtype); dW [V, H] and db [V] accumulated in fp32 (fp64 for fp64); None if unneeded."""

    def __init__(self, hidden, weight, needs):
        md = math_dtype(hidden.dtype)
        self.dX = torch.empty_like(hidden) if needs[0] else None
        self.dW = torch.zeros(weight.shape, dtype=md, device=weight.device) if needs[1] else None
        self.db = torch.zeros(weight.shape[0], dtype=md, device=weight.device) if needs[2] else None

    def add_rows_(self, ws: Workspace, dlogits, a: int, b: int, hidden, weight):
        """Rows [a, b): dX = dlogits @ W; dW += dlogits^T @ hidden; db += sum of the rows of dlogits."""
        g = dlogits
        if g.dtype != hidden.dtype:
            g = ws.raw[: b - a].copy_(dlogits)
        if self.dX is not None:
            torch.mm(g, weight, out=self.dX[a:b])
        if self.dW is not None:  # each chunk's product in fp32, not rounded to bf16 before the sum
            if self.dW.dtype == g.dtype:
                self.dW.addmm_(g.t(), hidden[a:b])
            elif g.is_cuda:
                self.dW.add_(torch.mm(g.t(), hidden[a:b], out_dtype=self.dW.dtype))
            else:
                self.dW.addmm_(dlogits.t(), hidden[a:b].to(self.dW.dtype))
        if self.db is not None:
            self.db.add_(dlogits.sum(0))


@dataclass(frozen=True)
class Targets:
    """The labels of packed rows, prepared once per call.

    safe [N] int64 (ignored -> 0), valid [N] 1/0 in the math dtype, seq [N] sequence of each
    token, counts [S] int64 valid tokens per sequence.
    """

    safe: torch.Tensor
    valid: torch.Tensor
    seq: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def build(cls, labels, seq, counts, ignore_index: int, dtype: torch.dtype) -> Targets:
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0).to(torch.int64)
        return cls(safe, valid.to(math_dtype(dtype)), seq, counts)
