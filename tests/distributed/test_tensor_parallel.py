"""Tensor parallel: an LM head sharded over the vocabulary (``ColwiseParallel`` on ``lm_head``, a DTensor
``Shard(0)``) on 2 CPU processes (gloo) equals one plain process, fp64 within 1e-10: a tiny Llama through
``wrpo.preference_loss`` / ``sequence_logps`` / ``sft_loss`` (padded, packed and shared-prefix batches,
V = 41 over 2 ranks), ``wrpo_kernels``' functions on a distributed weight and bias with every option,
the Triton backend in fp32 (its interpreter on CPU), and FSDP2 x TP on a 2 x 2 mesh (4 processes). The
refusals, and the collectives per chunk: the same bytes whatever the vocabulary. distributed/tp_step.py runs
the ranks (one spawn for the 2-rank cases, one for the 2 x 2 mesh)."""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, max_rel_err
from tp_step import (
    COMM_CHUNKS,
    COMM_VOCABS,
    FUNCTIONAL,
    MESH_CASES,
    MODEL_CASES,
    functional_batch,
    functional_case,
    mesh_case,
    model_case,
    run_mesh,
    run_tp,
    triton_available,
)

from wrpo_kernels.chunked.schedule import plan_group_chunks

pytest.importorskip("torch.distributed.tensor.parallel")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

TOL = 1e-10
TRITON_TOL = 2e-5  # fp32 against the fp64 torch reference
SHARD0 = ("DTensor", "(Shard(dim=0),)")
REPLICATED = "hold different labels or sequence bounds"  # vocab_parallel.check_replicated's refusal


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    """Every 2-rank result (one spawn for all of them)."""
    out = tmp_path_factory.mktemp("tp")
    run_tp(out)
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """Every 2 x 2 (dp, tp) result (one spawn of 4 ranks)."""
    out = tmp_path_factory.mktemp("mesh")
    run_mesh(out)
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


def errors(ours: dict, ref: dict, keys) -> dict:
    """name -> max relative error for every tensor (and every tensor of a dict) under ``keys``."""
    out = {}
    for key in keys:
        a, b = ours[key], ref[key]
        if isinstance(b, dict):
            assert a.keys() == b.keys(), key
            out.update({f"{key}/{k}": max_rel_err(a[k], v) for k, v in b.items()})
        elif b is None:
            assert a is None, key
        else:
            out[key] = max_rel_err(a, b)
    return out


def assert_within(errs: dict, tol: float, what: str) -> None:
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{what}: {bad} > {tol:.0e}"


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_with_a_colwise_head_matches_one_process(tp, case):
    ours, one = tp[f"model_{case}"], model_case(case)
    tied = MODEL_CASES[case][2]
    assert ours["tied"] == one["tied"] == tied
    assert (
        ours["weight"] == ours["weight_grad"] == SHARD0
    )  # the gradient lands on the DTensor, same placements
    keys = ("loss", "logps", "metrics", "grads", "sequence_logps", "sft_loss", "sft_logps", "sft_grads")
    errs = errors(ours, one, keys)
    assert_within(errs, TOL, case)
    assert {"logits/chosen", "logits/rejected", "nll_loss"} <= ours["metrics"].keys()
    assert len(ours["grads"]) == len(one["grads"]) == (20 if tied else 21)
    assert all(g.abs().max() > 0 for g in one["grads"].values())


@pytest.mark.parametrize("name", list(FUNCTIONAL))
def test_functional_on_a_vocabulary_sharded_weight_matches_one_process(tp, name):
    call, _, _, with_bias, backend = FUNCTIONAL[name]
    triton = backend == "triton"
    if triton and not triton_available():
        pytest.skip("the Triton backend cannot run here")
    ours, one = tp[f"functional_{name}"], functional_case(name, reference=triton)
    keys = [k for k in ("loss", "logps", "metrics", "dX", "dW", "db") if k in one]
    assert keys == [k for k in ("loss", "logps", "metrics", "dX", "dW", "db") if k in ours]
    assert_within(errors(ours, one, keys), TRITON_TOL if triton else TOL, name)
    if call == "fused":
        assert {"logits/chosen", "logits/rejected"} <= ours["metrics"].keys()
    if call == "logprobs_no_grad":
        assert not ours["requires_grad"]
    else:
        assert ours["dW_type"] == SHARD0 and (ours["db"] is not None) == with_bias


def test_refusals(tp):
    r = tp["refusals"]
    assert all(r[k] is not None and r[k][0] == "ValueError" for k in r if k != "fsdp_placements"), r
    assert "weight is a DTensor placed (Shard(dim=1),)" in r["shard1"][1]
    for name in ("different_labels", "different_labels_logprobs", "fsdp_outside_forward"):
        assert REPLICATED in r[name][1], r[name]
    # FSDP2's data-parallel shard of the head is a Shard(0) too: only the batches tell them apart
    assert r["fsdp_placements"] == "(Shard(dim=0),)"
    assert r["fsdp_outside_forward"][1] == r["different_labels"][1]
    assert "backend='reference'" in r["reference"][1] and "full_tensor()" in r["reference"][1]
    assert "bias must be sharded like weight" in r["bias_not_sharded"][1]


def test_colwise_head_alone_on_a_tied_model_is_refused(tp):
    """torch's parallelize_module registers a new DTensor parameter on the head: with tied embeddings
    the embedding keeps the old one, and the step would train an untied model (gradients 55-98% off the
    tied one's) under a config that says tied. Refused, naming the plan that keeps them tied (the tied
    case above makes the embedding RowwiseParallel and ties again)."""
    ours = tp["untied"]
    assert ours["tie_word_embeddings"] and not ours["tied"]
    assert (ours["embed"], ours["head"]) == ("Parameter", "DTensor")
    kind, message = ours["error"]
    assert kind == "ValueError" and "tie_word_embeddings=True" in message
    assert "RowwiseParallel(input_layouts=Replicate())" in message and "model.tie_weights()" in message


@pytest.mark.parametrize("case", MESH_CASES)
def test_fsdp2_x_tp_on_a_2x2_mesh_matches_one_process(mesh, case):
    ours, one = mesh[f"mesh_{case}"], mesh_case(case)
    assert ours["seen"] == [
        (*SHARD0, ("tp",))
    ]  # inside the forward: FSDP gathered over dp, the tp shard left
    assert ours["weight"] == ours["weight_grad"] == ("DTensor", "(_StridedShard(dim=0, sf=2), Shard(dim=0))")
    assert one["seen"] == [("Parameter", "None", None)]
    assert ours["forward_restored"]
    assert_within(errors(ours, one, ("loss", "grads")), TOL, case)
    assert len(ours["grads"]) == 21


def test_fsdp2_x_tp_head_outside_the_forward_is_refused(mesh):
    control = mesh["mesh_control"]
    assert control["placements"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    assert control["error"][0] == "ValueError"
    assert f"weight is a DTensor placed {control['placements']}" in control["error"][1]


def test_collectives_per_chunk_do_not_grow_with_the_vocabulary(tp):
    """Per chunk (row tile) of a fused loss call, 2 all-reduces: MAX of [n] and SUM of [2, n] in the
    math dtype (fp64 here), 24 n bytes; per call an all_gather of the shard sizes, a [6] fingerprint,
    the [H + 1] metric sums, and in the backward one [n, H] all-reduce of dX over the n labelled rows
    (the rows that reach the head). Both vocabularies alike."""
    comm = tp["communication"]
    batch = functional_batch()
    kept = torch.tensor([0, *batch.counts.cumsum(0).tolist()])  # the rows that reach the head
    H = batch.hidden.shape[1]
    n_labelled = int((batch.labels != IGNORE).sum())
    assert n_labelled < batch.hidden.shape[0]  # prompt rows are left out of the dX all-reduce
    for chunk in COMM_CHUNKS:
        records = [comm[(v, chunk)] for v in COMM_VOCABS]
        assert records[0]["local_rows"] == 21 and records[1]["local_rows"] == 2001
        assert (
            records[0]["forward"] == records[1]["forward"]
            and records[0]["backward"] == records[1]["backward"]
        )
        fwd, bwd = records[0]["forward"], records[0]["backward"]
        assert fwd[0] == ("_all_gather_sizes", "ALL_GATHER", (1,), "torch.int64", 16)
        assert fwd[1] == ("vocab_parallel.all_reduce<-check_replicated", "MAX", (6,), "torch.int64", 48)
        assert fwd[-1] == (
            "vocab_parallel.all_reduce<-mean_logit_metrics",
            "SUM",
            (H + 1,),
            "torch.float64",
            8 * (H + 1),
        )
        tiles = [b - a for c in plan_group_chunks(kept.tolist(), batch.K, chunk) for a, b in c.tiles]
        stats = fwd[2:-1]
        assert len(stats) == 2 * len(tiles)
        for n, (lse, parts) in zip(tiles, zip(stats[::2], stats[1::2], strict=True), strict=True):
            assert lse == ("vocab_parallel.all_reduce<-stats", "MAX", (n,), "torch.float64", 8 * n)
            assert parts == ("vocab_parallel.all_reduce<-stats", "SUM", (2, n), "torch.float64", 16 * n)
        assert sum(tiles) == int((batch.labels != IGNORE).sum())
        assert bwd == [
            (
                "vocab_parallel.all_reduce<-backward",
                "SUM",
                (n_labelled, H),
                "torch.float64",
                8 * n_labelled * H,
            )
        ]
    assert len(comm[(COMM_VOCABS[0], 4)]["forward"]) > len(
        comm[(COMM_VOCABS[0], 16)]["forward"]
    )  # groups cut
