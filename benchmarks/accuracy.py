"""Accuracy against the fp64 reference: the torch backend and the naive path, side by side.

For each dtype, both run on the same inputs rounded to that dtype; the error of each is measured
against the fp64 reference on the fp64 inputs, as max |x - ref| / max |ref| over the loss, the
[B, K] log-probs, dX, dW and dbias (Liger parity is checked in tests/wrpo_kernels/test_liger_parity.py).

    python benchmarks/accuracy.py --out benchmarks/results/accuracy_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from records import write_json

import wrpo_kernels as wk

CASES = [  # B, K, num_chosen, H, V, loss_type, extra options
    (3, 3, 2, 24, 101, "dpo", {}),
    (2, 4, 3, 17, 257, "simpo", {"gamma": 0.3, "nll_weight": 0.2}),
    (4, 2, 1, 33, 1000, "ipo", {"softcap": 5.0, "temperature": 0.8}),
    (2, 4, 2, 64, 4099, "dpo", {"label_smoothing": 0.1, "softcap": 30.0}),
]
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


def batch(B, K, H, V, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 40, (B * K,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    N = int(cu[-1])
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5
    bias = 0.1 * torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    labels[cu[:-1]] = torch.randint(0, V, (B * K,), generator=g)  # one valid label per sequence at least
    labels[cu[1:] - 1] = -100  # shifted labels: the last position of a sequence predicts nothing
    ref = -lens.view(B, K).double() * torch.log(torch.tensor(float(V))) + torch.randn(B, K, generator=g)
    return hidden, weight, bias, labels, cu, ref


def run(backend, dtype, inputs, opts, chunk_tokens):
    hidden, weight, bias, labels, cu, ref = inputs
    h, w, b = (t.detach().to(dtype).clone().requires_grad_() for t in (hidden, weight, bias))
    kw = {} if backend == "reference" else {"chunk_tokens": chunk_tokens}
    out = wk.fused_linear_wrpo_loss(h, w, labels, cu, ref_logps=ref, bias=b, backend=backend, **opts, **kw)
    out.loss.backward()
    return [out.loss.detach(), out.logps, h.grad, w.grad, b.grad]


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().max() / ref.abs().max()).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    names = ["loss", "logps", "dX", "dW", "dbias"]
    rows = []
    for i, (B, K, C, H, V, loss_type, extra) in enumerate(CASES):
        inputs = batch(B, K, H, V, seed=i)
        opts = dict(responses_per_prompt=K, num_chosen=C, loss_type=loss_type, beta=0.1, alpha=0.3, **extra)
        oracle = run("reference", torch.float64, inputs, opts, None)
        smallest_group = min((inputs[4][(g + 1) * K] - inputs[4][g * K]).item() for g in range(B))
        for dname, dt in DTYPES.items():
            for chunk in (None, max(1, smallest_group // 2)):  # one pass, and the two-pass fallback
                ours = map(rel, run("torch", dt, inputs, opts, chunk), oracle)
                naive = map(rel, run("reference", dt, inputs, opts, None), oracle)
                row = {
                    "case": f"B={B} K={K} C={C} H={H} V={V} {loss_type} {extra}",
                    "dtype": dname,
                    "chunk_tokens": chunk or "default",
                    "ours": dict(zip(names, ours, strict=True)),
                    "naive": dict(zip(names, naive, strict=True)),
                }
                rows.append(row)
    for r in rows:
        worst_ours, worst_naive = max(r["ours"].values()), max(r["naive"].values())
        chunk = str(r["chunk_tokens"])
        print(
            f"{r['dtype']:>5} chunk={chunk:>7}  ours {worst_ours:.1e}  naive {worst_naive:.1e}  {r['case']}"
        )
    fp64 = max(max(r["ours"].values()) for r in rows if r["dtype"] == "fp64")
    print(f"worst fp64 relative error of the torch backend: {fp64:.2e}")
    if args.out:
        record = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows}
        write_json(Path(args.out), record, indent=1)


if __name__ == "__main__":
    main()
