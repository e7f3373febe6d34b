"""The TRL adapter (``wrpo.integrations.trl.WRPOTrainer``) trained on a tiny Llama, 2 steps with gradient
accumulation 2, fp32; run by distributed/test_deepspeed_trl.py in 1 process and under DeepSpeed ZeRO-3 in 2
CPU processes::

    python tests/distributed/trl_zero3_script.py MODEL_DIR OUT_DIR BATCH VARIANT...
    DS_ACCELERATOR=cpu accelerate launch --config_file examples/accelerate/zero3.yaml \
        --mixed_precision no tests/distributed/trl_zero3_script.py MODEL_DIR OUT_DIR BATCH VARIANT...

VARIANT (each trained in turn in the same processes): ``precompute`` (``precompute_ref_log_probs=True``,
no reference model; under ZeRO-3 the log-probs come from TRL's ``prepare_deepspeed`` engine over the
policy) or ``ref_model`` (a reference model passed in; under ZeRO-3 TRL wraps it with
``prepare_deepspeed``). BATCH: per-device batch (2 for 1 process, 1 for 2 processes: the same global
batch). Rank 0 writes ``OUT_DIR/VARIANT/logs.json``: the logged steps and what the run trained with
(accelerate's distributed type, the DeepSpeed engines' ZeRO stages, partitioned parameters).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wrpo.integrations.trl import WRPOConfig, WRPOTrainer
from wrpo.train.tiny import SAMPLE_DATA


def pairs(n: int = 16) -> datasets.Dataset:
    """TRL preference pairs (text): the target pick against the rejected response of the sample rows."""
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()[:n]]
    text = lambda x: x["content"] if isinstance(x, dict) else x  # noqa: E731
    prompt = lambda p: p["content"] if isinstance(p, dict) else p[-1]["content"] if isinstance(p, list) else p  # noqa: E731
    return datasets.Dataset.from_list(
        [
            {
                "prompt": prompt(r["prompt"]),
                "chosen": text(r["chosen"][-1]),
                "rejected": text(r["rejected"][0]),
            }
            for r in rows
        ]
    )


def engine_info(engine) -> dict | None:
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return None
    if not isinstance(engine, DeepSpeedEngine):
        return None
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_id")]  # ZeRO-3's
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": engine.world_size,
        "zero3_parameters": len(params),  # those held as a shard (the smallest stay whole):
        "partitioned": sum(1 for p in params if p.ds_tensor.numel() < p.ds_numel),
    }


def train(model_dir: str, out_dir: str, variant: str, batch: int) -> None:
    args = WRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=1,
        learning_rate=5e-3,
        warmup_steps=0,
        report_to=[],
        seed=3,
        beta=0.5,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=variant == "precompute",
    )
    # after the config: under ZeRO-3 (zero3_init_flag) transformers loads it partitioned (zero.Init)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir) if variant == "ref_model" else None
    trainer = WRPOTrainer(
        model_dir,
        ref_model=ref_model,
        args=args,
        train_dataset=pairs(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        steps = [e for e in trainer.state.log_history if "loss" in e and "train_runtime" not in e]
        info = {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "num_processes": trainer.accelerator.num_processes,
            "policy_engine": engine_info(trainer.model_wrapped),
            "ref_engine": engine_info(trainer.ref_model),
            "precompute_engine": engine_info(getattr(trainer, "_precompute_engine", None)),
            "ref_model": type(trainer.ref_model).__name__,
            "steps": steps,
        }
        (Path(out_dir) / "logs.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    try:  # skip the JIT build of DeepSpeed's shared-memory all-reduce op (inference only, ~1 min of g++)
        import deepspeed.comm  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    except ImportError:
        pass
    torch.set_num_threads(1)
    model_dir, out_dir, batch, variants = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    for variant in variants:  # one after the other in the same processes (one launch)
        train(model_dir, str(out_dir / variant), variant, batch)
