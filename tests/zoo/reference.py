"""Ground truth for the zoo: sequence log-probs from each model's own forward, one sequence at a time.

Independent of ``wrpo`` and ``wrpo_kernels`` (nothing is imported from them): no packing, no padding,
no fused head. Whatever a model does to its logits (soft-capping, scaling) happens in its own forward.
"""

from __future__ import annotations

import random

import torch

PROMPT_LENGTHS = (5, 9, 3)  # cycled over the groups
FIRST_TOKEN = 3  # ids 0..2 are pad / bos / eos


def make_groups(vocab_size: int, *, seed: int = 0, num_groups: int = 3, K: int = 3) -> list[dict]:
    """``num_groups`` preference groups ``{"prompt_ids", "responses" (K of them), "num_chosen": 2}``.

    Prompts of 5, 9, 3, ... tokens; responses of 1 to 8 tokens, uneven, the first group's first response
    a single token. Token ids in [3, vocab_size), deterministic for ``seed``.
    """
    if vocab_size <= FIRST_TOKEN:
        raise ValueError(f"vocab_size must exceed {FIRST_TOKEN}, got {vocab_size}")
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(FIRST_TOKEN, vocab_size) for _ in range(n)]

    groups = []
    for g in range(num_groups):
        lengths = [rng.randint(1, 8) for _ in range(K)]
        if g == 0:
            lengths[0] = 1  # a one-token response: one predicted token, no response-to-response attention
            if K > 1 and len(set(lengths)) == 1:
                lengths[1] = 8  # uneven lengths
        prompt = tokens(PROMPT_LENGTHS[g % len(PROMPT_LENGTHS)])
        groups.append({"prompt_ids": prompt, "responses": [tokens(n) for n in lengths], "num_chosen": 2})
    return groups


def own_sequence_logps(model, groups, *, grad: bool = False) -> torch.Tensor:
    """[S] summed log-probs of every response given its prompt (S = all responses, group-major), each
    sequence run alone through ``model``'s own forward: ``log_softmax`` in float64 of the logit at
    position t, read at token t+1, summed over the positions t that predict response tokens. With an
    empty prompt the first response token is not predicted. float64 if the model is, else float32.
    ``grad``: differentiable (for parameter gradients)."""
    param = next(model.parameters())
    out = []
    with torch.set_grad_enabled(grad):
        for group in groups:
            prompt = list(group["prompt_ids"])
            for response in group["responses"]:
                ids = torch.tensor(prompt + list(response), device=param.device)
                logits = model(input_ids=ids[None], use_cache=False).logits[0]
                logp = torch.log_softmax(logits.double(), dim=-1)
                start = max(len(prompt), 1)  # first label position: a response token with a position before
                positions = torch.arange(start - 1, len(ids) - 1, device=ids.device)
                out.append(logp[positions, ids[positions + 1]].sum())
    dtype = torch.float64 if getattr(model, "dtype", param.dtype) == torch.float64 else torch.float32
    return torch.stack(out).to(dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference; its scale floored at 1e-30)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = max(float(b.abs().max()), 1e-30) if b.numel() else 1e-30
    return float((a - b).abs().max()) / scale if a.numel() else 0.0
