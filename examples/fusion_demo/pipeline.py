"""One seed of the demo through the ``wrpo`` CLI, in the paper's order.

1. sources: ``wrpo sft`` on every train problem of their family; the target: ``wrpo sft`` briefly on a
   few train problems of each family that are not pipeline prompts;
2. ``wrpo data split`` of the pipeline prompts (1/3 SFT); ``wrpo data sample`` (the sources on every
   prompt, the target on the SFT third), ``score --reward-fn`` (the config's reward: the 0/1 verifier or
   the graded one), ``build --keep-tied``; ``wrpo sft`` on y_ws;
3. the SFT target re-sampled on the preference prompts, scored, built; ``wrpo train`` per method from the
   SFT checkpoint; greedy held-out accuracy of every model.

Besides the accuracies, each seed records what the preference data holds (``preference_stats``): how many
of the offered prompts ``build`` kept, and on how many kept rows y_ws is right (exact match) and y_wt
wrong, the rows where a source can teach the target something DPO's y_wt cannot.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tqdm.auto import tqdm

from fusion_demo.config import DemoConfig
from fusion_demo.evaluate import accuracy
from fusion_demo.jobs import run_wrpo
from fusion_demo.models import save_init_model
from fusion_demo.tasks import FAMILIES, prompt_row, sft_row, split_problems
from wrpo.cli.main import main as wrpo
from wrpo.data.construct.verifiers import arithmetic_exact_match


def method_runs(cfg: DemoConfig) -> dict[str, list[str]]:
    """{method: `wrpo train` flags}: DPO = alpha 0 throughout (y_wt over y_l; y_ws gets weight 0)."""
    dpo = ["--alpha", "0", "--alpha_schedule", "constant"]
    wrpo = ["--alpha", str(cfg.alpha), "--alpha_schedule", "linear"]
    runs = {
        "target-sft-dpo": [*dpo, "--beta", str(cfg.beta)],
        "target-sft-wrpo": [*wrpo, "--beta", str(cfg.beta)],
    }
    for a in cfg.extra_alphas:
        runs[f"target-sft-wrpo-alpha{a:g}"] = [
            "--alpha",
            str(a),
            "--alpha_schedule",
            "linear",
            "--beta",
            str(cfg.beta),
        ]
    for b in cfg.extra_betas:
        runs[f"target-sft-dpo-beta{b:g}"] = [*dpo, "--beta", str(b)]
        runs[f"target-sft-wrpo-beta{b:g}"] = [*wrpo, "--beta", str(b)]
    return runs


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(*argv: str) -> None:
    if wrpo(["data", *argv]) != 0:
        raise RuntimeError(f"wrpo data {' '.join(argv)} failed (see above)")


def _sft(
    model: Path, data: Path, out: Path, lr: float, bs: int, *, steps: int = -1, epochs: float = 1
) -> list[str]:
    return ["sft", "--model", str(model), "--dataset", str(data), "--output_dir", str(out),
            "--learning_rate", str(lr), "--max_steps", str(steps), "--num_train_epochs", str(epochs),
            "--per_device_train_batch_size", str(bs), "--lr_scheduler_type", "cosine", "--warmup_steps", "10",
            "--logging_steps", "25", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
            "--seed", "0"]  # fmt: skip


def _sample(model: Path, prompts: Path, out: Path, name: str, cfg: DemoConfig, seed: int) -> list[str]:
    return ["data", "sample", "--model", str(model), "--input", str(prompts), "--output", str(out),
            "--model-name", name, "--n", str(cfg.n), "--temperature", str(cfg.temperature),
            "--max-new-tokens", "40", "--batch-size", "64", "--seed", str(seed),
            "--device", "cpu"]  # fmt: skip


def run_seed(cfg: DemoConfig, seed: int, out: Path, bar: tqdm) -> dict:
    """Everything for one seed under ``out``; returns {"methods": {name: accuracy dict}, "data": counts}."""
    train, held = split_problems(seed, cfg.held_out_per_family)
    rng = random.Random(seed)
    pipeline_problems = [p for f in FAMILIES for p in rng.sample(train[f], cfg.prompts_per_family)]
    pipeline_keys = {p.key for p in pipeline_problems}
    prompts = _write(
        out / "prompts.jsonl", [prompt_row(p, f"{seed}-{i}") for i, p in enumerate(pipeline_problems)]
    )
    models, logs = out / "models", out / "logs"

    bar.set_description(f"seed {seed}: sources and target")
    jobs = {}
    for i, f in enumerate(FAMILIES):
        init = save_init_model(
            models / f"init-{f}", hidden=cfg.hidden, layers=cfg.layers, seed=100 * seed + i
        )
        data = _write(out / f"sft-source-{f}.jsonl", [sft_row(p) for p in train[f]])
        jobs[f"source-{f}"] = _sft(
            init, data, models / f"source-{f}", cfg.source_lr, 32, steps=cfg.source_steps[f]
        )
    init = save_init_model(models / "init-target", hidden=cfg.hidden, layers=cfg.layers, seed=100 * seed + 9)
    rest = {f: [p for p in train[f] if p.key not in pipeline_keys] for f in FAMILIES}
    pool = [sft_row(p) for f in FAMILIES for p in rest[f][: cfg.target_problems_per_family]]
    data = _write(out / "sft-target.jsonl", pool)
    jobs["target"] = _sft(init, data, models / "target", cfg.target_lr, 32, steps=cfg.target_steps)
    run_wrpo(jobs, logs, bar, parallel=cfg.parallel, threads=cfg.threads)

    bar.set_description(f"seed {seed}: split, sample, score, build")
    _data("split", "--input", str(prompts), "--seed", str(seed), "--out-dir", str(out / "split"))
    sft_prompts, pref_prompts = out / "split" / "sft.jsonl", out / "split" / "pref.jsonl"
    names = [f"source-{f}" for f in FAMILIES]
    samples = {n: out / "samples" / f"{n}.jsonl" for n in [*names, "target", "target-sft"]}
    jobs = {f"sample-{n}": _sample(models / n, prompts, samples[n], n, cfg, seed) for n in names}
    jobs["sample-target"] = _sample(models / "target", sft_prompts, samples["target"], "target", cfg, seed)
    run_wrpo(jobs, logs, bar, parallel=cfg.parallel, threads=cfg.threads)
    for n in [*names, "target"]:
        _data("score", "--input", str(samples[n]), "--reward-fn", cfg.reward_fn)
    sources = [str(samples[n]) for n in names]
    sft_data = out / "sft-built.jsonl"
    _data(
        "build",
        "--sources",
        *sources,
        "--targets",
        str(samples["target"]),
        "--output",
        str(sft_data),
        "--keep-tied",
    )

    bar.set_description(f"seed {seed}: wrpo sft")
    sft = _sft(
        models / "target", sft_data, models / "target-sft", cfg.sft_lr, cfg.batch_size, epochs=cfg.sft_epochs
    )
    run_wrpo({"target-sft": sft}, logs, bar, threads=cfg.threads)

    bar.set_description(f"seed {seed}: re-sample, score, build")
    again = _sample(models / "target-sft", pref_prompts, samples["target-sft"], "target-sft", cfg, seed)
    run_wrpo({"sample-target-sft": again}, logs, bar, threads=cfg.threads)
    _data("score", "--input", str(samples["target-sft"]), "--reward-fn", cfg.reward_fn)
    pref = out / "pref-built.jsonl"
    tied = ["--keep-tied"] if cfg.pref_keep_tied else []
    _data(
        "build", "--sources", *sources, "--targets", str(samples["target-sft"]), "--output", str(pref), *tied
    )

    bar.set_description(f"seed {seed}: wrpo train")
    jobs = {}
    for name, flags in method_runs(cfg).items():
        jobs[name] = ["train", "--model", str(models / "target-sft"), "--dataset", str(pref),
                      "--output_dir", str(models / name), *flags,
                      "--learning_rate", str(cfg.train_lr), "--num_train_epochs", str(cfg.train_epochs),
                      "--per_device_train_batch_size", str(cfg.batch_size), "--lr_scheduler_type", "cosine",
                      "--warmup_steps", "5", "--logging_steps", "10", "--save_strategy", "no",
                      "--report_to", "none", "--use_cpu", "true", "--seed", "0"]  # fmt: skip
    run_wrpo(jobs, logs, bar, parallel=cfg.parallel, threads=cfg.threads)

    bar.set_description(f"seed {seed}: evaluate")
    results = {}
    for name in ["target", "target-sft", *method_runs(cfg), *(f"source-{f}" for f in FAMILIES)]:
        results[name] = accuracy(models / name, held)
        bar.update()
    counts = {
        "prompts": len(pipeline_problems),
        "sft_prompts": _lines(sft_prompts),
        "sft_rows": _lines(sft_data),
        "pref_prompts": _lines(pref_prompts),
        "pref_rows": _lines(pref),
        "held_out": sum(len(v) for v in held.values()),
    }
    return {"methods": results, "data": counts, "preference_stats": preference_stats(pref, pref_prompts)}


def _text(message) -> str:
    return message["content"] if isinstance(message, dict) else str(message)


def preference_stats(built: Path, offered: Path) -> dict:
    """What the built preference rows hold, judged by exact match of the final number (whatever reward
    ranked them): {"offered": prompts, "kept": rows, "kept_fraction", "ws_correct", "wt_correct",
    "ws_correct_wt_wrong": rows, and "ws_correct_wt_wrong_fraction" of the kept rows}."""
    rows = [json.loads(line) for line in built.read_text().splitlines() if line.strip()]
    offered_n = _lines(offered)
    ws = [arithmetic_exact_match([], _text(r["chosen"][0]), r) == 1.0 for r in rows]
    wt = [arithmetic_exact_match([], _text(r["chosen"][-1]), r) == 1.0 for r in rows]
    teach = sum(a and not b for a, b in zip(ws, wt, strict=True))
    kept = len(rows)
    return {
        "offered": offered_n,
        "kept": kept,
        "kept_fraction": round(kept / offered_n, 4) if offered_n else 0.0,
        "ws_correct": sum(ws),
        "wt_correct": sum(wt),
        "ws_correct_wt_wrong": teach,
        "ws_correct_wt_wrong_fraction": round(teach / kept, 4) if kept else 0.0,
    }


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def num_steps(cfg: DemoConfig) -> int:
    """Progress-bar ticks per seed: every wrpo job and every evaluated model."""
    models = 2 + len(FAMILIES) + len(method_runs(cfg))
    return (len(FAMILIES) + 1) * 2 + 2 + len(method_runs(cfg)) + models
