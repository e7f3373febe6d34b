"""One WRPO step of a tiny fp64 Llama under FSDP2 (``fully_shard``), 2 CPU processes on gloo (test_fsdp.py).

:func:`run` (or ``python fsdp_step.py OUT_DIR``) spawns the 2 ranks once; they run every case of
:data:`CASES` in turn. Each rank takes its half of a fixed global batch of groups
(:func:`rank_groups`) and divides its summed losses by the global batch's counts over the number
of ranks, since FSDP2 averages the gradients over the ranks. Rank 0 writes ``OUT_DIR/<case>.pt``:
the mean of the rank losses, the full gradients (``grad.full_tensor()``) and what the model looked
like after the step, plus what the negative control saw (``control.pt``).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

import wrpo.model.attention  # noqa: F401  (registers attn_implementation="wrpo_segments")
from wrpo import batch_counts, pack_groups, pad_groups, preference_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (helpers), when run as a script
from helpers import random_groups  # noqa: E402
from helpers.tiny_models import LLAMA_2x32, tiny_model  # noqa: E402

GROUPS, K, VOCAB, WORLD = 4, 3, 40, 2
OPTIONS = {"beta": 0.3, "alpha": 0.2, "backend": "torch"}

# name -> (layout, attention, tied embeddings, nll_weight, global counts as num_groups/num_nll_tokens)
CASES = {
    "padded": ("padded", "sdpa", False, 0.2, True),
    "padded_tied": ("padded", "sdpa", True, 0.2, True),
    "rows": ("rows", "sdpa", False, 0.2, True),
    "rows_tied": ("rows", "sdpa", True, 0.2, True),
    "segments": ("segments", "wrpo_segments", False, 0.2, True),
    "segments_tied": ("segments", "wrpo_segments", True, 0.2, True),
    "padded_plain_mean": ("padded", "sdpa", False, 0.0, False),
}


def build_model(attn: str, tied: bool, vocab: int = VOCAB) -> LlamaForCausalLM:
    model = tiny_model(
        "llama",
        seed=0,
        vocab_size=vocab,
        **LLAMA_2x32,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attn_implementation=attn,
    )
    if tied != (model.lm_head.weight is model.model.embed_tokens.weight):
        raise AssertionError(f"tie_word_embeddings={tied} but the head and the embedding are not (un)tied")
    return model


def global_groups(vocab: int = VOCAB) -> list[dict]:
    """GROUPS groups of K responses, token ids in [3, vocab)."""
    return random_groups(GROUPS, K, vocab, seed=3, response=(1, 7), ref=(2, -15))


def rank_groups(rank: int, world: int = WORLD) -> list[dict]:
    share = GROUPS // world
    return global_groups()[rank * share : (rank + 1) * share]


def collate(groups: list[dict], layout: str) -> dict:
    if layout == "padded":
        return pad_groups(groups, pad_token_id=0)
    return pack_groups(groups, row_per_group=layout == "rows", pad_token_id=0)


def step_loss(model, batch: dict, case: str, world: int = 1, counts=None) -> torch.Tensor:
    """The loss of ``batch`` through ``wrpo.preference_loss``; ``counts`` [groups, first-chosen tokens]
    of the global batch, divided over ``world`` ranks, when the case passes explicit denominators."""
    _, _, _, nll_weight, explicit = CASES[case]
    norms = {}
    if explicit:
        norms = {"num_groups": counts[0] / world, "num_nll_tokens": counts[1] / world}
    out = preference_loss(
        model, batch, ref_logps=batch["ref_logps"].double(), nll_weight=nll_weight, **norms, **OPTIONS
    )
    return out.loss


def single_process(case: str) -> dict:
    """Loss and gradients of one unsharded process on the whole global batch."""
    layout, attn, tied, _, _ = CASES[case]
    model = build_model(attn, tied)
    batch = collate(global_groups(), layout)
    loss = step_loss(model, batch, case, counts=batch_counts(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {
        "loss": loss.detach(),
        "grads": grads,
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
    }


def shard(model: LlamaForCausalLM, mesh) -> LlamaForCausalLM:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run_case(case: str, rank: int, world: int, mesh) -> dict:
    layout, attn, tied, _, _ = CASES[case]
    model = shard(build_model(attn, tied), mesh)
    counts = batch_counts(collate(global_groups(), layout))
    loss = step_loss(model, collate(rank_groups(rank, world), layout), case, world, counts)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    return {
        "loss": total / world,
        "grads": grads,
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "weight_after": type(model.lm_head.weight).__name__,  # resharded again after the step
        "forward_restored": "forward" not in vars(model),
    }


def negative_control(rank: int, world: int, mesh) -> dict:
    """Outside the forward the sharded model's head weight is a DTensor shard; the fused loss given it
    directly (without wrpo.preference_loss's redirect into the forward) must refuse it."""
    from wrpo_kernels import fused_linear_wrpo_loss

    model = shard(build_model("sdpa", False), mesh)
    weight = model.lm_head.weight
    batch = pack_groups(rank_groups(rank, world))
    hidden = torch.randn(batch["labels"].numel(), weight.shape[-1], dtype=torch.float64)
    try:
        fused_linear_wrpo_loss(
            hidden,
            weight,
            batch["labels"].reshape(-1),
            batch["cu_seqlens"],
            ref_logps=batch["ref_logps"].double(),
            **OPTIONS,
        )
        error = None
    except Exception as e:  # the parent checks the type
        error = (type(e).__name__, str(e))
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return {"weight_type": type(weight).__name__, "local_shape": tuple(local.shape), "error": error}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    join_gloo(rank, world, port)

    def cases() -> dict:
        mesh = init_device_mesh("cpu", (world,))
        results = {case: run_case(case, rank, world, mesh) for case in CASES}
        results["control"] = negative_control(rank, world, mesh)
        return results

    finish_rank(rank, cases, out_dir)


def join_gloo(rank: int, world: int, port: int) -> None:
    """In a spawned rank: one torch thread, then the gloo group of ``world`` ranks on ``port``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def finish_rank(rank: int, cases, out_dir) -> None:
    """In a rank whose process group is up: ``cases()`` -> {name: result}, written by rank 0 as
    ``OUT_DIR/<name>.pt``; then the group is destroyed and the rank leaves (:func:`exit_rank`)."""
    try:
        results = cases()
        if rank == 0:
            for name, result in results.items():
                torch.save(result, Path(out_dir) / f"{name}.pt")
    finally:
        dist.destroy_process_group()
    exit_rank()


def exit_rank() -> None:
    """Leave a rank whose results are written without the interpreter's teardown, where a rank of these
    gloo runs now and then aborts after its last Python frame ("terminate called without an active
    exception", SIGABRT; about 1 run in 10 here), failing the spawn although every result is written."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args: tuple, world: int, timeout: float, what: str) -> None:
    """Spawns ``world`` ranks running ``fn(rank, *args)``; kills them if not done after ``timeout`` s."""
    ctx = torch.multiprocessing.spawn(fn, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            raise TimeoutError(f"the {world} {what} ranks did not finish in {timeout:.0f} s")


def run(out_dir, world: int = WORLD, timeout: float = 240.0) -> None:
    """Spawns ``world`` ranks running :func:`worker` (all the cases)."""
    spawn(worker, (world, free_port(), str(out_dir)), world, timeout, "FSDP")


if __name__ == "__main__":
    run(sys.argv[1])
