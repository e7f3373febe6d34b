"""Packed rows and padded batches give the same loss and gradients through a real (tiny) model."""

from __future__ import annotations

import pytest
import torch
from helpers import random_groups
from helpers.tiny_models import LLAMA_2x32, tiny_model

from wrpo import preference_loss
from wrpo.data.collate import IGNORE_INDEX, pack_groups, pad_groups, sequence_with_labels
from wrpo.model.masks import block_causal_mask
from wrpo_kernels import fused_linear_wrpo_loss


def test_labels_are_shifted_response_tokens():
    ids, labels = sequence_with_labels([5, 6, 7], [8, 9])
    assert ids == [5, 6, 7, 8, 9]
    # position t predicts ids[t+1]; only response tokens (8, 9) are targets
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX]


def test_block_causal_mask_separates_sequences():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    allowed = block_causal_mask(pos, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def tiny_llama(vocab=40, seed=0):
    return tiny_model(
        "llama",
        seed=seed,
        vocab_size=vocab,
        **LLAMA_2x32,
        max_position_embeddings=64,
        attn_implementation="sdpa",
    )


def loss_and_grads(model, batch, loss_type):
    model.zero_grad()
    out = preference_loss(model, batch, ref_logps=batch["ref_logps"].double(), loss_type=loss_type, beta=0.3)
    out.loss.backward()
    return out.loss.detach(), out.logps, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_block_causal_mask_per_row():
    pos = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 2]])
    allowed = block_causal_mask(pos, torch.float32)[:, 0] == 0
    assert allowed.shape == (2, 4, 4)
    assert torch.equal(allowed[1], block_causal_mask(pos[1:], torch.float32)[0, 0] == 0)
    assert allowed[0].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_row_per_group_layout():
    groups = [
        {"prompt_ids": [5, 6], "responses": [[7], [8, 9]], "num_chosen": 1},
        {"prompt_ids": [5], "responses": [[7], [8]], "num_chosen": 1},
    ]
    batch = pack_groups(groups, row_per_group=True, pad_token_id=0)
    # group 0: [5 6 7 | 5 6 8 9] (7 tokens); group 1: [5 7 | 5 8] + 3 padding tokens
    assert batch["input_ids"].tolist() == [[5, 6, 7, 5, 6, 8, 9], [5, 7, 5, 8, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 0, 1, 2]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 7, 9, 14]  # the padding joins group 1's last sequence
    assert batch["labels"][1].tolist() == [7, IGNORE_INDEX, 8, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, -100]


@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("row_per_group", [False, True])
def test_packed_equals_padded(loss_type, K, row_per_group):
    model = tiny_llama()
    groups = random_groups(3, K, 40, seed=K)
    packed = loss_and_grads(model, pack_groups(groups, row_per_group=row_per_group), loss_type)
    padded = loss_and_grads(model, pad_groups(groups, pad_token_id=0), loss_type)
    assert torch.allclose(packed[0], padded[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(packed[1], padded[1], rtol=1e-10, atol=1e-10)
    for name, g in packed[2].items():
        assert torch.allclose(g, padded[2][name], rtol=1e-8, atol=1e-12), name
    assert any(g.abs().max() > 0 for g in packed[2].values())


def test_packing_without_the_block_mask_would_leak_across_sequences():
    """The control: attending across packed sequences changes the loss, so the mask matters."""
    model = tiny_llama()
    batch = pack_groups(random_groups(2, 3, 40, seed=1))
    with_mask = loss_and_grads(model, batch, "dpo")[0]
    model.zero_grad()
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
    out = fused_linear_wrpo_loss(
        hidden[0],
        model.lm_head.weight,
        batch["labels"][0],
        batch["cu_seqlens"],
        ref_logps=batch["ref_logps"].double(),
        beta=0.3,
    )
    assert not torch.allclose(out.loss.detach(), with_mask)
