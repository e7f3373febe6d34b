"""The registry of head-loss methods the benchmarks compare: what each one is, and how to build it.

Every method is the fused LM head + preference loss (or a peer's closest equivalent) on the same
packed rows: hidden [N, H], head weight [V, H], labels [N], N = B prompts x K responses x T tokens,
precomputed reference log-probs [B, K]. ``build`` returns one fwd+bwd step ready to time.

  naive-eager      wrpo_kernels.reference: full [N, V] logits, log_softmax, gather (K responses)
  naive-compile    the same under torch.compile (``compile_backend``)
  wrpo-torch       wrpo_kernels backend="torch" (chunked single pass; on CPU its row work runs in the
                   native kernels of csrc/ when they build, see wrpo_kernels.native)
  wrpo-torch-nocsrc  the same with the pure-torch row ops (wrpo_kernels.native.disabled())
  wrpo-triton      wrpo_kernels backend="triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1)
  cce-logps        cut-cross-entropy per-token log-probs, summed per sequence, then wrpo_kernels.wrpo_loss
  trl-chunked      TRL's two-pass chunked head (trl.kernels.ChunkedLogProbFunction) on the labelled
                   rows, summed per sequence, then wrpo_kernels.wrpo_loss
  .../k2           K = 2 (chosen, rejected), since Liger takes pairs only; liger-dpo/k2 is
                   LigerFusedLinearDPOLoss with use_ref_model=False
  gemm-only        not a loss: the head step's three GEMMs alone (logits = X W^T, dX = G W, dW = G^T X,
                   G the logits buffer reused), the machine's GEMM rate at this shape
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch

import wrpo_kernels as wk
from wrpo_kernels import native, reference
from wrpo_kernels.api import triton_unavailable_reason
from wrpo_kernels.objective import make_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = (
    "naive-eager",
    "naive-compile",
    "wrpo-torch",
    "wrpo-torch-nocsrc",
    "wrpo-triton",
    "cce-logps",
    "trl-chunked",
    "naive-eager/k2",
    "wrpo-torch/k2",
    "wrpo-triton/k2",
    "liger-dpo/k2",
)
GEMM = "gemm-only"  # a reference, not a loss: run only when named, never checked, no memory measured
EXTRA_METHODS = (GEMM,)
# Built (and warmed up, which compiles) in this order, so that under a time budget ours come first and
# the slow-compiling peers are the ones left out.
BUILD_ORDER = (
    "wrpo-triton",
    "wrpo-torch",
    GEMM,
    "naive-eager",
    "wrpo-triton/k2",
    "wrpo-torch/k2",
    "naive-eager/k2",
    "wrpo-torch-nocsrc",
    "liger-dpo/k2",
    "cce-logps",
    "trl-chunked",
    "naive-compile",
)
OURS = ("wrpo-torch", "wrpo-triton")
TWO_PASS = {"cce-logps", "trl-chunked"}  # backward recomputes the logits: 8NHV, not 6NHV
# The package each peer needs: (module to import, how to get it)
PEERS = {
    "cce-logps": ("cut_cross_entropy", "cut-cross-entropy"),
    "trl-chunked": ("trl.kernels.chunked_logprob", "trl"),
    "liger-dpo/k2": ("liger_kernel.chunked_loss", "liger-kernel"),
}
# TRL's DPO trainer passes this vocabulary chunk to ChunkedLogProbFunction (trl.trainer.utils)
TRL_CHUNK_SIZE = 32768
ALPHA, BETA = 0.1, 0.1


def unavailable(method: str, opts) -> str | None:
    """Why ``method`` cannot run with ``opts`` (a missing package, the wrong device), or None if it can."""
    dev = torch.device(opts.device)
    if method.startswith("wrpo-triton"):
        if reason := triton_unavailable_reason(dev):
            return reason
        if dev.type == "cpu" and opts.dtype == "bf16":
            return "the Triton interpreter computes bf16 dots wrongly (CPU)"
    if method == "cce-logps" and dev.type != "cuda":
        return "cut-cross-entropy runs on CUDA only"
    if method in PEERS:
        module, package = PEERS[method]
        try:
            importlib.import_module(module)
        except Exception as err:  # not installed, or an install that does not import: skip the peer
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return f"{package} is not importable ({type(err).__name__}: {first})"
    return None


def shape_of(method: str, opts=None) -> tuple[int, int, bool]:
    """(K, num_chosen, reference log-probs used?) of ``method``: K = 2 for the /k2 methods, else
    ``opts.K`` (default 3) with ``opts.num_chosen`` chosen (default K - 1)."""
    if method.endswith("/k2"):
        return 2, 1, method != "liger-dpo/k2"
    K = getattr(opts, "K", None) or 3
    C = getattr(opts, "num_chosen", None) or K - 1
    return K, C, True


def make_inputs(opts, K: int):
    """Packed groups of K responses of T tokens each: hidden [N, H], weight [V, H] (both requiring
    grad), labels [N], cu_seqlens [B K + 1], reference log-probs [B, K]; N = B K T."""
    dev, dt = torch.device(opts.device), DTYPES[opts.dtype]
    # drawn on the GPU there (a CPU draw of a large head is slow), on the CPU elsewhere
    home = dev if dev.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=home).manual_seed(0)
    N = opts.B * K * opts.T
    hidden = torch.randn(N, opts.H, generator=g, device=home).to(dev, dt).requires_grad_()
    weight = torch.randn(opts.V, opts.H, generator=g, device=home) * opts.H**-0.5
    weight = weight.to(dev, dt).requires_grad_()
    labels = torch.randint(0, opts.V, (N,), generator=g, device=home).to(dev)
    labels[opts.T - 1 :: opts.T] = -100  # shifted labels: the last position of a sequence predicts nothing
    cu = torch.arange(0, N + 1, opts.T, device=dev)
    ref = (torch.randn(opts.B, K, generator=g, device=home) - 10.0 * opts.T).to(dev)
    return hidden, weight, labels, cu, ref


class Built(NamedTuple):
    step: Callable  # one fwd+bwd; returns the loss
    grads: Callable  # (dL/dhidden [N, H] in the packed order, dL/dweight [V, H]) of the last step
    clear: Callable  # drops the gradients


_COMPILED: dict = {}


def naive_compiled(K: int, C: int, backend: str) -> Callable:
    """The naive path under torch.compile, one compiled function per (K, C, backend), tensors as
    arguments (so that fresh inputs of the same shape reuse the compiled code)."""
    key = (K, C, backend)
    if key not in _COMPILED:
        spec = make_spec(
            responses_per_prompt=K,
            num_chosen=C,
            alpha=ALPHA,
            chosen_weights=None,
            loss_type="dpo",
            beta=BETA,
            gamma=0.0,
            label_smoothing=0.0,
        )

        def loss(h, w, labels, cu, ref):
            return reference.fused_linear_wrpo_loss(spec, h, w, labels, cu, ref).loss

        _COMPILED[key] = torch.compile(loss, backend=backend)
    return _COMPILED[key]


def sequence_sums(values: torch.Tensor, seq: torch.Tensor, B: int, K: int) -> torch.Tensor:
    """Per-token values [n] summed per sequence (``seq``: each token's sequence index) -> [B, K] fp32."""
    return torch.zeros(B * K, device=values.device).index_add(0, seq, values.float()).view(B, K)


def build(method: str, opts, inputs=None) -> Built:
    """One method, ready to run on ``inputs`` (those of make_inputs; default: fresh ones)."""
    K, C, _ = shape_of(method, opts)
    hidden, weight, labels, cu, ref = inputs if inputs is not None else make_inputs(opts, K)
    if method == GEMM:
        return gemm_only(hidden, weight, opts.gemm_rows)
    kwargs = {"responses_per_prompt": K, "num_chosen": C, "alpha": ALPHA, "ref_logps": ref, "beta": BETA}
    seq = torch.repeat_interleave(torch.arange(opts.B * K, device=hidden.device), opts.T)
    dX = None  # how to read dL/dhidden back in the packed order, when it is not hidden.grad
    if method.startswith("naive-eager"):

        def loss_fn():
            return wk.fused_linear_wrpo_loss(hidden, weight, labels, cu, backend="reference", **kwargs).loss

    elif method == "naive-compile":
        compiled = naive_compiled(K, C, opts.compile_backend)

        def loss_fn():
            return compiled(hidden, weight, labels, cu, ref)

    elif method.startswith(("wrpo-torch", "wrpo-triton")):
        name = method.split("/")[0]
        backend = "triton" if name == "wrpo-triton" else "torch"
        row_ops = native.disabled if name.endswith("-nocsrc") else contextlib.nullcontext

        def loss_fn():
            with row_ops():
                return wk.fused_linear_wrpo_loss(hidden, weight, labels, cu, backend=backend, **kwargs).loss

    elif method == "cce-logps":
        from cut_cross_entropy import linear_cross_entropy

        def loss_fn():
            nll = linear_cross_entropy(hidden, weight, labels, reduction="none")
            logps = sequence_sums(-nll, seq, opts.B, K)
            return wk.wrpo_loss(logps, ref, None, num_chosen=C, alpha=ALPHA, beta=BETA)[0]

    elif method == "trl-chunked":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        # as TRL's fused head does on Triton devices: only the labelled rows reach the head
        keep = labels != -100
        targets, kept_seq = labels[keep], seq[keep]
        trl_args = (1.0, TRL_CHUNK_SIZE, None, 1.0, ("log_probs",))

        def loss_fn():
            per_token = ChunkedLogProbFunction.apply(hidden[keep], weight, None, targets, *trl_args)[0]
            logps = sequence_sums(per_token, kept_seq, opts.B, K)
            return wk.wrpo_loss(logps, ref, None, num_chosen=C, alpha=ALPHA, beta=BETA)[0]

    elif method == "liger-dpo/k2":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger wants [2B, T, H]: all chosen rows first, then all rejected rows.
        order = torch.cat([torch.arange(0, 2 * opts.B, 2), torch.arange(1, 2 * opts.B, 2)])
        back = torch.argsort(order)
        liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=opts.device == "cuda")
        targets = labels.view(2 * opts.B, opts.T)[order]
        h3 = hidden.detach().view(2 * opts.B, opts.T, opts.H)[order].requires_grad_()
        hidden = h3

        def loss_fn():
            out = liger(weight, h3, targets)
            return out[0] if isinstance(out, tuple) else out

        def dX():
            return h3.grad[back].reshape(-1, opts.H)

    else:
        raise ValueError(method)

    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    def grads():
        return (dX() if dX else hidden.grad), weight.grad

    def clear():
        hidden.grad = weight.grad = None

    return Built(step, grads, clear)


def gemm_only(hidden, weight, rows=None) -> Built:
    """The three GEMMs of the head's fwd+bwd alone, into preallocated buffers: per chunk of ``rows``
    rows (default all) logits = X W^T, dX = G W, dW += G^T X, with G the logits buffer itself."""
    X, W = hidden.detach(), weight.detach()
    N = X.shape[0]
    rows = min(rows or N, N)
    logits = torch.empty(rows, W.shape[0], dtype=X.dtype, device=X.device)
    dX, dW = torch.empty_like(X), torch.zeros_like(W)
    bounds = [(a, min(a + rows, N)) for a in range(0, N, rows)]

    def step():
        dW.zero_()
        for a, b in bounds:
            G = logits[: b - a]
            torch.mm(X[a:b], W.t(), out=G)
            torch.mm(G, W, out=dX[a:b])
            dW.addmm_(G.t(), X[a:b])
        return None

    return Built(step, lambda: (dX, dW), lambda: None)
