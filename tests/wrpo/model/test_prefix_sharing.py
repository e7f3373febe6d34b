"""Prefix sharing: each prompt encoded once for its K responses gives exactly the unshared packed loss.

Compared in fp64 with the packed layout of ``pack_groups`` (every response repeats its prompt), both
through ``wrpo_segments``: loss, [B, K] log-probs and every parameter gradient. The models' RMSNorm
casts to fp32 and back; the forward values are then identical in both layouts, but the prompt's
gradient is summed over its K responses before that cast in one layout and after it in the other,
which differs at fp32 rounding. The norms are therefore run in the input's dtype here.
"""

from __future__ import annotations

import pytest
import torch
from helpers.cli_runs import QUIET, cli
from helpers.tiny_models import sizes, tiny_model
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

from wrpo import pack_groups, pad_groups, preference_loss, sequence_logps
from wrpo.data.batch import segment_layout
from wrpo.data.collate import IGNORE_INDEX, pack_shared_prefix
from wrpo.model import body as model_body
from wrpo.model.attention import NAME
from wrpo.model.body import body_hidden_states
from wrpo.model.capabilities import read_capabilities
from wrpo.model.layout import plan_for, plan_layout, prepare_layout
from wrpo.model.masks import shared_prefix_mask

VOCAB = 45
SMALL = {"vocab_size": VOCAB, **sizes(32, 48, 2, 4), "head_dim": 8, "max_position_embeddings": 128}
MODELS = {  # name: (family of helpers.tiny_models, its options)
    "llama": ("llama", {"num_key_value_heads": 4}),
    "qwen2-gqa": ("qwen2", {"num_key_value_heads": 2}),
    # windows of 4 tokens, shorter than most sequences here: they reach back into the prompt or not
    "mistral-window": ("mistral", {"num_key_value_heads": 2, "sliding_window": 4}),
    # alternating windowed and full layers, attention scores soft-capped at 2, logits at 0.7
    "gemma2-window-softcap": (
        "gemma2",
        {
            "num_key_value_heads": 2,
            "sliding_window": 3,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 0.7,
            "query_pre_attn_scalar": 8,
        },
    ),
}
WINDOWED = ("mistral-window", "gemma2-window-softcap")
MAX_DIFF: dict[str, float] = {}  # the largest differences seen, printed with -s


def _rms_norm_in_input_dtype(self, hidden):
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def _gemma_rms_norm_in_input_dtype(self, hidden):
    return (1.0 + self.weight) * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps))


@pytest.fixture(autouse=True)
def full_precision_norms(monkeypatch):
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", _rms_norm_in_input_dtype)
    monkeypatch.setattr(modeling_mistral.MistralRMSNorm, "forward", _rms_norm_in_input_dtype)
    monkeypatch.setattr(modeling_gemma2.Gemma2RMSNorm, "forward", _gemma_rms_norm_in_input_dtype)


def build(name, impl=NAME, seed=0):
    family, extra = MODELS[name]
    model = tiny_model(family, seed=seed, **SMALL, **extra)
    model.set_attn_implementation(impl)
    with torch.no_grad():  # heads initialised near 0 give near-uniform logits: spread them out
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def random_groups(B, K, seed, empty_prompt=False):
    """Prompts of 1..6 tokens (0 for the first group with ``empty_prompt``), responses of 1..5 tokens,
    the last response of every group a single token."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    groups = []
    for b in range(B):
        prompt = [] if empty_prompt and b == 0 else ids(1, 7)
        lo = 2 if not prompt else 1  # without a prompt a response's first token has no predictor
        responses = [ids(lo, 6) for _ in range(K - 1)] + [ids(lo, lo + 1)]
        ref = (torch.randn(K, generator=g) * 3 - 20).tolist()
        groups.append({"prompt_ids": prompt, "responses": responses, "num_chosen": K - 1, "ref_logps": ref})
    return groups


def loss_logps_grads(model, batch):
    model.zero_grad()
    out = preference_loss(model, batch, backend="torch", beta=0.4, alpha=0.3, nll_weight=0.2)
    out.loss.backward()
    return out.loss.detach(), out.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _record(key, value):
    MAX_DIFF[key] = max(MAX_DIFF.get(key, 0.0), float(torch.as_tensor(value).detach()))


def assert_same(shared, unshared, tol=1e-10):
    (loss_a, logps_a, grads_a), (loss_b, logps_b, grads_b) = shared, unshared
    _record("loss (relative)", ((loss_a - loss_b) / loss_b).abs())
    _record("logps (relative)", ((logps_a - logps_b) / logps_b).abs().max())
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=0)
    torch.testing.assert_close(logps_a, logps_b, rtol=tol, atol=0)
    for name, g in grads_b.items():
        err = (grads_a[name] - g).abs().max() / g.abs().max()
        _record("gradient (max abs diff / max abs)", err)
        assert err <= tol, f"{name}: relative error {err:.2e}"
    assert all(g.abs().max() > 0 for g in grads_b.values())


def test_layout():
    groups = [
        {"prompt_ids": [5, 6], "responses": [[7], [8, 9]], "num_chosen": 1},
        {"prompt_ids": [4], "responses": [[10, 11], [12]], "num_chosen": 1},
    ]
    batch = pack_shared_prefix(groups)
    # [5 6 | 7 | 8 9] [4 | 10 11 | 12]: responses restart at the prompt's length
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]
    # the prompt's last row (1, then 5) predicts each response's first token; each response's last
    # row predicts nothing (ignored), as the last position of every sequence of pack_groups
    assert batch["head_index"].tolist() == [1, 2, 1, 3, 4, 5, 6, 7, 5, 8]
    assert batch["labels"].tolist() == [7, -100, 8, 9, -100, 10, 11, -100, 12, -100]
    assert batch["cu_seqlens"].tolist() == [0, 2, 5, 8, 10]
    assert segment_layout(batch["position_ids"]) == [[(0, 3, 0, 0), (3, 5, 0, 2), (5, 8, 5, 0), (8, 9, 5, 1)]]
    per_group = pack_shared_prefix(groups, row_per_group=True, pad_token_id=0)
    assert per_group["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 10, 11, 12, 0]]
    assert per_group["head_index"].tolist() == [1, 2, 1, 3, 4, 5, 6, 7, 5, 8]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("empty_prompt", [False, True])
def test_labels_are_the_unshared_ones(seed, empty_prompt):
    """Per response, the labelled tokens in the same order as in ``pack_groups``."""
    groups = random_groups(3, 3, seed, empty_prompt)
    shared, unshared = pack_shared_prefix(groups), pack_groups(groups)
    labels_u = unshared["labels"].reshape(-1)
    for s in range(9):
        a = shared["labels"][shared["cu_seqlens"][s] : shared["cu_seqlens"][s + 1]]
        b = labels_u[unshared["cu_seqlens"][s] : unshared["cu_seqlens"][s + 1]]
        assert a[a != IGNORE_INDEX].tolist() == b[b != IGNORE_INDEX].tolist()
    assert shared["input_ids"].numel() < unshared["input_ids"].numel()


def test_dense_mask():
    pos = torch.tensor([[0, 1, 2, 2, 3, 0, 1]])  # prompt 2 tokens, y1 [2], y2 [2, 3], then a new group
    allowed = (shared_prefix_mask(pos, torch.float64)[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ]


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_shared_prefix_equals_the_unshared_packed_path(name, K):
    groups = random_groups(3, K, seed=K, empty_prompt=K == 3)
    model = build(name)
    unshared = loss_logps_grads(model, pack_groups(groups))
    assert_same(loss_logps_grads(model, pack_shared_prefix(groups)), unshared)
    # two rows, padded
    assert_same(loss_logps_grads(model, pack_shared_prefix(groups, row_per_group=True)), unshared)


@pytest.mark.parametrize("name", [m for m in MODELS if m not in WINDOWED])
def test_dense_mask_path_equals_too(name):
    """sdpa with :func:`shared_prefix_mask` (what other attention implementations get)."""
    groups = random_groups(2, 3, seed=7)
    unshared = loss_logps_grads(build(name), pack_groups(groups))
    assert_same(
        loss_logps_grads(build(name, "sdpa"), pack_shared_prefix(groups, row_per_group=True)), unshared
    )


@pytest.mark.parametrize("name", list(MODELS))
def test_sequence_logps_equal(name):
    model, groups = build(name), random_groups(4, 3, seed=11, empty_prompt=True)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            a = sequence_logps(model, pack_shared_prefix(groups), backend="torch")
            b = sequence_logps(model, pack_groups(groups), backend="torch")
        _record("sequence_logps (relative)", ((a - b) / b).abs().max())
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
    assert a.shape == (12,)


def test_responses_do_not_see_each_other():
    """Changing one response's tokens changes no other response's log-prob (nor the prompt's rows)."""
    model = build("qwen2-gqa")
    groups = random_groups(2, 3, seed=3)
    groups[0]["responses"][1] = [7, 8, 9]
    base = sequence_logps(model, pack_shared_prefix(groups), backend="torch")
    groups[0]["responses"][1] = [9, 8, 7]
    changed = sequence_logps(model, pack_shared_prefix(groups), backend="torch")
    assert not torch.allclose(base[1], changed[1])
    assert torch.equal(torch.cat([base[:1], base[2:]]), torch.cat([changed[:1], changed[2:]]))


def test_a_leaky_mask_changes_the_loss(monkeypatch):
    """The control: if a response could see the responses before it, the loss would differ."""
    groups = random_groups(2, 3, seed=5)
    model = build("llama", "sdpa")
    exact = loss_logps_grads(model, pack_shared_prefix(groups, row_per_group=True))[0]

    def leaky(position_ids, dtype):  # causal within a group: responses see the earlier ones
        group = torch.cumsum((position_ids == 0).long(), 1)
        idx = torch.arange(position_ids.shape[1])
        allowed = (group[:, :, None] == group[:, None, :]) & (idx[None, None, :] <= idx[None, :, None])
        mask = torch.zeros(allowed.shape, dtype=dtype)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    monkeypatch.setattr(model_body, "shared_prefix_mask", leaky)
    wrong = loss_logps_grads(model, pack_shared_prefix(groups, row_per_group=True))[0]
    assert (wrong - exact).abs() > 1e-4 * exact.abs()


def test_what_cannot_be_exact_is_refused():
    model = build("llama")
    batch = pack_shared_prefix(random_groups(2, 2, seed=1))
    model.config._attn_implementation = "flash_attention_2"  # it would run each response on from the last
    with pytest.raises(ValueError, match="shared-prefix batches need attn_implementation='wrpo_segments'"):
        body_hidden_states(model, batch)
    # a response restarting at 4 after a first stretch of 2 tokens: no 4-token prompt to share
    with pytest.raises(ValueError, match="restart at 4 at index 5"):
        segment_layout(torch.tensor([[0, 1, 2, 0, 1, 4, 5]]))


@pytest.mark.parametrize("name", WINDOWED)
@pytest.mark.parametrize("pack", [pack_groups, pack_shared_prefix])
def test_dense_masks_are_refused_where_windows_apply(name, pack):
    """sdpa/eager get a dense packed mask, which drops the windows: refused past the window only."""
    model, groups = build(name, "eager"), random_groups(2, 3, seed=2)
    with pytest.raises(ValueError, match="sliding windows, which the dense packed mask for eager"):
        sequence_logps(model, pack(groups, row_per_group=True), backend="torch")
    model.config.sliding_window = 64  # longer than every sequence here: nothing to drop
    assert sequence_logps(model, pack(groups, row_per_group=True), backend="torch").isfinite().all()


@pytest.mark.parametrize("name", WINDOWED)
def test_windows_follow_the_models_own_masks(name):
    """The windowed (and soft-capped) segments give the log-probs of the model's own padded run, whose
    masks transformers builds; a window shorter than the sequences must change them (the control)."""
    groups = random_groups(3, 3, seed=21)
    model = build(name)
    packed = sequence_logps(model, pack_shared_prefix(groups), backend="torch")
    eager = build(name, "eager")  # one sequence per call: no padding rows (fully masked: NaN in eager)
    padded = torch.stack(
        [
            sequence_logps(eager, pad_groups([{**g, "responses": [y], "num_chosen": 1}], 0), backend="torch")[
                0
            ]
            for g in groups
            for y in g["responses"]
        ]
    )
    _record(f"{name} vs its padded eager run (relative)", ((packed - padded) / padded).abs().max())
    # eager attention takes its softmax in fp32
    torch.testing.assert_close(packed, padded, rtol=1e-6, atol=0)
    model.config.sliding_window = 10**6
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = 10**6
    unwindowed = sequence_logps(model, pack_shared_prefix(groups), backend="torch")
    assert (unwindowed - packed).abs().max() > 1e-4


def test_report_max_differences():
    print({k: f"{v:.1e}" for k, v in MAX_DIFF.items()})


def _train_losses(tmp_path, name, extra):
    import json

    from wrpo.cli.main import main

    out = tmp_path / name
    flags = cli(
        "train --max_steps 4 --per_device_train_batch_size 3",
        "--gradient_accumulation_steps 2 --logging_steps 1",
        QUIET,
        "--beta 0.3 --seed 7",
        output_dir=out,
    )
    code = main([*flags, *extra])
    assert code == 0
    logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [[e[k] for k in ("loss", "logps/chosen", "logps/rejected")] for e in logs if "loss" in e]


def test_wrpo_train_with_prefix_sharing_logs_the_same_losses(tmp_path, capsys, caplog):
    """``wrpo train`` (fp32, tiny model: sharing on by default) logs the losses of the unshared run;
    the effective config says whether sharing is on, once (not in the log as well)."""
    with caplog.at_level("WARNING", logger="wrpo.model.layout"):
        plain = _train_losses(tmp_path, "plain", ["--prefix_sharing", "false"])
        printed = capsys.readouterr().out
        assert printed.count("prefix sharing") == 1
        assert "prefix sharing  off (turned off (--prefix_sharing false))" in printed
        shared = _train_losses(tmp_path, "shared", [])
        assert "prefix sharing  on (each prompt encoded once" in capsys.readouterr().out
    assert "prefix sharing:" not in caplog.text
    assert len(plain) == len(shared) == 4
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(plain), rtol=1e-5, atol=0)
    assert plain[0] != plain[-1]


def test_prefix_sharing_needs_packing():
    from wrpo.train.config import parse_config

    with pytest.raises(ValueError, match="--prefix_sharing needs --packing"):
        parse_config(["--prefix_sharing", "true", "--packing", "false", "--output_dir", "/tmp/x"])
    config = parse_config(["--packing", "false", "--output_dir", "/tmp/x"])
    plan = plan_for(config, build("llama", "sdpa"))
    assert config.prefix_sharing is None and (plan.prefix_sharing, plan.sharing_why) == (
        False,
        "needs --packing",
    )


def test_the_plan_says_why_sharing_is_off():
    """Automatic: on for models that take position ids and run switchable attention; off (with the
    reason) otherwise, where an explicit request raises instead."""
    model = build("llama", "sdpa")
    assert plan_layout(read_capabilities(model), packing=None, prefix_sharing=None).prefix_sharing
    model.config._attn_implementation = "flex_attention"
    plan = plan_layout(read_capabilities(model), packing=None, prefix_sharing=None)
    assert (
        not plan.packing and not plan.prefix_sharing and "uses 'flex_attention' attention" in plan.packing_why
    )
    with pytest.raises(ValueError, match="--prefix_sharing: LlamaForCausalLM uses 'flex_attention'"):
        plan_layout(read_capabilities(model), packing=None, prefix_sharing=True)
    model.config._attn_implementation = "flash_attention_2"  # kept unshared unless asked
    caps = read_capabilities(model)
    assert plan_layout(caps, packing=None, prefix_sharing=None).prefix_sharing is False
    assert plan_layout(caps, packing=None, prefix_sharing=True).prefix_sharing is True


@pytest.mark.parametrize("impl", [NAME, "sdpa"])
def test_precomputed_reference_logps_equal(impl):
    from types import SimpleNamespace

    from wrpo.train.stage import compute_ref_logps

    model, groups = build("qwen2-gqa", impl), random_groups(5, 3, seed=13, empty_prompt=True)
    config = SimpleNamespace(
        packing=True, per_device_eval_batch_size=2, kernel_backend="torch", chunk_tokens=None
    )
    plain = compute_ref_logps(model, groups, SimpleNamespace(**vars(config), prefix_sharing=False), 0, "cpu")
    shared = compute_ref_logps(model, groups, SimpleNamespace(**vars(config), prefix_sharing=True), 0, "cpu")
    assert shared.shape == (5, 3)
    torch.testing.assert_close(shared, plain, rtol=1e-6, atol=0)  # both returned in fp32


def test_flash_attention_models_switch_to_segments(caplog):
    policy, ref = build("llama"), build("llama", "sdpa")
    policy.config._attn_implementation = "flash_attention_2"  # as loaded on a GPU with flash-attn
    plan = plan_layout(read_capabilities(policy), packing=None, prefix_sharing=True)
    with caplog.at_level("INFO", logger="wrpo.model.layout"):
        prepare_layout(plan, policy, ref)
    assert policy.config._attn_implementation == ref.config._attn_implementation == NAME
    assert "switched from flash_attention_2 to wrpo_segments" in caplog.text
    batch = pack_shared_prefix(random_groups(2, 2, seed=1))
    assert body_hidden_states(policy, batch).shape == (*batch["input_ids"].shape, 32)
