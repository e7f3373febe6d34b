"""A random packed batch of preference groups (``make_batch``) and the chunk budgets the tests use.

``make_batch`` builds S = B*K sequences packed group-major (docs/method.md §2): per group the chosen
responses first (sources, then the target), then the rejected ones. Every sequence gets at least
one label != ignore_index unless ``allow_empty=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE = -100


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


def random_groups(B, K, vocab, *, seed, prompt=(2, 7), response=(1, 6), ref=(3, -20)) -> list[dict]:
    """B preference groups of K token-id responses (K - 1 chosen) for ``wrpo``'s collators: ids in
    [3, vocab), lengths drawn in [lo, hi) of ``prompt`` / ``response``, reference log-probs
    ``randn * ref[0] + ref[1]``, all from one generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [
        {
            "prompt_ids": ids(*prompt),
            "responses": [ids(*response) for _ in range(K)],
            "num_chosen": K - 1,
            "ref_logps": (torch.randn(K, generator=g) * ref[0] + ref[1]).tolist(),
        }
        for _ in range(B)
    ]


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


def preference_inputs(B, K, seed):
    """Plausible per-response log-probs: policy [B, K], ref [B, K] (fp64) and lengths [B, K] (int64)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (B, K), generator=g)
    ref = -lengths * 2.5 + torch.randn(B, K, generator=g, dtype=torch.float64)
    policy = ref + torch.randn(B, K, generator=g, dtype=torch.float64) * 3
    return policy, ref, lengths
