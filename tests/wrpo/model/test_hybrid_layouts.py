"""Hybrid models (convolution, gated delta net, Mamba layers) in packed and shared-prefix rows.

Their non-attention layers run one sequence at a time (``wrpo/model/mixers.py``): values and parameter
gradients equal the model's own forward on each prompt + response alone (fp64), the unhooked packed
row does not (the control), and ``wrpo train`` logs the same log-probs with its defaults as padded.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli_runs import QUIET, cli
from helpers.tiny_models import sizes
from zoo.architectures import TEXT_VOCAB, build_tiny
from zoo.conformance import collator, layout_plan
from zoo.reference import make_groups, own_sequence_logps, relative_error

from wrpo import sequence_logps
from wrpo.model.capabilities import read_capabilities
from wrpo.model.layout import prepare_layout

# one model per mixer family: attention, sliding window (+ sinks), conv, gated delta net, Mamba, delta
# attention, MoE, MLA
FAMILIES = [
    "llama",
    "mistral",
    "gpt_oss",
    "lfm2",
    "qwen3_next",
    "qwen3_5_text",
    "jamba",
    "nemotron_h",
    "kimi_linear",
    "mixtral",
    "deepseek_v3",
]
HYBRIDS = ["lfm2", "qwen3_next", "qwen3_5_text"]


def _tiny(name):
    built = build_tiny(name)
    assert built.model is not None, built.skip
    return built.model


def _grads(model, logps):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logps.sum(), params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )


@pytest.mark.parametrize("layout", ["packed", "packed_rows", "shared_prefix"])
@pytest.mark.parametrize("name", FAMILIES)
def test_values_and_gradients_equal_the_models_own_forward(name, layout):
    model = _tiny(name)
    groups = make_groups(TEXT_VOCAB, seed=3)
    truth = own_sequence_logps(model, groups, grad=True)
    want = _grads(model, truth)
    prepare_layout(layout_plan(layout), model)
    logps = sequence_logps(model, collator(layout)(groups), backend="torch")
    # fp64 models that norm (and some scan) in fp32 inside: differences at fp32 rounding, ~1e-9 / 1e-8
    assert relative_error(logps, truth) < 1e-7
    assert relative_error(_grads(model, logps), want) < 1e-6


@pytest.mark.parametrize("name", HYBRIDS + ["jamba"])
def test_without_per_sequence_mixers_packed_rows_leak(name):
    """The control: the same rows through the unhooked mixers carry state across sequences."""
    model = _tiny(name)
    groups = make_groups(TEXT_VOCAB, seed=3)
    truth = own_sequence_logps(model, groups)
    prepare_layout(layout_plan("packed_rows"), model)
    caps = read_capabilities(model)
    for path in caps.sequence_mixers:
        mixer = model.get_submodule(f"{caps.body_path}.{path}")
        mixer._forward_pre_hooks.clear(), mixer._forward_hooks.clear()
    leaked = sequence_logps(model, collator("packed_rows")(groups), backend="torch")
    assert relative_error(leaked, truth) > 1e-3


def _save(tmp_path, name):
    from wrpo.train.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    built = build_tiny(name, dtype=torch.float32)
    model = built.model
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    path = tmp_path / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _step_one_logps(model_dir, out, extra):
    from wrpo.cli.main import main

    flags = cli(
        "train --max_steps 1 --learning_rate 0 --logging_steps 1",
        QUIET,
        "--per_device_train_batch_size 4 --max_length 64 --max_prompt_length 48",
        "--seed 3",
        model=model_dir,
        output_dir=out,
    )
    code = main([*flags, *extra])
    assert code == 0
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {k: v for k, v in logs[0].items() if k.startswith("logps/")}


@pytest.mark.parametrize("name", HYBRIDS)
def test_wrpo_train_defaults_log_the_padded_logps(name, tmp_path, capsys):
    """``wrpo train`` with its defaults (packing and prefix sharing on) logs the step-1 log-probs of
    ``--packing false``, fp32, lr 0."""
    model_dir = _save(tmp_path, name)
    packed = _step_one_logps(model_dir, tmp_path / "packed", [])
    printed = capsys.readouterr().out
    assert "packing         on" in printed and "prefix sharing  on" in printed
    padded = _step_one_logps(model_dir, tmp_path / "padded", ["--packing", "false"])
    assert set(packed) == set(padded) and len(packed) >= 4
    for key in packed:
        assert abs(packed[key] - padded[key]) <= 1e-5 * abs(padded[key]), (key, packed[key], padded[key])


@pytest.mark.parametrize("layout", ["packed", "packed_rows"])
def test_the_sequence_index_is_built_once_per_forward(layout, monkeypatch):
    """Every mixer layer of a forward reuses the first one's index (one host sync, not one per layer),
    in one packed row as in one row per group."""
    import transformers

    import wrpo.model.mixers as mixers

    calls = []
    monkeypatch.setattr(
        mixers, "_index_for", mixers.PerForward(lambda p: calls.append(1) or mixers.sequence_index(p))
    )
    config = transformers.Lfm2Config(
        vocab_size=TEXT_VOCAB + 8,
        **sizes(32, 64, 4, 4, 2),
        block_auto_adjust_ff_dim=False,
        layer_types=["conv", "conv", "conv", "full_attention"],
    )
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    prepare_layout(layout_plan(layout), model)
    sequence_logps(model, collator(layout)(make_groups(TEXT_VOCAB, seed=3)), backend="torch")
    assert len(read_capabilities(model).sequence_mixers) == 3 and len(calls) == 1
