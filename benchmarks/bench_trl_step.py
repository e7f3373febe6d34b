"""A DPO training step in TRL: ``trl.DPOTrainer`` against ``wrpo.integrations.trl.WRPOTrainer``.

Same data (TRL's standard pairs, K = 2), same small Llama (H=256, 4 layers, 4 heads, V=32000, fp32),
same seed and batches, sigmoid loss with the reference model run on the fly, no gradient
checkpointing, AdamW. Lengths like UltraFeedback's: prompts uniform in [100, 400] tokens, responses
log-normal (median 250) clipped to [50, 700]. TRL pads each pair and projects every labelled row through
its two-pass chunked head (the logits recomputed in backward); ours packs the responses without padding
and runs the single-pass fused loss.

Each (method, round) runs in a fresh process: --steps optimizer steps, the first one a warm-up;
throughput = real tokens of the timed steps / their wall time (median over --rounds, methods
alternating); memory = peak RSS rise during training above the RSS once the trainer is built.

    python benchmarks/bench_trl_step.py --out "benchmarks/results/trl_step_{device}.json"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import MMAP_ENV, peak_rss_rise_mb, rotated
from plots import bar_plot
from records import machine, write_json

METHODS = ("trl-dpo", "wrpo-trl")
PAD_ID = 0


def make_data(path: Path, rows: int, seed: int) -> None:
    """Pairs of random-word texts with UltraFeedback-like token lengths (tiny tokenizer: 1 word = 1 id)."""
    from wrpo.train.tiny import WORDS

    g = torch.Generator().manual_seed(seed)
    words = sorted(set(WORDS))

    def text(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n // 2,), generator=g).tolist())

    def response_len():
        return int(min(max(float(torch.empty(1).log_normal_(5.52, 0.6, generator=g)), 50), 700))

    with path.open("w") as f:
        for _ in range(rows):
            prompt = text(int(torch.randint(100, 401, (1,), generator=g)))
            pair = {"prompt": prompt, "chosen": text(response_len()), "rejected": text(response_len())}
            f.write(json.dumps(pair) + "\n")


def make_model(path: Path, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from wrpo.train.tiny import build_tiny_tokenizer

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.V,
        hidden_size=args.H,
        intermediate_size=4 * args.H,
        num_hidden_layers=args.layers,
        num_attention_heads=args.H // 64,
        num_key_value_heads=args.H // 64,
        max_position_embeddings=2048,
        pad_token_id=PAD_ID,
        attn_implementation="sdpa",
    )
    LlamaForCausalLM(config).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)


def child(method: str, args) -> dict:
    """Train --steps steps in this process; returns step times, real tokens per step, peak RSS rise."""
    import datasets
    import trl
    from transformers import AutoTokenizer, TrainerCallback

    from wrpo.integrations.trl import WRPOConfig, WRPOTrainer

    base_cls, config_cls = (
        (trl.DPOTrainer, trl.DPOConfig) if method == "trl-dpo" else (WRPOTrainer, WRPOConfig)
    )
    tokens = []

    class Counted(base_cls):
        def compute_loss(self, model, inputs, *a, **kw):
            tokens.append(int((inputs["input_ids"] != PAD_ID).sum()))
            return super().compute_loss(model, inputs, *a, **kw)

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_a, **_k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            times.append(time.perf_counter() - self.t0)

    work = Path(args.work)
    data = datasets.load_dataset("json", data_files=str(work / "pairs.jsonl"), split="train")
    config = config_cls(
        output_dir=str(work / method),
        per_device_train_batch_size=args.B,
        max_steps=args.steps,
        learning_rate=1e-6,
        report_to="none",
        seed=args.seed,
        save_strategy="no",
        logging_steps=args.steps,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
    )
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    trainer = Counted(
        str(work / "model"),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    peak = peak_rss_rise_mb(trainer.train)  # above the RSS once the trainer is built
    per_step = len(tokens) // len(times)
    step_tokens = [sum(tokens[i * per_step : (i + 1) * per_step]) for i in range(len(times))]
    return {"times": times, "tokens": step_tokens, "peak_mb": peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only for now (peak RSS)")
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--B", type=int, default=2, help="prompts (pairs) per step")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run, the first a warm-up")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path, {device} filled in (a .png is written beside it)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        make_data(Path(work) / "pairs.jsonl", rows=args.B * args.steps, seed=args.seed)
        make_model(Path(work) / "model", args)
        runs = {m: [] for m in METHODS}
        for r in range(args.rounds):
            for m in rotated(METHODS, r):  # alternate which goes first
                shape = ("device", "H", "layers", "V", "B", "steps", "seed")
                cmd = [sys.executable, __file__, "--child", m, "--work", work]
                cmd += [f"--{k}={getattr(args, k)}" for k in shape]
                env = {**os.environ, **MMAP_ENV, "TQDM_DISABLE": "1"}
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {m}: {sum(runs[m][-1]['times'][1:]):.2f} s", flush=True)
    results = []
    for m in METHODS:
        tps = [sum(x["tokens"][1:]) / sum(x["times"][1:]) for x in runs[m]]
        row = {
            "method": m,
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_rounds": tps,
            "peak_mb": statistics.median(x["peak_mb"] for x in runs[m]),
            "tokens_per_step": runs[m][0]["tokens"],
        }
        results.append(row)
    trl_row = results[0]
    for r in results:
        r["speedup"] = r["tokens_per_s"] / trl_row["tokens_per_s"]
        r["memory_ratio"] = r["peak_mb"] / trl_row["peak_mb"]
    print(f"{'method':10} {'tokens/s':>9} {'speed-up':>9} {'peak MiB':>9} {'mem ratio':>9}")
    for r in results:
        print(
            f"{r['method']:10} {r['tokens_per_s']:9.0f} {r['speedup']:8.2f}x {r['peak_mb']:9.0f} "
            f"{r['memory_ratio']:9.2f}"
        )
    if args.out:
        out = Path(args.out.format(device=args.device))
        config = {k: getattr(args, k) for k in ("H", "layers", "V", "B", "steps", "rounds", "seed")}
        write_json(out, {"machine": machine(args.device), "config": config, "K": 2, "results": results})
        panels = [("tokens_per_s", "tokens/s"), ("peak_mb", "peak RSS rise (MiB)")]
        title = f"DPO step in TRL, {machine(args.device)['device']}"
        bar_plot(results, out.with_suffix(".png"), title, panels, highlight=lambda n: n == "wrpo-trl")
        print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
