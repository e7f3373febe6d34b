"""The demo's settings: the full run and the QUICK one (one seed, fewer prompts and steps), each with the
0/1 verifier (``exact``) or the graded reward (``graded``: ``GRADED``, five seeds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

REWARDS = {
    "exact": "wrpo.data.construct.verifiers:arithmetic_exact_match",  # 1 or 0
    "graded": "wrpo.data.construct.verifiers:arithmetic_graded",  # in [0, 1]: closeness and true steps
}


@dataclass(frozen=True)
class DemoConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    reward: str = "exact"  # a key of REWARDS: how `wrpo data score --reward-fn` scores every sample
    held_out_per_family: int = 50  # greedy evaluation problems, never trained on
    # the pipeline's prompts (1/3 SFT, 2/3 preference), from the train part; with the held-out and the
    # target's problems at most 225 per family (the size of twostep)
    prompts_per_family: int = 150
    hidden: int = 64  # every model: a 2-layer tiny Llama of this width
    layers: int = 2
    # sources: `wrpo sft` on every train problem of their family (correct solutions)
    source_steps: dict = field(default_factory=lambda: {"addsub": 500, "mul": 350, "twostep": 700})
    source_lr: float = 5e-3
    # target: `wrpo sft` briefly on a few train problems per family that are not pipeline prompts
    target_problems_per_family: int = 50
    target_steps: int = 250
    target_lr: float = 5e-3
    n: int = 5  # samples per prompt and model (the paper's N)
    temperature: float = 0.8
    sft_epochs: int = 8
    sft_lr: float = 2e-3
    train_epochs: int = 4
    train_lr: float = 1e-4
    beta: float = 0.1
    alpha: float = 0.1  # the paper's default, linear from 0
    extra_alphas: tuple[float, ...] = (0.3, 0.5)  # WRPO, linear from 0
    extra_betas: tuple[float, ...] = (0.5,)  # DPO and WRPO (alpha) again with these betas
    # not the paper's: also keep the preference prompts whose target samples all score the same (where
    # y_wt = y_l, DPO gets no signal and WRPO still learns y_ws over y_l)
    pref_keep_tied: bool = False
    batch_size: int = 16
    parallel: int = 2  # wrpo commands at once
    threads: int = 1  # torch threads of every wrpo command (and of this process), whatever `parallel` is

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"reward {self.reward!r}: expected one of {', '.join(REWARDS)}")

    @property
    def reward_fn(self) -> str:
        return REWARDS[self.reward]

    def to_json(self) -> dict:
        return {**asdict(self), "reward_fn": self.reward_fn}


FULL = DemoConfig()
QUICK = replace(
    FULL,
    seeds=(0,),
    held_out_per_family=10,
    prompts_per_family=12,
    source_steps={"addsub": 60, "mul": 60, "twostep": 60},
    target_steps=250,  # enough that some target samples are right (else no preference row is kept)
    target_problems_per_family=30,
    sft_epochs=2,
    train_epochs=1,
    parallel=1,
    extra_alphas=(),
    extra_betas=(),
)

# the graded reward's full run: five seeds (the paired WRPO - DPO interval needs them), else as FULL
GRADED = replace(FULL, reward="graded", seeds=(0, 1, 2, 3, 4))
QUICK_GRADED = replace(QUICK, reward="graded")


def preset(*, quick: bool, reward: str) -> DemoConfig:
    """The settings ``python -m fusion_demo [--quick] --reward REWARD`` starts from."""
    if reward not in REWARDS:
        raise ValueError(f"reward {reward!r}: expected one of {', '.join(REWARDS)}")
    if reward == "graded":
        return QUICK_GRADED if quick else GRADED
    return QUICK if quick else FULL
