"""Gradient accumulation in ``WRPOTrainer``: N micro-batches of b groups train exactly like one batch
of N*b groups (logged loss, grad_norm, updated parameters), packed and padded, WRPO and SFT."""

from __future__ import annotations

import pytest
import torch
from helpers.cli_runs import cli, sample_rows

from wrpo.train.config import parse_config
from wrpo.train.load_models import load_policy, load_reference
from wrpo.train.stage import build_datasets, load_examples
from wrpo.train.trainer import WRPOTrainer


def _train(tmp_path, stage, batch, accumulation, packing, extra=()):
    """Two optimizer steps with plain SGD (an update proportional to the gradient) on 12 rows."""
    data = sample_rows(tmp_path / "rows.jsonl", 12)
    flags = cli(
        "--max_steps 2 --logging_steps 1 --learning_rate 0.1 --optim sgd",
        "--lr_scheduler_type constant --max_grad_norm 1e9 --beta 0.5",
        "--alpha 0.3 --alpha_schedule constant --report_to none",
        "--save_strategy no --disable_tqdm true --seed 3",
        dataset=data,
        output_dir=tmp_path / f"{stage}{batch}x{accumulation}{packing}",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        packing=packing,
    )
    config = parse_config([*flags, *extra])
    model, tokenizer = load_policy(config)
    train, _ = build_datasets(load_examples(config), tokenizer, config, stage)
    ref = load_reference(config, model) if stage == "train" else None
    trainer = WRPOTrainer(
        model, config, ref_model=ref, stage=stage, pad_token_id=tokenizer.pad_token_id, train_dataset=train
    )
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    return logs, {n: p.detach().clone() for n, p in model.named_parameters()}


CASES = {
    "wrpo-packed": ("train", True, ()),
    "wrpo-padded": ("train", False, ()),
    "wrpo-nll-packed": ("train", True, ("--nll_weight", "0.3")),
    "simpo-padded": ("train", False, ("--loss_type", "simpo", "--gamma", "0.2")),
    "sft-packed": ("sft", True, ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_micro_batches_of_two_equal_one_batch_of_four(tmp_path, case):
    stage, packing, extra = CASES[case]
    logs_ga, params_ga = _train(tmp_path, stage, 2, 2, packing, extra)
    logs_one, params_one = _train(tmp_path, stage, 4, 1, packing, extra)
    assert [e["step"] for e in logs_ga] == [e["step"] for e in logs_one] == [1, 2]
    for a, b in zip(logs_ga, logs_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), (a, b)
    assert logs_one[0]["grad_norm"] > 1e-3  # lr 0.1: the steps really move the parameters
    for name, p in params_one.items():
        err = (params_ga[name] - p).abs().max() / p.abs().max().clamp_min(1e-12)
        assert err <= 1e-6, f"{name}: relative difference {err:.2e}"


def test_uneven_micro_batches_weigh_every_group_once(tmp_path):
    """Micro-batches of 5, 5 and 2 groups in one step (12 rows) against one batch of 12."""
    logs_ga, params_ga = _train(tmp_path, "train", 5, 3, True, ("--max_steps", "1", "--nll_weight", "0.3"))
    logs_one, params_one = _train(tmp_path, "train", 12, 1, True, ("--max_steps", "1", "--nll_weight", "0.3"))
    assert logs_ga[0]["loss"] == pytest.approx(logs_one[0]["loss"], rel=1e-6)
    assert logs_ga[0]["grad_norm"] == pytest.approx(logs_one[0]["grad_norm"], rel=1e-6)
    for name, p in params_one.items():
        assert torch.allclose(params_ga[name], p, rtol=1e-6, atol=1e-7), name
