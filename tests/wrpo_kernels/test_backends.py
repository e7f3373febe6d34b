"""Every backend answers the same calls (``autoselect.Backend``), every chunked backend's row ops the
same protocol (``chunked.RowOps``), and the reference backend runs through the same public code path."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch

import wrpo_kernels as wk
from wrpo_kernels import autoselect
from wrpo_kernels.chunked import RowOps
from wrpo_kernels.torch_backend.native_rows import NATIVE_ROW_OPS
from wrpo_kernels.torch_backend.torch_rows import TORCH_ROW_OPS
from wrpo_kernels.triton_backend.ops import TRITON_ROW_OPS


@pytest.mark.parametrize("name", ["torch", "triton", "reference"])
def test_every_backend_answers_the_backend_protocol(name):
    assert isinstance(autoselect.backend(name), autoselect.Backend)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="not available"):
        autoselect.resolve_backend("naive", torch.device("cpu"))
    with pytest.raises(ValueError, match="not available"):
        autoselect.backend("auto")  # auto is a choice, not an implementation


@pytest.mark.parametrize("ops", [TORCH_ROW_OPS, NATIVE_ROW_OPS, TRITON_ROW_OPS], ids=lambda o: o.name)
def test_row_ops_answer_the_protocol(ops):
    assert isinstance(ops, RowOps)


def test_reference_backend_sees_every_row(monkeypatch):
    """The oracle gets the ignored rows too (the chunked backends drop them themselves)."""
    batch = make_batch(B=2, K=2, H=4, V=11, seed=3, min_len=3, ignore_frac=0.4)
    seen = []
    real = autoselect.reference.BACKEND.fused_linear_wrpo_loss

    def spy(x, **kwargs):
        seen.append(x.hidden.shape[0])
        return real(x, **kwargs)

    monkeypatch.setattr(autoselect.reference.BACKEND, "fused_linear_wrpo_loss", spy)
    wk.fused_linear_wrpo_loss(
        batch.hidden,
        batch.weight,
        batch.labels,
        batch.cu_seqlens,
        responses_per_prompt=2,
        num_chosen=1,
        ref_logps=batch.ref_logps,
        backend="reference",
    )
    assert seen == [batch.N]
