"""A head weight sharded other than over the vocabulary (a DTensor not placed Shard(0)) or released by
DeepSpeed ZeRO-3 (0 elements) cannot be used: both entry points refuse it with a ValueError that says
what to do, instead of a shape error or a silently wrong loss. A Shard(0) DTensor is a vocabulary-
parallel head (tests/distributed/test_tensor_parallel.py); on a one-rank mesh it gives the plain result."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import make_batch

from wrpo_kernels import fused_linear_wrpo_loss, linear_logprobs


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """A one-process gloo group (file store: no port to pick) and its 1-D CPU device mesh."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    from torch.distributed.device_mesh import init_device_mesh

    own = not dist.is_initialized()
    if own:
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (dist.get_world_size(),))
    finally:
        if own:
            dist.destroy_process_group()


@pytest.fixture
def batch():
    return make_batch(B=2, K=3, H=4, V=11, seed=0, min_len=2, max_len=4, with_bias=True)


def fused(batch, weight, bias=None):
    return fused_linear_wrpo_loss(
        batch.hidden,
        weight,
        batch.labels,
        batch.cu_seqlens,
        bias=bias,
        ref_logps=batch.ref_logps,
        backend="torch",
    )


def logprobs(batch, weight, bias=None):
    return linear_logprobs(batch.hidden, weight, batch.labels, batch.cu_seqlens, bias=bias, backend="torch")


ENTRY_POINTS = {"fused": fused, "logprobs": logprobs}
DTENSOR = (
    r"weight is a DTensor placed \(Shard\(dim=1\),\).*sharded over the vocabulary only.*"
    r"call the loss inside the model's forward.*wrpo\.preference_loss\(model, batch\)"
)
RELEASED = (
    r"weight has 0 elements \(a parameter released by DeepSpeed ZeRO-3\?\)"
    r".*wrpo\.preference_loss\(model, batch\)"
)


def sharded(t, mesh, dim: int = 0):
    from torch.distributed.tensor import Shard, distribute_tensor

    return torch.nn.Parameter(distribute_tensor(t, mesh, [Shard(dim)]))


@pytest.mark.parametrize("call", ENTRY_POINTS)
def test_a_weight_sharded_over_h_is_refused(call, batch, mesh):
    weight = sharded(batch.weight, mesh, dim=1)
    with pytest.raises(ValueError, match=DTENSOR):
        ENTRY_POINTS[call](batch, weight)


@pytest.mark.parametrize("call", ENTRY_POINTS)
def test_a_dtensor_bias_beside_a_plain_weight_is_refused(call, batch, mesh):
    bias = sharded(batch.bias, mesh)
    with pytest.raises(ValueError, match="bias is a DTensor but weight is not: shard both"):
        ENTRY_POINTS[call](batch, batch.weight, bias)


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize(
    "released",
    [
        lambda b: torch.empty(0, dtype=b.weight.dtype),
        lambda b: torch.nn.Parameter(torch.empty(0, dtype=b.weight.dtype)),
    ],
    ids=["empty", "parameter"],
)
def test_released_weight_is_refused(call, released, batch):
    with pytest.raises(ValueError, match=RELEASED):
        ENTRY_POINTS[call](batch, released(batch))


@pytest.mark.parametrize("call", ENTRY_POINTS)
def test_released_bias_is_refused(call, batch):
    with pytest.raises(ValueError, match=RELEASED.replace("weight", "bias", 1)):
        ENTRY_POINTS[call](batch, batch.weight, torch.empty(0, dtype=batch.weight.dtype))


def test_gathered_weight_works(batch, mesh):
    """What gathering gives back (the full tensor of the DTensor) is accepted as usual."""
    weight = sharded(batch.weight, mesh)
    full = weight.full_tensor()
    expected = fused(batch, batch.weight).loss
    assert torch.equal(fused(batch, full).loss, expected)


@pytest.mark.parametrize("call", ENTRY_POINTS)
def test_a_vocabulary_shard_on_one_rank_is_the_whole_head(call, batch, mesh):
    """Shard(0) over a one-rank mesh: a vocabulary-parallel head of one rank, the plain result."""
    expected = ENTRY_POINTS[call](batch, batch.weight, batch.bias)
    got = ENTRY_POINTS[call](batch, sharded(batch.weight, mesh), sharded(batch.bias, mesh))
    if call == "fused":
        expected, got = expected.loss, got.loss
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
