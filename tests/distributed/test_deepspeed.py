"""Two CPU processes under DeepSpeed ZeRO-3 (every parameter partitioned) and ZeRO-2 equal one plain
process on the same global batch through ``wrpo.preference_loss``: fp32 (ZeRO-3 refuses fp64), padded,
packed and shared-prefix batches, untied and tied heads, NLL with the global counts."""

from __future__ import annotations

import pytest
import torch
from helpers import max_rel_err

pytest.importorskip("deepspeed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from zero3_step import CASES, run, single_process  # noqa: E402


@pytest.fixture(scope="module")
def zero(tmp_path_factory):
    """Every case's DeepSpeed result (one spawn of the ranks for all of them)."""
    out = tmp_path_factory.mktemp("zero")
    run(out)
    return {name: torch.load(out / f"{name}.pt") for name in (*CASES, "control")}


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_zero_matches_single_process(zero, case):
    sharded, one = zero[case], single_process(case)
    stage = CASES[case][0]
    # ZeRO-3 really partitioned every parameter (the head included); ZeRO-2 none
    assert len(sharded["partitioned"]) == (len(one["grads"]) if stage == 3 else 0)
    assert max_rel_err(sharded["loss"], one["loss"]) < 1e-6
    assert sharded["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():
        assert max_rel_err(sharded["grads"][name], grad) < 1e-5, name
    assert all(g.abs().max() > 0 for g in one["grads"].values())


def test_an_unregistered_head_breaks_zero3(zero):
    """The control: gathering the head only for the loss's forward, without registering it with the
    model that runs the loss, leaves its weight gradient to land on a re-partitioned (empty) parameter."""
    assert zero["control"]["error"] is not None
    assert "size of tensor a (0) must match" in zero["control"]["error"]
