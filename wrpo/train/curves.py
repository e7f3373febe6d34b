"""After a run: ``training_curves.png`` (loss, margins, accuracies, alpha) and a summary table."""

from __future__ import annotations

from pathlib import Path

CURVES = (
    ("loss", "loss"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
    ("cur_alpha", "alpha"),
)


def _series(history, key):
    points = [(h["step"], h[key]) for h in history if key in h]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(history: list[dict], path: Path) -> None:
    """One panel per curve of ``CURVES``; evaluation points (``eval_`` keys) drawn over training ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for prefix, style in (("", "-"), ("eval_", "o--")):
            x, y = _series(history, prefix + key)
            if x:
                ax.plot(x, y, style, label="eval" if prefix else "train", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(history: list[dict]) -> str:
    """First and last logged value of the main metrics, training and evaluation."""
    keys = [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
        "cur_alpha",
        "nll_loss",
        "eval_loss",
        "eval_rewards/accuracies",
        "eval_rewards/margins",
    ]
    rows = [(k, y) for k in keys if (y := _series(history, k)[1])]
    if not rows:
        return _nothing_logged(history)
    lines = [f"{'metric':<26}{'first':>12}{'last':>12}"]
    lines += [f"{k:<26}{y[0]:>12.4f}{y[-1]:>12.4f}" for k, y in rows]
    return "\n".join(lines)


def _nothing_logged(history: list[dict]) -> str:
    """The summary of a run too short for any logging step: its mean loss, if the Trainer gave one."""
    end = next((h for h in reversed(history) if "train_loss" in h), {})
    line = "no step's metrics were logged (fewer steps than --logging_steps)"
    if "train_loss" in end:
        line += f"; mean training loss over {end.get('step', '?')} step(s): {end['train_loss']:.4f}"
    return line
