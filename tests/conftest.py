"""Shared fixtures: a random packed batch of preference groups and error helpers.

``make_batch`` builds S = B*K sequences packed group-major (docs/method.md §2): per group the chosen
responses first (sources, then the target), then the rejected ones. Every sequence gets at least
one label != ignore_index unless ``allow_empty=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

# The Triton backend runs its kernels on CPU tensors through the interpreter when there is no GPU;
# triton reads this when the kernels are defined, so it is set before wrpo_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from wrpo_kernels import fused_linear_wrpo_loss  # noqa: E402

IGNORE = -100

# The tensors here are tiny: intra-op threads only add contention (10-50x slower on a busy 2-core box).
torch.set_num_threads(1)


@dataclass
class Batch:
    """hidden [N, H], weight [V, H], bias [V] | None, labels [N] int64, cu_seqlens [S+1] int64."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    ref_logps: torch.Tensor  # [B, K], fp64, plausible reference log-probs
    B: int
    K: int
    H: int
    V: int

    @property
    def S(self) -> int:
        return self.B * self.K

    @property
    def N(self) -> int:
        return self.hidden.shape[0]

    @property
    def seqlens(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    @property
    def counts(self) -> torch.Tensor:
        """Valid-token count per sequence, [S] int64."""
        seq = torch.repeat_interleave(torch.arange(self.S), self.cu_seqlens[1:] - self.cu_seqlens[:-1])
        return torch.zeros(self.S, dtype=torch.int64).index_add_(0, seq, (self.labels != IGNORE).long())

    def params(self, dtype=None, *, requires_grad=True):
        """Fresh leaf copies (hidden, weight, bias) in ``dtype`` (default: the batch's own)."""
        dtype = dtype or self.hidden.dtype

        def leaf(t):
            if t is None:
                return None
            return t.detach().to(dtype).clone().requires_grad_(requires_grad)

        return leaf(self.hidden), leaf(self.weight), leaf(self.bias)

    def cast(self, dtype: torch.dtype) -> Batch:
        """The same batch with hidden, weight and bias rounded to ``dtype``."""
        return replace(
            self,
            hidden=self.hidden.to(dtype),
            weight=self.weight.to(dtype),
            bias=None if self.bias is None else self.bias.to(dtype),
        )

    def padded(self, pad_value: float = 3.0):
        """[S, T, H] hidden and [S, T] labels, padding rows filled with ``pad_value`` and ignored."""
        T = max(max(self.seqlens), 1)
        hp = torch.full((self.S, T, self.H), pad_value, dtype=self.hidden.dtype)
        lp = torch.full((self.S, T), IGNORE, dtype=torch.int64)
        cu = self.cu_seqlens.tolist()
        for s in range(self.S):
            a, b = cu[s], cu[s + 1]
            hp[s, : b - a] = self.hidden[a:b].detach()
            lp[s, : b - a] = self.labels[a:b]
        return hp, lp


def make_batch(
    B: int = 2,
    K: int = 3,
    H: int = 8,
    V: int = 37,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    min_len: int = 1,
    max_len: int = 6,
    ignore_frac: float = 0.0,
    with_bias: bool = False,
    allow_empty: bool = False,
    lengths: list[int] | None = None,
) -> Batch:
    """A random packed batch of B groups of K responses of ``lengths`` predicted tokens (random in
    [min_len, max_len] unless given); each sequence has one more row, its last, which predicts nothing
    (label ignored), as shifted labels have."""
    g = torch.Generator().manual_seed(seed)
    S = B * K
    if lengths is None:
        lengths = torch.randint(min_len, max_len + 1, (S,), generator=g).tolist()
    assert len(lengths) == S
    N = sum(lengths) + S
    cu = torch.tensor([0, *(torch.tensor(lengths) + 1).cumsum(0).tolist()], dtype=torch.int64)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * (1.5 / H**0.5)
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    if ignore_frac > 0:
        labels[torch.rand(N, generator=g) < ignore_frac] = IGNORE
    labels[cu[1:] - 1] = IGNORE
    if not allow_empty:
        for s in range(S):
            a, b = int(cu[s]), int(cu[s + 1]) - 1
            if b > a and not bool((labels[a:b] != IGNORE).any()):
                labels[a + int(torch.randint(0, b - a, (1,), generator=g))] = int(
                    torch.randint(0, V, (1,), generator=g)
                )
    # reference log-probs in the neighbourhood of what the policy gives: about -log(V) per token
    n = torch.tensor(lengths, dtype=torch.float64).view(B, K)
    ref = -n * torch.log(torch.tensor(float(V))) + torch.randn(B, K, generator=g, dtype=torch.float64) * 2
    return Batch(
        hidden.to(dtype),
        weight.to(dtype),
        None if bias is None else bias.to(dtype),
        labels,
        cu,
        ref,
        B,
        K,
        H,
        V,
    )


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (computed in fp64); absolute error if expected is all 0."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    if diff != diff:  # NaN
        return float("inf")
    return diff / scale if scale > 0 else diff


def rel_norm_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64: the error measure for low-precision comparisons.

    Output roundings to bf16 put the max-abs error at the level of one ulp of the largest entry
    for every implementation; the norm averages that noise out so that ratios of errors are stable.
    """
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    diff, scale = (a - e).norm().item(), e.norm().item()
    if diff != diff:
        return float("inf")
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, tol: float, what: str = "") -> None:
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation any single op made while running ``fn()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def same_size_groups(B, K, seed, min_len=1, max_len=6):
    """Response lengths where every group has the same token total (permutations of group 0's)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(min_len, max_len + 1, (K,), generator=g)
    return [int(x) for _ in range(B) for x in base[torch.randperm(K, generator=g)]]


def group_tokens(batch):
    cu = batch.cu_seqlens.tolist()
    return [cu[(b + 1) * batch.K] - cu[b * batch.K] for b in range(batch.B)]


def resolve_chunk(chunk, batch):
    """'group': exactly one group fits; 'groups': several groups fit; ints are used as they are."""
    if chunk == "group":
        return max(group_tokens(batch))
    if chunk == "groups":
        return 2 * max(group_tokens(batch))
    return chunk


def fused(batch, backend, *, dtype=None, chunk_tokens=None, ref="BK", grad=True, upstream=1.0, **opts):
    """Run the fused loss and backprop ``upstream * loss``; returns a dict of everything to compare."""
    h, w, b = batch.params(dtype, requires_grad=grad)
    ref_logps = None if ref is None else (batch.ref_logps if ref == "BK" else batch.ref_logps.reshape(-1))
    kw = {} if backend == "reference" else {"chunk_tokens": chunk_tokens}
    out = fused_linear_wrpo_loss(
        h, w, batch.labels, batch.cu_seqlens, bias=b, ref_logps=ref_logps, responses_per_prompt=batch.K,
        backend=backend, **opts, **kw,
    )  # fmt: skip
    if grad:
        (out.loss * upstream).backward()
    return {
        "loss": out.loss.detach(),
        "logps": out.logps,
        "metrics": out.metrics,
        "dX": h.grad,
        "dW": w.grad,
        "db": None if b is None else b.grad,
        "out": out,
    }


def check_all_close(ours, ref, tol, label=""):
    for name in ("loss", "logps", "dX", "dW", "db"):
        if ref[name] is None:
            assert ours[name] is None, f"{label} {name}: expected no gradient"
            continue
        assert_rel_close(ours[name], ref[name], tol, f"{label} {name}")
    assert set(ours["metrics"]) == set(ref["metrics"]), label
    for k, v in ref["metrics"].items():
        assert_rel_close(ours["metrics"][k], v, tol, f"{label} metric {k}")
