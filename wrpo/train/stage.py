"""One stage end to end: data -> tokens -> (reference log-probs) -> Trainer -> saved model and report."""

from __future__ import annotations

from pathlib import Path

import datasets
import torch

from wrpo.data.preference import load_preference_data, tokenize_example
from wrpo.data.sft import describe_formats, load_sft_data, tokenize_sft_example
from wrpo.model.layout import LayoutPlan, plan_and_prepare
from wrpo.train import ref_cache
from wrpo.train.checkpoints import resolve_resume, train_from_checkpoint
from wrpo.train.core import reference_logps
from wrpo.train.curves import plot_curves, summary
from wrpo.train.effective_config import print_effective_config
from wrpo.train.load_models import load_policy, load_reference
from wrpo.train.tiny import SAMPLE_DATA
from wrpo.train.trainer import WRPOTrainer


def load_examples(config, stage: str = "train"):
    """Validate every row of the data first (DataError names the line), and the options that depend on
    it (``chosen_weights``: one per chosen response); nothing else has run yet. ``stage`` "sft" reads
    SFT rows (``wrpo.data.sft``: text, messages, prompt-completion or preference rows), "train"
    preference rows (``wrpo.data.preference``)."""
    if stage == "sft":
        return load_sft_data(config.dataset or SAMPLE_DATA)
    examples = load_preference_data(config.dataset or SAMPLE_DATA)
    weights = getattr(config, "chosen_weights", None)
    if weights and examples and len(weights) != len(examples[0].chosen):
        raise ValueError(
            f"--chosen_weights has {len(weights)} weights, but the rows of {config.dataset or SAMPLE_DATA} "
            f"have {len(examples[0].chosen)} chosen responses each: give one weight per chosen response"
        )
    return examples


def build_datasets(examples, tokenizer, config, stage: str):
    """-> (train, eval | None) datasets of groups: prompt_ids, responses, num_chosen.

    sft: one response per group, the completion of each SFT example (``wrpo.data.sft``; a preference
    example gives its first chosen response, the source pick y_ws), ``num_chosen`` 1."""
    limits = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
    rows = []
    for ex in examples:
        if stage == "sft":
            g = tokenize_sft_example(ex, tokenizer, **limits)
            rows.append(
                {"prompt_ids": list(g.prompt_ids), "responses": [list(g.responses[0])], "num_chosen": 1}
            )
            continue
        g = tokenize_example(ex, tokenizer, **limits)
        rows.append(
            {
                "prompt_ids": list(g.prompt_ids),
                "responses": [list(r) for r in g.responses],
                "num_chosen": len(ex.chosen),
            }
        )
    n_eval = min(config.eval_rows, len(rows) - 1)
    train = datasets.Dataset.from_list(rows[: len(rows) - n_eval])
    evaluation = datasets.Dataset.from_list(rows[len(rows) - n_eval :]) if n_eval > 0 else None
    return train, evaluation


@torch.no_grad()
def compute_ref_logps(
    ref_model, dataset, config, pad_token_id: int, device, layout: LayoutPlan | None = None
) -> torch.Tensor:
    """[rows, K] reference log-probs of every group, with the forward-only path, in the run's
    ``layout`` (planned for ``ref_model`` if None)."""
    collate = (layout or plan_and_prepare(config, ref_model)).collator(pad_token_id)
    ref_model = ref_model.to(device).eval()
    out = []
    step = max(config.per_device_eval_batch_size, 1)
    for start in range(0, len(dataset), step):
        batch = collate([dataset[i] for i in range(start, min(start + step, len(dataset)))])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logps = reference_logps(
            ref_model, batch, backend=config.kernel_backend, chunk_tokens=config.chunk_tokens
        )
        out.append(logps.float().cpu())
    return torch.cat(out)


def precompute_ref_logps(ref_model, dataset, config, pad_token_id: int, device, layout: LayoutPlan):
    """Adds a ``ref_logps`` column ([K] per group): from the disk cache (``ref_cache``) when this data
    and reference model were seen before, else computed once (the main process first) and cached."""
    path = ref_cache.cache_path(dataset, config)
    with config.main_process_first(desc="reference log-probs"):
        logps = ref_cache.load(path) if path is not None else None
        if logps is None or logps.shape[0] != len(dataset):
            logps = compute_ref_logps(ref_model, dataset, config, pad_token_id, device, layout)
            if path is not None and config.local_process_index == 0:
                ref_cache.save(path, logps)
    return dataset.add_column("ref_logps", logps.tolist())


def run_stage(stage: str, config, examples) -> dict:
    """Train, save the model (HF format) and the report into ``config.output_dir``; returns final metrics."""
    model, tokenizer = load_policy(config)
    train, evaluation = build_datasets(examples, tokenizer, config, stage)
    ref_model = load_reference(config, model) if stage == "train" else None
    layout = plan_and_prepare(config, model, ref_model, log=False)  # one decision, printed just below
    formats = describe_formats(examples) if stage == "sft" else None
    print_effective_config(stage, config, model, train, evaluation, layout, sft_formats=formats)
    if ref_model is not None and config.precompute_ref_logps:
        pad = tokenizer.pad_token_id
        train = precompute_ref_logps(ref_model, train, config, pad, config.device, layout)
        if evaluation is not None:
            evaluation = precompute_ref_logps(ref_model, evaluation, config, pad, config.device, layout)
        ref_model = None  # not kept in memory
    trainer = WRPOTrainer(
        model,
        config,
        ref_model=ref_model,
        stage=stage,
        pad_token_id=tokenizer.pad_token_id,
        layout=layout,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
    )
    train_from_checkpoint(trainer, resolve_resume(config.resume_from_checkpoint, config.output_dir))
    final = trainer.evaluate() if evaluation is not None else {}
    trainer.save_model(config.output_dir)
    trainer.save_state()  # trainer_state.json: every logged step
    if trainer.is_world_process_zero():
        out = Path(config.output_dir)
        plot_curves(trainer.state.log_history, out / "training_curves.png")
        print(summary(trainer.state.log_history))
        print(f"model, tokenizer and training_curves.png saved in {out}")
    return final
