"""fused_linear_wrpo_loss on every backend against the fp64 reference backend: loss, [B, K] log-probs,
metrics and the gradients of hidden, weight and bias (docs/method.md §3, §6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from helpers import check_all_close, fused, make_batch, resolve_chunk, same_size_groups
from helpers.backends import TORCH, TORCH_NOCSRC, TRITON, cases

TOL = {torch.float64: 1e-10, torch.float32: 2e-4}  # fp32: Triton's kernels vs the fp64 reference


@dataclass
class Case:
    id: str
    batch: dict  # make_batch arguments
    opts: dict  # fused_linear_wrpo_loss options
    chunk: object = None  # chunk_tokens, or "group" / "groups" (helpers.resolve_chunk)
    extra: dict = field(default_factory=dict)


def shape_cases(shapes, chunks, H, V, seed):
    """Every loss type, (K, num_chosen) and chunk budget on B = 3 groups of equal token totals."""
    return [
        Case(
            f"{loss_type}-K{K}-C{C}-chunk{chunk}",
            {
                "B": 3,
                "K": K,
                "H": H,
                "V": V,
                "seed": seed(K, C),
                "lengths": same_size_groups(3, K, seed=K),
                "ignore_frac": 0.2,
                "with_bias": True,
            },
            {"loss_type": loss_type, "num_chosen": C, "alpha": 0.3, "beta": 0.2},
            chunk,
        )
        for loss_type in ("dpo", "simpo", "ipo")
        for K, C in shapes
        for chunk in chunks
    ]


# chunks: none, several whole groups, exactly one group, and budgets that split groups
CHUNKED_SHAPES = shape_cases(
    [(2, 1), (3, 2), (3, 1), (4, 3), (4, 2)],
    [None, "groups", "group", 5, 1],
    H=5,
    V=37,
    seed=lambda K, C: 10 * K + C,
)
# larger than one Triton tile in H and V
TRITON_SHAPES = shape_cases(
    [(2, 1), (3, 2), (4, 3), (4, 2)], [None, "group", 4], H=20, V=67, seed=lambda K, C: K + 7 * C
)

OPTION_CASES = {
    "label_smoothing_dpo": {"loss_type": "dpo", "label_smoothing": 0.2},
    "label_smoothing_simpo_gamma": {"loss_type": "simpo", "label_smoothing": 0.1, "gamma": 0.4},
    "gamma_dpo": {"loss_type": "dpo", "gamma": 0.3},
    "nll_weight_dpo": {"loss_type": "dpo", "nll_weight": 0.7},
    "nll_weight_ipo": {"loss_type": "ipo", "nll_weight": 0.2},
    "softcap": {"loss_type": "dpo", "softcap": 1.5},
    "temperature": {"loss_type": "simpo", "temperature": 0.6},
    "softcap_temperature_ipo": {"loss_type": "ipo", "softcap": 2.0, "temperature": 1.7},
    "chosen_weights": {"loss_type": "dpo", "chosen_weights": [0.35, 0.65]},
    "chosen_weights_simpo": {"loss_type": "simpo", "chosen_weights": (0.8, 0.2)},
    "ref_logps_S": {"loss_type": "dpo", "ref": "S"},
    "ref_logps_S_ipo": {"loss_type": "ipo", "ref": "S"},
    "simpo_without_ref": {"loss_type": "simpo", "ref": None},
    "alpha_0": {"loss_type": "dpo", "alpha": 0.0},
    "alpha_1": {"loss_type": "dpo", "alpha": 1.0},
}
OPTIONS = [
    Case(
        f"{name}-chunk{chunk}",
        {
            "B": 3,
            "K": 3,
            "H": 6,
            "V": 29,
            "seed": len(name),
            "ignore_frac": 0.2,
            "with_bias": True,
            "lengths": same_size_groups(3, 3, seed=1, max_len=7),
        },
        {"beta": 0.3, "alpha": 0.2, **opts},
        chunk,
    )
    for name, opts in OPTION_CASES.items()
    for chunk in (None, "group", 4)
]
TRITON_OPTIONS = [
    Case(
        f"{name}-chunk{chunk}",
        {"B": 2, "K": 3, "H": 9, "V": 300, "seed": 5, "max_len": 9, "ignore_frac": 0.3, "with_bias": True},
        opts,
        chunk,
    )
    for name, opts in {
        "dpo-softcap-temp-ls": {
            "loss_type": "dpo",
            "softcap": 2.0,
            "temperature": 0.7,
            "label_smoothing": 0.1,
        },
        "simpo-gamma-nll-softcap": {"loss_type": "simpo", "gamma": 0.4, "nll_weight": 0.5, "softcap": 1.5},
        "ipo-temp-weights": {"loss_type": "ipo", "temperature": 1.6, "chosen_weights": [0.8, 0.2]},
    }.items()
    for chunk in (None, 3)
]


def check_against_reference(backend, case):
    batch = backend.on_device(make_batch(**case.batch))
    ref = fused(batch, "reference", **case.opts)
    with backend.calls():
        ours = fused(
            batch,
            backend.name,
            dtype=backend.dtype,
            chunk_tokens=resolve_chunk(case.chunk, batch),
            **case.opts,
        )
    check_all_close(ours, ref, TOL[backend.dtype], f"{backend.id} {case.id}")


@pytest.mark.parametrize(
    ("backend", "case"),
    cases({TORCH: CHUNKED_SHAPES, TORCH_NOCSRC: CHUNKED_SHAPES, TRITON: TRITON_SHAPES}),
)
def test_loss_logps_metrics_and_gradients_match_fp64_reference(backend, case):
    check_against_reference(backend, case)


@pytest.mark.parametrize(
    ("backend", "case"), cases({TORCH: OPTIONS, TORCH_NOCSRC: OPTIONS, TRITON: TRITON_OPTIONS})
)
def test_every_option_matches_fp64_reference(backend, case):
    check_against_reference(backend, case)


@pytest.mark.parametrize("case", ["label_smoothing_dpo", "nll_weight_dpo", "softcap", "chosen_weights"])
def test_options_change_the_loss(case):
    """Each option reaches the computation (so the parity above is not vacuous)."""
    batch = make_batch(B=2, K=3, H=6, V=29, seed=3, with_bias=True)
    opts = {"beta": 0.3, **OPTION_CASES[case]}
    plain = fused(batch, "torch", beta=0.3, loss_type=opts["loss_type"], grad=False)
    changed = fused(batch, "torch", grad=False, **opts)
    assert abs(changed["loss"].item() - plain["loss"].item()) > 1e-6
