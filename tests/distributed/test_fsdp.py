"""Two CPU processes under FSDP2 (``fully_shard`` per decoder layer, then the root; gloo) equal one
process on the same global batch, through ``wrpo.preference_loss``: fp64, padded and packed batches,
untied and tied embeddings, with the global counts as ``num_groups`` / ``num_nll_tokens``."""

from __future__ import annotations

import pytest
import torch
from fsdp_step import CASES, OPTIONS, WORLD, collate, global_groups, rank_groups, run, single_process
from helpers import max_rel_err

from wrpo import preference_loss

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Every case's FSDP2 result (one spawn of the ranks for all of them)."""
    out = tmp_path_factory.mktemp("fsdp")
    run(out)
    return {name: torch.load(out / f"{name}.pt") for name in (*CASES, "control")}


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_matches_single_process(sharded, case):
    fsdp, one = sharded[case], single_process(case)
    assert fsdp["tied"] == one["tied"] == CASES[case][2]  # the tied cases really share one parameter
    assert fsdp["weight_after"] == "DTensor" and fsdp["forward_restored"]
    assert max_rel_err(fsdp["loss"], one["loss"]) < 1e-10
    assert fsdp["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():
        assert fsdp["grads"][name].dtype == torch.float64
        assert max_rel_err(fsdp["grads"][name], grad) < 1e-10, name
    assert all(g.abs().max() > 0 for g in one["grads"].values())


def test_sharded_head_weight_is_refused_outside_the_forward(sharded):
    """The control: outside the model's forward the head weight is a shard, and the fused loss refuses it,
    so what makes the FSDP2 cases work is preference_loss running the loss inside the forward."""
    control = sharded["control"]
    assert control["weight_type"] == "DTensor"
    assert control["local_shape"] == (40 // WORLD, 32)
    assert control["error"] is not None and control["error"][0] == "ValueError", control["error"]
    assert "DTensor" in control["error"][1]


def test_rank_means_without_the_global_counts_would_differ():
    """The control for num_nll_tokens: the ranks' first-chosen token counts differ, so averaging each
    rank's own NLL mean is not the global NLL mean (the FSDP cases above pass the global counts)."""
    from fsdp_step import build_model

    model = build_model("sdpa", False)

    def loss(groups):
        batch = collate(groups, "padded")
        out = preference_loss(model, batch, ref_logps=batch["ref_logps"].double(), nll_weight=0.2, **OPTIONS)
        return out.loss.detach()

    global_loss = loss(global_groups())
    rank_mean = sum(loss(rank_groups(r)) for r in range(WORLD)) / WORLD
    assert max_rel_err(rank_mean, global_loss) > 1e-6
