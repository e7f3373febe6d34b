"""What every chunked backend shares: options of the head, prepared labels, gradient accumulators."""

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
    """How logits are formed, ``softcap(h W^T + b) / temperature``, and which labels count."""

    ignore_index: int = -100
    softcap: float | None = None
    temperature: float = 1.0


@dataclass(frozen=True)
class Targets:
    """The labels of packed rows, prepared once per call.

    safe [N] int64 (ignored -> 0), valid [N] 1/0 in the math dtype, seq [N] sequence of each
    token, counts [S] int64 valid tokens per sequence, cu [S+1] int64 sequence bounds.
    """

    safe: torch.Tensor
    valid: torch.Tensor
    seq: torch.Tensor
    counts: torch.Tensor
    cu: torch.Tensor

    @classmethod
    def build(cls, labels, rows, ignore_index: int, dtype: torch.dtype) -> Targets:
        """``rows``: the validated layout (``api.PackedRows``: cu, seq, counts)."""
        valid = labels != ignore_index
        safe = torch.where(valid, labels, 0).to(torch.int64)
        return cls(safe, valid.to(math_dtype(dtype)), rows.seq, rows.counts, rows.cu)


class HeadGrads:
    """dX [N, H] (input dtype); dW [V, H] and db [V] accumulated in fp32 (fp64 for fp64); None if unneeded.

    dW and db start uninitialised: the first :meth:`add_rows_` writes them (GEMM with beta = 0), later
    ones add, so no zero fill of a [V, H] buffer is paid per call.
    """

    def __init__(self, hidden, weight, needs):
        md = math_dtype(hidden.dtype)
        self.dX = torch.empty_like(hidden) if needs[0] else None
        self.dW = torch.empty(weight.shape, dtype=md, device=weight.device) if needs[1] else None
        self.db = torch.empty(weight.shape[0], dtype=md, device=weight.device) if needs[2] else None
        self._written = False

    def add_rows_(self, dlogits, a: int, b: int, hidden, weight, lowp=None):
        """Rows [a, b): dX = dlogits @ W; dW += dlogits^T @ hidden; db += sum of the rows of dlogits.

        ``dlogits`` may be in the math dtype (then ``lowp``, a buffer in the input dtype, receives a
        copy for the GEMMs) or already in the input dtype. Each chunk's dW product is formed in fp32,
        not rounded to bf16 before the sum.
        """
        beta = 1.0 if self._written else 0.0  # beta = 0: the uninitialised buffer is not read
        self._written = True
        g = dlogits
        if g.dtype != hidden.dtype:
            g = lowp.copy_(dlogits)
        if self.dX is not None:
            torch.mm(g, weight, out=self.dX[a:b])
        if self.dW is not None:
            if self.dW.dtype == g.dtype:
                self.dW.addmm_(g.t(), hidden[a:b], beta=beta)
            elif g.is_cuda:
                part = torch.mm(g.t(), hidden[a:b], out_dtype=self.dW.dtype)
                if beta:
                    self.dW.add_(part)
                else:
                    self.dW.copy_(part)
            else:
                self.dW.addmm_(dlogits.t().to(self.dW.dtype), hidden[a:b].to(self.dW.dtype), beta=beta)
        if self.db is not None:
            part = dlogits.sum(0, dtype=self.db.dtype)
            if beta:
                self.db.add_(part)
            else:
                self.db.copy_(part)

    def scale_(self, grad_output: torch.Tensor) -> None:
        """Multiply the gradients by dL/d(output); skipped for a CPU 1.0 (``loss.backward()``)."""
        self._zero_if_unwritten()
        if grad_output.device.type == "cpu" and grad_output.numel() == 1 and grad_output.item() == 1.0:
            return
        for g in (self.dX, self.dW, self.db):
            if g is not None:
                g.mul_(grad_output)

    def _zero_if_unwritten(self):
        """No row reached the head (an empty batch): the gradients are zero."""
        if not self._written:
            for g in (self.dW, self.db):
                if g is not None:
                    g.zero_()
            self._written = True

    def to_input_dtypes(self, weight_dtype, bias_dtype):
        """(dX, dW, db) with dW and db cast back to the parameters' dtypes."""
        self._zero_if_unwritten()
        dW = None if self.dW is None else self.dW.to(weight_dtype)
        db = None if self.db is None else self.db.to(bias_dtype)
        return self.dX, dW, db
