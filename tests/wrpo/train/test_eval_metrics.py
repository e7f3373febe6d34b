"""WRPO metrics of an evaluation are logged under the evaluation's own ``metric_key_prefix``
(``eval_``, ``test_``, ``eval_a_`` for a dict of eval datasets, ``predict``'s ``test_``) and never leak
into the next evaluation; for ``wrpo.WRPOTrainer`` and the TRL adapter (tiny Llama, CPU, fp32)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from helpers.cli_runs import cli, sample_rows

from wrpo.train.config import parse_config
from wrpo.train.load_models import load_policy, load_reference
from wrpo.train.stage import build_datasets, load_examples
from wrpo.train.tiny import SAMPLE_DATA, save_tiny_model
from wrpo.train.trainer import WRPOTrainer

# keys of Trainer.evaluate's own (loss, timings), not WRPO metrics
TRAINER_KEYS = ("loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


def _perturb(model, seed: int = 5, scale: float = 0.05):
    """Moves the policy away from its reference copy, so rewards and margins are not all zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _wrpo_metrics(metrics: dict, prefix: str) -> dict:
    """``{name: value}`` of the WRPO metrics in ``metrics`` under ``prefix_`` (the prefix removed)."""
    out = {k[len(prefix) + 1 :]: v for k, v in metrics.items() if k.startswith(prefix + "_")}
    return {k: v for k, v in out.items() if k not in TRAINER_KEYS}


def _assert_same(a: dict, b: dict):
    assert a and sorted(a) == sorted(b), (sorted(a), sorted(b))
    for name in a:
        assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (name, a[name], b[name])


# ---- wrpo.WRPOTrainer ---------------------------------------------------------------------------------


def _core_trainer(tmp, *flags):
    """A WRPOTrainer (dpo, K = 3, a perturbed policy, 4 train rows) and two eval datasets of 4 rows each."""
    data = sample_rows(tmp / "rows.jsonl", 12)
    run = cli(
        "--per_device_eval_batch_size 2 --eval_rows 8 --beta 0.5",
        "--report_to none --save_strategy no --disable_tqdm true --seed 3",
        "--use_cpu true",
        dataset=data,
        output_dir=tmp / "out",
    )
    config = parse_config([*run, *flags])
    model, tokenizer = load_policy(config)
    train, evaluation = build_datasets(load_examples(config), tokenizer, config, "train")
    ref = load_reference(config, model)
    _perturb(model)
    a, b = evaluation.select(range(4)), evaluation.select(range(4, 8))
    trainer = WRPOTrainer(
        model, config, ref_model=ref, pad_token_id=tokenizer.pad_token_id, train_dataset=train, eval_dataset=a
    )
    return trainer, a, b


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    trainer, a, b = _core_trainer(tmp_path_factory.mktemp("core"))
    alone = {name: _wrpo_metrics(trainer.evaluate(ds), "eval") for name, ds in (("a", a), ("b", b))}
    assert alone["a"]["rewards/margins"] != pytest.approx(alone["b"]["rewards/margins"], abs=1e-3)
    return trainer, a, b, alone


def test_evaluate_with_a_prefix_logs_the_metrics_under_it(core):
    trainer, a, _, alone = core
    metrics = trainer.evaluate(a, metric_key_prefix="test")
    _assert_same(_wrpo_metrics(metrics, "test"), alone["a"])
    assert not _wrpo_metrics(metrics, "eval")
    logged = trainer.state.log_history[-1]
    _assert_same(_wrpo_metrics(logged, "test"), alone["a"])


def test_an_evaluation_after_a_test_evaluation_sees_only_its_own_data(core):
    trainer, a, b, alone = core
    trainer.evaluate(a, metric_key_prefix="test")
    _assert_same(_wrpo_metrics(trainer.evaluate(b), "eval"), alone["b"])


def test_a_dict_of_eval_datasets_logs_each_under_its_name(core):
    trainer, a, b, alone = core
    metrics = trainer.evaluate({"a": a, "b": b})
    _assert_same(_wrpo_metrics(metrics, "eval_a"), alone["a"])
    _assert_same(_wrpo_metrics(metrics, "eval_b"), alone["b"])


def test_predict_returns_the_metrics_and_leaks_none(core):
    trainer, a, b, alone = core
    output = trainer.predict(a)
    _assert_same(_wrpo_metrics(output.metrics, "test"), alone["a"])
    _assert_same(_wrpo_metrics(trainer.evaluate(b), "eval"), alone["b"])


def test_nothing_is_left_stored_after_an_evaluation_or_a_prediction(core):
    trainer, a, _, _ = core
    trainer.evaluate(a, metric_key_prefix="test")
    trainer.predict(a)
    assert not trainer._stored["train"]
    assert not trainer._stored["eval"]


def test_an_evaluation_during_training_sees_only_its_own_data(tmp_path):
    """A prediction before training, then one optimizer step and its evaluation: the evaluation logs the
    metrics of the trained policy alone, the train log only train metrics."""
    trainer, a, _ = _core_trainer(
        tmp_path,
        *cli(
            "--max_steps 1 --logging_steps 1 --eval_strategy steps --eval_steps 1",
            "--per_device_train_batch_size 4 --learning_rate 0.05",
        ),
    )
    trainer.predict(a)
    trainer.train()
    train_log, eval_log = (
        [e for e in trainer.state.log_history if key in e][0] for key in ("loss", "eval_loss")
    )
    assert "rewards/margins" in train_log and not any(k.startswith("eval_") for k in train_log)
    _assert_same(_wrpo_metrics(eval_log, "eval"), _wrpo_metrics(trainer.evaluate(a), "eval"))


# ---- the TRL adapter ----------------------------------------------------------------------------------

ROWS = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()[:8]]


def _text(x) -> str:
    """The text of a message, or of the last message of a list, or a plain string."""
    x = x[-1] if isinstance(x, list) else x
    return x["content"] if isinstance(x, dict) else x


def _pairs(rows) -> datasets.Dataset:
    """TRL's standard preference data: the target pick against the rejected response."""
    return datasets.Dataset.from_list(
        [
            {
                "prompt": _text(r["prompt"]),
                "chosen": _text(r["chosen"][-1]),
                "rejected": _text(r["rejected"][0]),
            }
            for r in rows
        ]
    )


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from wrpo.integrations.trl import WRPOConfig
    from wrpo.integrations.trl import WRPOTrainer as TRLWRPOTrainer

    tmp = tmp_path_factory.mktemp("trl")
    path = save_tiny_model(tmp / "model", seed=0)
    args = WRPOConfig(
        output_dir=str(tmp / "out"),
        per_device_eval_batch_size=2,
        report_to="none",
        beta=0.5,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        seed=3,
    )
    trainer = TRLWRPOTrainer(
        str(path),
        args=args,
        train_dataset=_pairs(ROWS),
        eval_dataset={"a": _pairs(ROWS[:4]), "b": _pairs(ROWS[4:])},
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    _perturb(trainer.model)  # the reference is the copy made when the trainer was built
    alone = {name: _wrpo_metrics(trainer.evaluate(name), "eval") for name in ("a", "b")}
    assert alone["a"]["rewards/margins"] != pytest.approx(alone["b"]["rewards/margins"], abs=1e-3)
    return trainer, alone


def test_trl_evaluate_with_a_prefix_logs_the_metrics_under_it(trl_trainer):
    trainer, alone = trl_trainer
    metrics = trainer.evaluate("a", metric_key_prefix="test")
    _assert_same(_wrpo_metrics(metrics, "test"), alone["a"])
    assert not _wrpo_metrics(metrics, "eval")


def test_trl_an_evaluation_after_a_prediction_sees_only_its_own_data(trl_trainer):
    trainer, alone = trl_trainer
    output = trainer.predict(trainer.eval_dataset["a"])
    _assert_same(_wrpo_metrics(output.metrics, "test"), alone["a"])
    _assert_same(_wrpo_metrics(trainer.evaluate("b"), "eval"), alone["b"])


def test_trl_a_dict_of_eval_datasets_logs_each_under_its_name(trl_trainer):
    trainer, alone = trl_trainer
    metrics = trainer.evaluate()
    _assert_same(_wrpo_metrics(metrics, "eval_a"), alone["a"])
    _assert_same(_wrpo_metrics(metrics, "eval_b"), alone["b"])
