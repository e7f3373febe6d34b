"""The plain-PyTorch recipe of docs/api.md ("## Plain PyTorch"), run as written and checked.

The code blocks after the ``<!-- recipe -->`` and ``<!-- recipe: accumulation -->`` markers are
executed in one namespace, so the page and the test cannot drift apart. The recipe's loss, log-probs and
gradients must equal a naive computation from the model's full logits on the padded layout (one
sequence per row, no packing, plain autograd), and the accumulated gradients those of the whole batch.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch

from wrpo import pad_groups, preference_loss
from wrpo.model.masks import block_causal_mask
from wrpo_kernels import wrpo_loss

PAGE = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def block_after(marker: str) -> str:
    text = PAGE.read_text()
    m = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", text, re.S)
    assert m, f"docs/api.md has no ```python block right after {marker}"
    return m.group(1)


def naive(model, groups, ref_logps=None, **opts):
    """[B, K] log-probs from the full logits of the padded layout and, with ``ref_logps``, the loss
    by plain autograd (``backend="reference"``). ``model`` is switched to sdpa (a padded batch)."""
    model.set_attn_implementation("sdpa")
    batch = pad_groups(groups, pad_token_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    valid = labels != -100
    picked = logits.float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    K = len(groups[0]["responses"])
    logps, lengths = (picked * valid).sum(1).view(-1, K), valid.sum(1).view(-1, K)
    if ref_logps is None:
        return logps, None
    loss, _ = wrpo_loss(logps, ref_logps, lengths, backend="reference", **opts)
    return logps, loss


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def recipe():
    ns: dict = {}
    exec(compile(block_after("<!-- recipe -->"), "docs/api.md recipe", "exec"), ns)
    return ns


def test_the_recipe_runs_and_trains(recipe):
    out, model, ref_model = recipe["out"], recipe["model"], recipe["ref_model"]
    assert math.isfinite(out.loss.item())
    # policy = reference at the start: every reward is 0, the loss -log sigmoid(0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.metrics["cur_alpha"].item() == pytest.approx(0.1)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.norm() > 0, name
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters(), strict=True)]
    assert all(moved), "the optimizer step left some parameters unchanged"


def test_the_recipe_equals_the_naive_padded_computation(recipe):
    """Same log-probs, loss and gradients as full logits on the padded layout (fp32)."""
    groups, out, ref_logps = recipe["groups"], recipe["out"], recipe["ref_logps"]
    start = copy.deepcopy(recipe["ref_model"]).requires_grad_(True)  # the policy before the step
    logps, loss = naive(start, groups, ref_logps, alpha=0.1, beta=0.01)
    torch.testing.assert_close(out.logps, logps.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_logps, logps.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-6, atol=1e-7)
    loss.backward()
    for (name, p), q in zip(recipe["model"].named_parameters(), start.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < 1e-4, name


def test_after_the_step_the_packed_loss_still_equals_the_naive_one(recipe):
    """Policy != reference now: rewards and margins are no longer 0."""
    model, batch, ref_logps, groups = recipe["model"], recipe["batch"], recipe["ref_logps"], recipe["groups"]
    packed = preference_loss(copy.deepcopy(model), batch, ref_logps=ref_logps, alpha=0.1, beta=0.01)
    _, loss = naive(copy.deepcopy(model), groups, ref_logps, alpha=0.1, beta=0.01)
    assert abs(packed.loss.item() - math.log(2)) > 1e-4
    torch.testing.assert_close(packed.loss, loss.detach(), rtol=1e-5, atol=1e-7)


def test_without_position_ids_the_packed_sequences_attend_to_each_other(recipe):
    """The figure of docs/api.md: on the recipe's model, one packed row run without position ids (causal over
    the whole row) moves the hidden states of the later sequences by up to 1.8."""
    lm = copy.deepcopy(recipe["ref_model"])
    lm.set_attn_implementation("sdpa")
    ids, pos = recipe["batch"]["input_ids"], recipe["batch"]["position_ids"]
    with torch.no_grad():
        mask = block_causal_mask(pos, torch.float32)
        separated = lm.model(input_ids=ids, position_ids=pos, attention_mask=mask).last_hidden_state
        leaked = lm.model(input_ids=ids).last_hidden_state
    first = int(recipe["batch"]["cu_seqlens"][1])
    torch.testing.assert_close(leaked[:, :first], separated[:, :first], rtol=1e-5, atol=1e-5)
    assert (leaked - separated).abs().max().item() == pytest.approx(1.8, abs=0.05)


def test_the_accumulation_block_gives_the_whole_batch_gradient():
    ns: dict = {}  # a fresh run: this block trains the model on
    exec(compile(block_after("<!-- recipe -->"), "docs/api.md recipe", "exec"), ns)
    before = copy.deepcopy(ns["model"])
    exec(compile(block_after("<!-- recipe: accumulation -->"), "docs/api.md accumulation", "exec"), ns)
    assert (int(ns["groups_in_step"]), int(ns["tokens_in_step"])) == (2, 6)
    whole = preference_loss(before, ns["batch"], ref_logps=ns["ref_logps"], alpha=0.1, beta=0.01)
    whole.loss.backward()
    for (name, p), q in zip(ns["model"].named_parameters(), before.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < 1e-5, name
