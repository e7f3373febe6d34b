"""One WRPO step on a tiny model, run by ``accelerate launch --multi_gpu --num_processes 2`` (test_ddp.py).

Each rank takes its half of a fixed global batch of groups; rank 0 saves the mean loss and the
DDP-averaged gradients to the path given as the first argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from wrpo import pack_groups, preference_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (helpers), when run as a script
from helpers.tiny_models import LLAMA_2x32, tiny_model  # noqa: E402

GROUPS, K, VOCAB = 4, 3, 40


def build_model():
    return tiny_model("llama", seed=0, vocab_size=VOCAB, **LLAMA_2x32, attn_implementation="sdpa")


def global_batch():
    g = torch.Generator().manual_seed(1)

    def ids(n_max):
        n = int(torch.randint(1, n_max, (1,), generator=g))
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [
        {
            "prompt_ids": ids(6),
            "responses": [ids(6) for _ in range(K)],
            "num_chosen": K - 1,
            "ref_logps": (torch.randn(K, generator=g) - 15).tolist(),
        }
        for _ in range(GROUPS)
    ]


def step_loss(model, groups):
    batch = pack_groups(groups)
    return preference_loss(model, batch, ref_logps=batch["ref_logps"].double(), beta=0.3, alpha=0.2).loss


def main(out_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = build_model()
    wrapped = acc.prepare(model)
    share = GROUPS // acc.num_processes
    mine = global_batch()[acc.process_index * share : (acc.process_index + 1) * share]
    loss = step_loss(wrapped, mine)
    acc.backward(loss)
    losses = acc.gather(loss.detach()[None])
    if acc.is_main_process:
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save({"loss": losses.mean(), "world": acc.num_processes, "grads": grads}, out_path)
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()  # a group alive at exit can abort a rank while it shuts down


if __name__ == "__main__":
    main(sys.argv[1])
    from fsdp_step import exit_rank  # tests/ is this script's directory

    exit_rank()  # without the interpreter's teardown, where a gloo rank now and then aborts or hangs
