"""One WRPO step of a tiny fp32 Llama under DeepSpeed ZeRO (stage 3 and 2), 2 CPU processes on gloo
(test_deepspeed.py).

:func:`run` (or ``python zero3_step.py OUT_DIR``) spawns the 2 ranks once; they run every case of
:data:`CASES` in turn, like ``fsdp_step.py`` (same batches, same global counts; DeepSpeed averages
the gradients over the ranks). ZeRO-3 partitions every parameter (``stage3_param_persistence_threshold``
0) and refuses fp64, so the comparison is in fp32. Rank 0 writes ``OUT_DIR/<case>.pt``: the mean of
the rank losses and the full gradients (``deepspeed.utils.safe_get_full_grad``).
"""

from __future__ import annotations

import os
import sys
from unittest import mock

import torch
import torch.distributed as dist
from fsdp_step import build_model, finish_rank, free_port, global_groups, rank_groups, spawn

from wrpo import batch_counts, pack_groups, pad_groups, preference_loss
from wrpo.data.collate import pack_shared_prefix

OPTIONS = {"beta": 0.3, "alpha": 0.2, "backend": "torch", "nll_weight": 0.2}
# name -> (ZeRO stage, layout, attention, tied embeddings)
CASES = {
    "zero3_padded": (3, "padded", "sdpa", False),
    "zero3_padded_tied": (3, "padded", "sdpa", True),
    "zero3_packed": (3, "packed", "wrpo_segments", False),
    "zero3_packed_tied": (3, "packed", "wrpo_segments", True),
    "zero3_shared": (3, "shared", "wrpo_segments", False),
    "zero2_packed": (2, "packed", "wrpo_segments", False),
    "zero3_offload_packed": (3, "packed", "wrpo_segments", False),
}


def collate(groups: list[dict], layout: str) -> dict:
    if layout == "padded":
        return pad_groups(groups, pad_token_id=0)
    pack = pack_shared_prefix if layout == "shared" else pack_groups
    return pack(groups, row_per_group=True, pad_token_id=0)


def step_loss(model, batch: dict, counts, world: int) -> torch.Tensor:
    """Each rank's summed group losses over the global counts divided by the ranks (DeepSpeed averages)."""
    norms = {"num_groups": counts[0] / world, "num_nll_tokens": counts[1] / world}
    return preference_loss(model, batch, ref_logps=batch["ref_logps"], **norms, **OPTIONS).loss


def single_process(case: str) -> dict:
    """Loss and gradients of one plain fp32 process on the whole global batch."""
    _, layout, attn, tied = CASES[case]
    model = build_model(attn, tied).float()
    batch = collate(global_groups(), layout)
    loss = step_loss(model, batch, batch_counts(batch), 1)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def ds_config(stage: int, offload: bool = False) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # every parameter partitioned, the head too
    if offload:  # parameters and optimizer states kept in CPU memory between uses
        zero.update(offload_param={"device": "cpu"}, offload_optimizer={"device": "cpu"})
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # the plain SGD below, not DeepSpeed's compiled CPU Adam
        "zero_allow_untested_optimizer": True,
    }  # plain SGD at lr 0: the gradients are what is compared


def run_case(case: str, rank: int, world: int) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    stage, layout, attn, tied = CASES[case]
    model = build_model(attn, tied).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = ds_config(stage, offload="offload" in case)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    counts = batch_counts(collate(global_groups(), layout))
    batch = collate(rank_groups(rank, world), layout)
    with torch.no_grad():  # a first call registers the head with the model; the second must still work
        step_loss(engine, batch, counts, world)
    loss = step_loss(engine, batch, counts, world)
    engine.backward(loss)
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    partitioned = [n for n, p in engine.module.named_parameters() if p.numel() == 0]
    return {"loss": total / world, "grads": grads, "partitioned": partitioned}


def unregistered_head_control(rank: int, world: int) -> str | None:
    """The control: the head gathered without registering it with the model that runs the loss (as
    before the fix), under ZeRO-3 with an untied head: the error that backward raised, or None."""
    import deepspeed

    real = deepspeed.zero.GatheredParameters

    def unregistered(params, modifier_rank=None, fwd_module=None, enabled=True):
        return real(params, modifier_rank=modifier_rank, enabled=enabled)

    with mock.patch.object(deepspeed.zero, "GatheredParameters", unregistered):
        try:
            run_case("zero3_padded", rank, world)
        except RuntimeError as e:
            return str(e)
    return None


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    env = {
        "DS_ACCELERATOR": "cpu",
        "RANK": rank,
        "LOCAL_RANK": rank,
        "WORLD_SIZE": world,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
    os.environ.update({k: str(v) for k, v in env.items()})
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm

    # the shared-memory all-reduce op serves inference only; skip its ~1 minute JIT build
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")

    def cases() -> dict:
        results = {case: run_case(case, rank, world) for case in CASES}
        results["control"] = {"error": unregistered_head_control(rank, world)}  # last: it fails mid-step
        return results

    finish_rank(rank, cases, out_dir)


def run(out_dir, world: int = 2, timeout: float = 240.0) -> None:
    spawn(worker, (world, free_port(), str(out_dir)), world, timeout, "DeepSpeed")


if __name__ == "__main__":
    run(sys.argv[1])
