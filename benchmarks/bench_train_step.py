"""One WRPO training step of a small model: packed rows + fused head loss vs padded rows + naive logits.

Methods (same batches, same initial weights, forward + backward + AdamW step, precomputed reference
log-probs, K = 3 responses per prompt):
  packed-fused   the ``wrpo train`` path: every sequence of the batch packed into one row without
                 padding, attention per sequence (flash-attention varlen on a GPU when installed,
                 else wrpo.model.attention: one causal sdpa call per sequence), the body run without its
                 head, then wrpo_kernels.fused_linear_wrpo_loss on the hidden states and
                 lm_head.weight (which drops the prompt rows before the head)
  packed-shared-fused  the same with each prompt encoded once for its K responses
                 (wrpo.data.collate.pack_shared_prefix: responses restart at position P and attend to the
                 prompt and themselves); tokens/s still counts the unshared tokens (prompt once per
                 response), so the same work counts the same; --profile picks the lengths
  packed-mask-fused  the same, attention through sdpa with a dense block-diagonal causal mask
                 (one row per group), what a model without a varlen attention gets
  padded-naive   the usual trainer path: one right-padded row per sequence, the model's full logits
                 [S, T, V], log_softmax, gather, masked sum -> wrpo_kernels.wrpo_loss
  packed-naive, padded-fused   the two other combinations, to separate the two effects

Lengths like UltraFeedback's: prompts uniform in [100, 400] tokens, responses log-normal (median 250
tokens) clipped to [50, 700]; every method sees the same batches.

--arch: the small Llama (default), or a hybrid of the same size class whose layers alternate between
its sequence mixer and full attention: lfm2 (short convolutions), qwen3_5_text (gated delta nets),
jamba (Mamba scans, a dense MLP). Packed methods prepare a hybrid as ``wrpo train`` does
(wrpo.model.layout.prepare_layout: attention on wrpo_segments, the conv / recurrent layers hooked to run one
sequence at a time, wrpo/model/mixers.py; packed-mask-fused: those hooks, the attention left on sdpa with the
block mask); padded methods run its own sdpa attention with the attention mask.

Throughput: real (non-padding) tokens of one round over all batches divided by its time; the median
of --rounds rounds, methods interleaved round by round (order rotated each round). Memory: CPU: peak
RSS rise of one step on the longest batch in a fresh process per method (after a warm-up step has
allocated the optimizer state); CUDA: max allocated above the model, gradients and optimizer state.

    python benchmarks/bench_train_step.py --out "benchmarks/results/train_step_{device}.json"
    python benchmarks/bench_train_step.py --arch lfm2 --out benchmarks/results/  # train_step_lfm2_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import Rounds, interleaved, memory_in_child, paired_ratios, peak_memory_mb
from plots import bar_plot
from records import machine, write_json
from transformers import AutoModelForCausalLM, JambaConfig, Lfm2Config, LlamaConfig, Qwen3_5TextConfig

import wrpo_kernels as wk
from wrpo import preference_loss
from wrpo.data.collate import IGNORE_INDEX, pack_groups, pack_shared_prefix, pad_groups
from wrpo.model.attention import NAME as SEGMENT_ATTENTION
from wrpo.model.body import varlen_attention
from wrpo.model.capabilities import read_capabilities
from wrpo.model.layout import plan_layout, prepare_layout
from wrpo.model.masks import block_causal_mask

METHODS = (
    "padded-naive",
    "packed-naive",
    "padded-fused",
    "packed-mask-fused",
    "packed-fused",
    "packed-shared-fused",
)
# (prompt range, response range or None for the lognormal of median 250 clipped to [50, 700])
PROFILES = {
    "ultrafeedback": ((100, 400), None),
    "prompt-heavy": ((800, 1200), (50, 200)),
    "response-heavy": ((20, 60), (400, 800)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
K, NUM_CHOSEN, PAD_ID = 3, 2, 0
HYBRIDS = {"lfm2": "conv", "qwen3_5_text": "linear_attention", "jamba": "mamba"}  # arch -> its sequence mixer
ARCHS = ("llama", *HYBRIDS)


def make_batches(args) -> list[list[dict]]:
    """``args.batches`` batches of ``args.B`` groups: prompt ids, K response ids, reference log-probs."""
    g = torch.Generator().manual_seed(args.seed)

    def tokens(n):
        return torch.randint(1, args.V, (n,), generator=g).tolist()

    (p_lo, p_hi), response_range = PROFILES[args.profile]

    def response_length():
        if response_range is not None:
            return int(torch.randint(response_range[0], response_range[1] + 1, (1,), generator=g))
        n = 250 * torch.exp(0.6 * torch.randn(1, generator=g)).item()
        return int(min(max(n, 50), 700))

    batches = []
    for _ in range(args.batches):
        groups = []
        for _ in range(args.B):
            prompt = tokens(int(torch.randint(p_lo, p_hi + 1, (1,), generator=g)))
            responses = [tokens(response_length()) for _ in range(K)]
            ref = [-len(r) * 10.4 + torch.randn(1, generator=g).item() for r in responses]
            groups.append(
                {"prompt_ids": prompt, "responses": responses, "num_chosen": NUM_CHOSEN, "ref_logps": ref}
            )
        batches.append(groups)
    return batches


def real_tokens(groups) -> int:
    return sum(len(g["prompt_ids"]) + len(r) for g in groups for r in g["responses"])


def model_config(args):
    """The config of ``args.arch``: hidden H, heads of 64, a SwiGLU of 8H/3; a hybrid's layers alternate
    between its sequence mixer (first) and full attention, its linear-attention heads sized like those."""
    H, heads, n = args.H, args.H // 64, args.layers
    common = {
        "vocab_size": args.V,
        "hidden_size": H,
        "intermediate_size": H * 8 // 3,
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "pad_token_id": PAD_ID,
    }
    layer_types = [HYBRIDS.get(args.arch) if i % 2 == 0 else "full_attention" for i in range(n)]
    if args.arch == "lfm2":
        return Lfm2Config(**common, layer_types=layer_types, block_auto_adjust_ff_dim=False)
    if args.arch == "qwen3_5_text":
        return Qwen3_5TextConfig(
            **common,
            head_dim=64,
            layer_types=layer_types,
            linear_num_key_heads=heads,
            linear_num_value_heads=heads,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
        )
    if args.arch == "jamba":  # Mamba on even layers, attention on odd ones, one expert: a dense MLP
        mamba = {"num_experts": 1, "mamba_dt_rank": max(1, H // 16)}
        return JambaConfig(**common, attn_layer_period=2, attn_layer_offset=1, **mamba)
    return LlamaConfig(**common)


def build_model(args, varlen: bool):
    """The model of ``args.arch``; ``varlen``: attention separates packed sequences (no block mask
    needed). A hybrid comes back on its own sdpa attention: :func:`build` prepares it for packed rows."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(args)).to(args.device, DTYPES[args.dtype])
    if args.arch != "llama":
        return model
    if varlen:
        model.set_attn_implementation(
            "flash_attention_2" if args.device == "cuda" and _has_flash_attn() else SEGMENT_ATTENTION
        )
    return model


def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _to(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fused_loss(model, batch):
    """Body without its head -> the fused loss, inside the model call (``wrpo.preference_loss``)."""
    return preference_loss(
        model, batch, responses_per_prompt=K, num_chosen=NUM_CHOSEN, alpha=0.1, beta=0.1
    ).loss


def naive_loss(model, batch):
    """The model's full logits -> log_softmax -> gather -> per-sequence sums -> wrpo_kernels.wrpo_loss."""
    labels = batch["labels"]
    if "cu_seqlens" in batch:
        mask = None if varlen_attention(model) else block_causal_mask(batch["position_ids"], model.dtype)
        inputs = {"position_ids": batch["position_ids"], "attention_mask": mask}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
    valid = labels != IGNORE_INDEX
    tok = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
    if "cu_seqlens" in batch:
        cu = batch["cu_seqlens"]
        seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu.diff())
        logps = torch.zeros(len(cu) - 1, device=tok.device).index_add_(0, seq, tok.reshape(-1))
        lengths = torch.zeros_like(logps).index_add_(0, seq, valid.reshape(-1).float())
    else:
        logps, lengths = tok.sum(-1), valid.sum(-1).float()
    B = logps.numel() // K
    weights = {"num_chosen": NUM_CHOSEN, "alpha": 0.1, "beta": 0.1}
    return wk.wrpo_loss(logps.view(B, K), batch["ref_logps"], lengths.view(B, K), **weights)[0]


def build(method, args):
    """-> step(groups): one forward + backward + AdamW step of ``method`` on a batch of groups."""
    layout, *variant, loss_kind = method.split("-")
    model = build_model(args, varlen=layout == "packed" and "mask" not in variant)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    loss_fn = fused_loss if loss_kind == "fused" else naive_loss
    plan = None
    if layout == "packed" and args.arch != "llama":
        plan = plan_layout(read_capabilities(model), packing=True, prefix_sharing="shared" in variant)
        if "mask" in variant:  # no attention switch: sdpa and a block mask, the sequence mixers still hooked
            plan = dataclasses.replace(plan, attention=None)
        prepare_layout(plan, model)

    def collate(groups):
        if layout == "padded":
            return _to(pad_groups(groups, PAD_ID), args.device)
        if plan is not None:  # a hybrid: the collator of its plan, as ``wrpo train``
            return _to(plan.collator(PAD_ID)(groups), args.device)
        if "shared" in variant:  # each prompt once for its K responses
            return _to(pack_shared_prefix(groups, pad_token_id=PAD_ID), args.device)
        return _to(
            pack_groups(groups, row_per_group=not varlen_attention(model), pad_token_id=PAD_ID), args.device
        )

    def step(groups):
        loss = loss_fn(model, collate(groups))
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_methods(args, batches) -> Rounds:
    """A warm-up step per method (allocator, optimizer state, lazy init), then ``args.rounds`` rounds
    over all batches, interleaved (harness.py)."""
    steps = {m: build(m, args) for m in args.methods}
    for m in args.methods:
        steps[m](batches[0])

    def one_round(step):
        return lambda: [step(groups) for groups in batches]

    rounds = interleaved({m: one_round(steps[m]) for m in args.methods}, args.rounds, args.device)
    if rounds.errors:
        raise RuntimeError(f"a method failed: {rounds.errors}")
    return rounds


def step_memory_mb(method, args, batches) -> float:
    """Peak memory of one step on the longest batch, after a warm-up step allocated the optimizer state."""
    step = build(method, args)
    step(batches[0])
    longest = max(batches, key=real_tokens)
    return peak_memory_mb(lambda: step(longest), args.device)


def memory_mb(method, args) -> float:
    """:func:`step_memory_mb` in a fresh process on the CPU (in this one on CUDA)."""
    if args.device == "cuda":
        return step_memory_mb(method, args, make_batches(args))
    return memory_in_child([sys.executable, __file__, "--memory-child", method, *args.shape_argv], method)


def run(args) -> list[dict]:
    batches = make_batches(args)
    tokens = sum(real_tokens(b) for b in batches)
    padded = sum(
        K * len(b) * max(len(g["prompt_ids"]) + len(r) for g in b for r in g["responses"]) for b in batches
    )
    rounds = time_methods(args, batches)
    results = []
    for m in args.methods:
        med = statistics.median(rounds.wall[m])
        # process CPU seconds too: on a shared machine other jobs stretch the wall time, less the CPU time
        row = {
            "method": m,
            "round_times_s": rounds.wall[m],
            "median_round_s": med,
            "round_cpu_s": rounds.cpu[m],
            "median_round_cpu_s": statistics.median(rounds.cpu[m]),
            "tokens_per_s": tokens / med,
            "peak_mem_mb": memory_mb(m, args),
        }
        results.append(row)
    base = next((r for r in results if r["method"] == "padded-naive"), None)
    unshared = next((r for r in results if r["method"] == "packed-fused"), None)
    for r in results:
        r["speedup_vs_padded_naive"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["mem_vs_padded_naive"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base else None
        r["speedup_vs_packed_fused"] = r["tokens_per_s"] / unshared["tokens_per_s"] if unshared else None
        # per round: the same batches, side by side
        if unshared:
            r["round_ratios_vs_packed_fused"] = paired_ratios(unshared["round_times_s"], r["round_times_s"])
            r["cpu_speedup_vs_packed_fused"] = unshared["median_round_cpu_s"] / r["median_round_cpu_s"]
    args.tokens, args.padding_fraction = tokens, 1 - tokens / padded
    return results


def print_table(results, args):
    print(f"device: {machine(args.device)['device']}; model {describe(args)}; {args.dtype}")
    batch = f"{args.batches} batches x {args.B} prompts x {K} responses"
    padding = f"padded: +{100 * args.padding_fraction:.0f}%"
    print(f"{batch}, {args.tokens} real tokens per round ({padding}); median of {args.rounds} rounds")
    print(
        f"{'method':<20}{'tokens/s':>10}{'round s':>9}{'peak MiB':>10}{'speed-up':>10}{'mem ratio':>11}"
        f"{'vs packed-fused':>17}{'(CPU time)':>12}"
    )
    for r in results:
        su = f"{r['speedup_vs_padded_naive']:.2f}x" if r["speedup_vs_padded_naive"] else "-"
        mr = f"{r['mem_vs_padded_naive']:.2f}" if r["mem_vs_padded_naive"] else "-"
        vs = f"{r['speedup_vs_packed_fused']:.2f}x" if r["speedup_vs_packed_fused"] else "-"
        cpu = f"{r['cpu_speedup_vs_packed_fused']:.2f}x" if r.get("cpu_speedup_vs_packed_fused") else "-"
        print(
            f"{r['method']:<20}{r['tokens_per_s']:>10.0f}{r['median_round_s']:>9.2f}{r['peak_mem_mb']:>10.0f}"
            f"{su:>10}{mr:>11}{vs:>17}{cpu:>12}"
        )


def profile_text(profile: str) -> str:
    (p_lo, p_hi), response_range = PROFILES[profile]
    if response_range is None:
        responses = "lognormal(median 250, sigma 0.6) clipped [50, 700]"
    else:
        responses = f"U[{response_range[0]}, {response_range[1]}]"
    return f"prompts U[{p_lo}, {p_hi}]; responses {responses}"


def describe(args) -> str:
    if args.arch == "llama":
        return f"Llama H={args.H} layers={args.layers} V={args.V}"
    return f"{args.arch} H={args.H} layers={args.layers} ({HYBRIDS[args.arch]}/attention) V={args.V}"


def plot(results, path, title):
    panels = [
        ("tokens_per_s", "train-step tokens/s (higher is better)"),
        ("peak_mem_mb", "peak memory of a step (MiB)"),
    ]
    bar_plot(results, path, title, panels, highlight=lambda m: m in ("packed-fused", "packed-shared-fused"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--arch", choices=ARCHS, default="llama", help="the small Llama, or a hybrid (see above)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--H", type=int, default=256, help="hidden size (heads of 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--B", type=int, default=2, help="prompts per batch")
    p.add_argument("--batches", type=int, default=4, help="batches per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=PROFILES, default="ultrafeedback", help="prompt/response lengths")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {METHODS}")
    out_help = (
        "JSON path, {device} and {arch} filled in, or a directory (train_step_{device}.json; a hybrid: "
        "train_step_{arch}_{device}.json); a .png beside it"
    )
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if unknown := set(args.methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    shape = ("device", "arch", "dtype", "H", "layers", "V", "B", "batches", "seed", "profile")
    args.shape_argv = [f"--{k}={getattr(args, k)}" for k in shape]
    return args


def out_path(args) -> Path:
    """--out with {device} and {arch} filled in; a directory gets the default name."""
    if args.out.endswith(os.sep) or Path(args.out).is_dir():
        name = "train_step_{device}.json" if args.arch == "llama" else "train_step_{arch}_{device}.json"
        return Path(args.out, name.format(device=args.device, arch=args.arch))
    return Path(args.out.format(device=args.device, arch=args.arch))


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        print(step_memory_mb(args.memory_child, args, make_batches(args)))
        return
    results = run(args)
    print_table(results, args)
    if args.out:
        out = out_path(args)
        record = {
            "machine": machine(args.device),
            "model": describe(args),
            **({} if args.arch == "llama" else {"arch": args.arch}),
            "dtype": args.dtype,
            "batch": {"prompts": args.B, "responses_per_prompt": K, "batches_per_round": args.batches},
            "profile": args.profile,
            "lengths": profile_text(args.profile),
            "real_tokens_per_round": args.tokens,
            "padding_fraction": args.padding_fraction,
            "rounds": args.rounds,
            "ref_logps": "precomputed",
            "date": time.strftime("%Y-%m-%d"),
            "results": results,
        }
        write_json(out, record)
        plot(
            results, out.with_suffix(".png"), f"{record['machine']['device']} | {describe(args)} {args.dtype}"
        )
        print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
