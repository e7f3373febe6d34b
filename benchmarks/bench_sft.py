"""The SFT loss (mean NLL of the response tokens): its LM head alone, and a training step of a small model.

Head methods (the same packed rows, every sequence's prompt ignored, fwd + bwd):
  naive        full [N, V] logits (F.linear), cross_entropy, autograd
  two-pass     -sum(wrpo_kernels.linear_logprobs) / n, autograd: chunked, the logits recomputed in the
               backward (8NHV) -- what ``wrpo sft`` ran before
  single-pass  wrpo_kernels.fused_linear_nll_loss: chunked, gradients computed in the forward (6NHV)
Step methods (a small Llama, sequences packed into one row, attention per sequence, fwd + bwd + AdamW):
  step-two-pass     wrpo.sequence_logps -> -sum / n (the body once, the head as two-pass)
  step-single-pass  wrpo.sft_loss (the body once, the head as single-pass) -- ``wrpo sft`` now

Time: median of --reps calls per method after a warm-up, methods interleaved, the order rotated every
round; ``round_ratios_vs_two_pass`` pair each round's times. Memory (CPU): peak RSS rise over one call
in a fresh process per method (large allocations forced to mmap). Check: every head method's loss,
dX and dW against the naive path in fp64 on the same inputs.

    python benchmarks/bench_sft.py --out benchmarks/results/sft_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import Rounds, interleaved, memory_in_child, paired_ratios, peak_rss_rise_mb
from plots import bar_plot
from records import machine, write_json
from transformers import LlamaConfig, LlamaForCausalLM

import wrpo_kernels as wk
from wrpo import pack_groups, sequence_logps, sft_loss
from wrpo.model.attention import NAME as SEGMENT_ATTENTION
from wrpo.model.capabilities import read_capabilities
from wrpo.model.layout import plan_layout, prepare_layout

HEAD = ("naive", "two-pass", "single-pass")
STEP = ("step-two-pass", "step-single-pass")
METHODS = HEAD + STEP


def head_inputs(args, dtype=torch.float32):
    """hidden [N, H], weight [V, H], labels [N] (the first ``prompt`` rows of each of the S sequences and
    its last row ignored), cu_seqlens [S+1]."""
    g = torch.Generator().manual_seed(0)
    S, T, N = args.S, args.T, args.S * args.T
    hidden = torch.randn(N, args.H, generator=g).to(dtype)
    weight = (torch.randn(args.V, args.H, generator=g) * args.H**-0.5).to(dtype)
    labels = torch.randint(0, args.V, (N,), generator=g).view(S, T)
    labels[:, : args.prompt] = -100
    labels[:, -1] = -100
    return hidden, weight, labels.reshape(-1), torch.arange(0, N + 1, T)


def head_method(method, args):
    hidden, weight, labels, cu = head_inputs(args)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    n = int((labels != -100).sum())

    def loss_fn():
        if method == "naive":
            return F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum") / n
        if method == "two-pass":
            return -wk.linear_logprobs(hidden, weight, labels, cu, backend="torch").sum() / n
        return wk.fused_linear_nll_loss(hidden, weight, labels, cu, backend="torch")[0]

    def call():
        hidden.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), hidden.grad, weight.grad

    return call


def step_method(method, args):
    torch.manual_seed(0)
    heads = args.model_H // 64
    config = LlamaConfig(
        vocab_size=args.V,
        hidden_size=args.model_H,
        intermediate_size=args.model_H * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    prepare_layout(plan_layout(read_capabilities(model), packing=True, prefix_sharing=False), model)
    assert model.config._attn_implementation == SEGMENT_ATTENTION
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(1, args.V, (n,), generator=g).tolist()

    groups = [
        {"prompt_ids": tokens(args.prompt), "responses": [tokens(args.T - args.prompt)], "num_chosen": 1}
        for _ in range(args.S)
    ]
    batch = pack_groups(groups)
    n = int((batch["labels"] != -100).sum())

    def call():
        if method == "step-two-pass":
            loss = -sequence_logps(model, batch, backend="torch").sum() / n
        else:
            loss = sft_loss(model, batch, backend="torch")[0]
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.detach(), None, None

    return call


def build(method, args):
    return head_method(method, args) if method in HEAD else step_method(method, args)


def check_head(args) -> dict:
    """Relative Frobenius error of each head method's loss, dX and dW against the naive path in fp64."""
    hidden, weight, labels, _ = head_inputs(args)
    h, w = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    n = int((labels != -100).sum())
    (F.cross_entropy(F.linear(h, w), labels, reduction="sum") / n).backward()
    ref = F.cross_entropy(F.linear(h, w), labels, reduction="sum").detach() / n
    out = {}
    for m in HEAD:
        loss, dX, dW = build(m, args)()
        out[m] = {
            name: float((a.double() - b).norm() / b.norm())
            for name, a, b in (("loss", loss, ref), ("dX", dX, h.grad), ("dW", dW, w.grad))
        }
    return out


def time_methods(args) -> Rounds:
    """A warm-up call per method, then ``args.reps`` rounds, interleaved (harness.py)."""
    calls = {m: build(m, args) for m in args.methods}
    for m in args.methods:
        calls[m]()
    rounds = interleaved(calls, args.reps)
    if rounds.errors:
        raise RuntimeError(f"a method failed: {rounds.errors}")
    return rounds


def call_memory_mb(method, args) -> float:
    """Peak RSS rise of one call, after a warm-up call (optimizer state, workspaces)."""
    call = build(method, args)
    call()
    return peak_rss_rise_mb(call)


def memory_mb(method, args) -> float:
    """:func:`call_memory_mb` in a fresh process (in this one with --memory-inproc)."""
    if args.memory_inproc:
        return call_memory_mb(method, args)
    return memory_in_child([sys.executable, __file__, "--memory-child", method, *args.shape_argv], method)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--S", type=int, default=8, help="sequences")
    p.add_argument("--T", type=int, default=256, help="tokens per sequence")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence (not trained)")
    p.add_argument("--H", type=int, default=1024, help="hidden size of the head benchmark")
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--model-H", type=int, default=256, help="hidden size of the step's model (heads of 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=None, help="JSON path (a PNG plot is written next to it)")
    p.add_argument("--memory-inproc", action="store_true", help="measure memory in this process (tests)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    shape = ("S", "T", "prompt", "H", "V", "model-H", "layers")
    args.shape_argv = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in shape]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        print(call_memory_mb(args.memory_child, args))
        return
    check = check_head(args)
    times = time_methods(args).wall
    results = []
    for m in args.methods:
        pair = "two-pass" if m in HEAD else "step-two-pass"
        r = {
            "method": m,
            "times_s": times[m],
            "median_s": statistics.median(times[m]),
            "peak_mem_mb": memory_mb(m, args),
        }
        if pair in times:
            r["round_ratios_vs_two_pass"] = paired_ratios(times[pair], times[m])
            r["median_speedup_vs_two_pass"] = statistics.median(r["round_ratios_vs_two_pass"])
        if m in check:
            r["rel_err_vs_fp64"] = check[m]
        results.append(r)
    labelled = args.S * (args.T - args.prompt - 1)
    shape = (
        f"head: N = {args.S}x{args.T} rows ({labelled} labelled), H = {args.H}, V = {args.V}, fp32; "
        f"step: Llama H = {args.model_H}, {args.layers} layers, same tokens"
    )
    for r in results:
        speed = r.get("median_speedup_vs_two_pass")
        vs = f"  {speed:.2f}x vs two-pass" if speed else ""
        print(f"{r['method']:>17}: {r['median_s'] * 1e3:8.1f} ms  peak {r['peak_mem_mb']:7.1f} MiB{vs}")
    if args.out:
        path = Path(args.out)
        write_json(path, {"shape": shape, "machine": machine("cpu"), "reps": args.reps, "results": results})
        for r in results:
            r["median_ms"] = r["median_s"] * 1e3
        panels = [("median_ms", "median time per call (ms)"), ("peak_mem_mb", "peak RSS rise (MiB)")]
        title = f"SFT loss, CPU ({shape})"
        bar_plot(results, path.with_suffix(".png"), title, panels, lambda name: "single-pass" in name)
        print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
