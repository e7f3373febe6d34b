"""``wrpo.integrations.trl``: parity with ``trl.DPOTrainer`` on a tiny Llama (CPU, fp32, 3 optimizer
steps, same seed), WRPO data as K = 3, exact gradient accumulation, and refused options."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

trl = pytest.importorskip("trl")

from wrpo.integrations.trl import WRPOConfig, WRPOTrainer  # noqa: E402
from wrpo.integrations.trl_data import detect_layout  # noqa: E402
from wrpo.train.tiny import SAMPLE_DATA, save_tiny_model  # noqa: E402

ROWS = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()[:16]]
COMPARED = ("loss", "rewards/margins", "logps/chosen", "rewards/chosen", "rewards/rejected")


def _text(x):
    return x["content"] if isinstance(x, dict) else x


def _prompt(p):
    return p["content"] if isinstance(p, dict) else p[-1]["content"] if isinstance(p, list) else p


def pairs(conversational: bool) -> datasets.Dataset:
    """TRL's standard preference data: the target pick against the rejected response."""
    out = []
    for r in ROWS:
        p, c, j = _prompt(r["prompt"]), _text(r["chosen"][-1]), _text(r["rejected"][0])
        if conversational:
            p, c, j = (
                [{"role": role, "content": x}]
                for role, x in (("user", p), ("assistant", c), ("assistant", j))
            )
        out.append({"prompt": p, "chosen": c, "rejected": j})
    return datasets.Dataset.from_list(out)


def released() -> datasets.Dataset:
    """The released WRPO layout: {"prompt": message, "chosen": [y_ws, y_wt], "rejected": [y_l]}."""

    def message(role, x):
        return {"role": role, "content": _text(x) if role == "assistant" else _prompt(x)}

    return datasets.Dataset.from_list(
        [
            {
                "prompt": message("user", r["prompt"]),
                "chosen": [message("assistant", y) for y in r["chosen"]],
                "rejected": [message("assistant", y) for y in r["rejected"]],
            }
            for r in ROWS
        ]
    )


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def run(trainer_cls, config_cls, model_path, data, tmp_path, **options):
    args = {
        "output_dir": str(tmp_path / trainer_cls.__name__),
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "logging_steps": 1,
        "learning_rate": 5e-3,
        "report_to": "none",
        "seed": 3,
        "beta": 0.5,
        "save_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        **options,
    }
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = trainer_cls(
        str(model_path), args=config_cls(**args), train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    return trainer, [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]


def assert_same_logs(ours, theirs, names=COMPARED, rel=1e-5):
    assert [e["step"] for e in ours] == [e["step"] for e in theirs] == [1, 2, 3]
    assert abs(theirs[-1]["rewards/margins"]) > 1e-3  # the policy moved away from the reference
    for a, b in zip(ours, theirs, strict=True):
        for name in names:
            assert a[name] == pytest.approx(b[name], rel=rel, abs=1e-6), (a["step"], name, a[name], b[name])


PARITY = {
    "sigmoid-text": ({"loss_type": ["sigmoid"]}, False),
    "sigmoid-conversational": ({"loss_type": ["sigmoid"]}, True),
    "ipo-conversational": ({"loss_type": ["ipo"]}, True),
    "sigmoid-precomputed": ({"loss_type": ["sigmoid"], "precompute_ref_log_probs": True}, False),
    "ipo-precomputed": ({"loss_type": ["ipo"], "precompute_ref_log_probs": True}, False),
    "rpo-sigmoid-sft": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]}, False),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_logs_equal_trl_dpo_trainer(case, model_path, tmp_path):
    options, conversational = PARITY[case]
    data = pairs(conversational)
    _, theirs = run(trl.DPOTrainer, trl.DPOConfig, model_path, data, tmp_path, **options)
    _, ours = run(WRPOTrainer, WRPOConfig, model_path, data, tmp_path, **options)
    assert_same_logs(ours, theirs)


def test_packed_equals_padded(model_path, tmp_path):
    data = pairs(False)
    _, packed = run(WRPOTrainer, WRPOConfig, model_path, data, tmp_path / "a", packing=True)
    _, padded = run(WRPOTrainer, WRPOConfig, model_path, data, tmp_path / "b", packing=False)
    assert_same_logs(packed, padded, names=(*COMPARED, "grad_norm"))


def test_prefix_sharing_logs_the_unshared_losses(model_path, tmp_path, caplog):
    """``prefix_sharing`` (on by default with packing): the losses of the unshared packed run."""
    with caplog.at_level(logging.WARNING, logger="wrpo.model.layout"):
        _, shared = run(WRPOTrainer, WRPOConfig, model_path, released(), tmp_path / "a", packing=True)
    assert "prefix sharing: on" in caplog.text
    _, plain = run(WRPOTrainer, WRPOConfig, model_path, released(), tmp_path / "b", prefix_sharing=False)
    assert_same_logs(shared, plain, rel=1e-5)


def test_label_smoothing_is_applied_as_conservative_dpo(model_path, tmp_path):
    """TRL 1.16's sigmoid loss ignores label_smoothing; ours applies cDPO (-(1-e) log s(m) - e log s(-m))
    as the official WRPO trainer does: the fused backend equals the naive one and differs from e = 0."""
    data = pairs(False)
    _, fused = run(WRPOTrainer, WRPOConfig, model_path, data, tmp_path / "a", label_smoothing=0.2)
    _, naive = run(
        WRPOTrainer,
        WRPOConfig,
        model_path,
        data,
        tmp_path / "b",
        label_smoothing=0.2,
        kernel_backend="reference",
    )
    _, plain = run(WRPOTrainer, WRPOConfig, model_path, data, tmp_path / "c")
    assert_same_logs(fused, naive)
    assert abs(fused[-1]["loss"] - plain[-1]["loss"]) > 1e-3


def test_gradient_accumulation_two_by_two_equals_one_by_four(model_path, tmp_path):
    data = pairs(False)
    _, accumulated = run(
        WRPOTrainer,
        WRPOConfig,
        model_path,
        data,
        tmp_path / "a",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    _, whole = run(WRPOTrainer, WRPOConfig, model_path, data, tmp_path / "b")
    assert_same_logs(accumulated, whole, names=(*COMPARED, "grad_norm"))


def test_released_wrpo_layout_trains_as_k3_and_logs_wrpo_metrics(model_path, tmp_path, caplog):
    data = released()
    assert detect_layout(data[0]) == "alternatives"
    with caplog.at_level(logging.WARNING):
        trainer, logs = run(WRPOTrainer, WRPOConfig, model_path, data, tmp_path, alpha=0.3)
    assert "alternative responses per prompt" in caplog.text
    assert len(trainer.train_dataset[0]["responses"]) == 3 and trainer.train_dataset[0]["num_chosen"] == 2
    for name in (
        "rewards/source_chosen",
        "rewards/target_chosen",
        "rewards/pivot_accuracies",
        "rewards/source_accuracies",
        "logps/source_chosen",
        "cur_alpha",
        "logits/chosen",
    ):
        assert name in logs[-1], name
    assert [e["cur_alpha"] for e in logs] == pytest.approx([0.0, 0.1, 0.2], abs=1e-6)  # 0.3 * g / 3


def test_forcing_the_completion_reading_trains_the_list_as_one_answer(model_path, tmp_path):
    data = released()
    trainer, _ = run(
        WRPOTrainer, WRPOConfig, model_path, data, tmp_path, chosen_layout="completion", max_steps=1
    )
    assert len(trainer.train_dataset[0]["responses"]) == 2  # [y_ws + y_wt as one two-message answer, y_l]


def test_tokens_equal_trl_dpo_trainer(model_path, tmp_path):
    data = pairs(True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = {
        "output_dir": str(tmp_path),
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "max_length": 40,
    }
    theirs = trl.DPOTrainer(
        str(model_path), args=trl.DPOConfig(**args), train_dataset=data, processing_class=tokenizer
    ).train_dataset
    ours = WRPOTrainer(
        str(model_path), args=WRPOConfig(**args), train_dataset=data, processing_class=tokenizer
    ).train_dataset
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        full = [b["prompt_ids"] + y for y in (b["chosen_ids"], b["rejected_ids"])]
        assert [a["prompt_ids"] + y for y in a["responses"]] == [ids[:40] for ids in full]


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"loss_type": ["hinge"]}, "loss_type"),
        ({"loss_type": ["sigmoid", "ipo"]}, "loss_type"),
        ({"f_divergence_type": "js_divergence"}, "f_divergence_type"),
        ({"ld_alpha": 0.5}, "ld_alpha"),
        ({"use_weighting": True}, "use_weighting"),
        ({"sync_ref_model": True}, "sync_ref_model"),
        ({"loss_type": ["ipo"], "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_weights": [0.5]}, "loss_weights"),
    ],
)
def test_unsupported_trl_options_are_refused_by_name(options, named, model_path, tmp_path):
    args = WRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **options)
    with pytest.raises(ValueError, match=named):
        WRPOTrainer(
            str(model_path),
            args=args,
            train_dataset=pairs(False),
            processing_class=AutoTokenizer.from_pretrained(model_path),
        )


def test_a_plain_dpo_config_is_refused(model_path, tmp_path):
    with pytest.raises(TypeError, match="WRPOConfig"):
        WRPOTrainer(
            str(model_path),
            args=trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True),
            train_dataset=pairs(False),
        )


def test_a_model_instance_gets_a_copied_reference(model_path, tmp_path):
    """ref_model=None with a model object: the reference is a frozen copy of the starting policy."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = WRPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    trainer = WRPOTrainer(model, args=args, train_dataset=pairs(False), processing_class=tokenizer)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    for p, q in zip(trainer.model.parameters(), trainer.ref_model.parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


def test_peft_reference_is_the_model_with_its_adapter_disabled(model_path, tmp_path):
    """A LoRA policy (peft_config): the reference is the base model (adapter off), as in TRL."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    data = pairs(False)
    runs = {}
    for name, trainer_cls, config_cls in (
        ("trl", trl.DPOTrainer, trl.DPOConfig),
        ("ours", WRPOTrainer, WRPOConfig),
    ):
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        args = config_cls(
            output_dir=str(tmp_path / name),
            per_device_train_batch_size=4,
            max_steps=3,
            logging_steps=1,
            learning_rate=5e-2,
            report_to="none",
            seed=3,
            beta=0.5,
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
        )
        trainer = trainer_cls(
            str(model_path), args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora
        )
        trainer.train()
        runs[name] = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
    assert_same_logs(runs["ours"], runs["trl"])
