"""Tensor parallel, a vocabulary-sharded LM head, on CPU processes over gloo (test_tensor_parallel.py).

:func:`run_tp` (or ``python tp_step.py OUT_DIR``) spawns the :data:`TP` ranks once; they run every case
in turn and rank 0 writes ``OUT_DIR/<name>.pt``:

- :data:`MODEL_CASES`: a tiny fp64 Llama whose ``lm_head`` is ``ColwiseParallel`` (its weight a DTensor
  placed ``Shard(0)``), the same global batch on every rank, through ``wrpo.preference_loss``,
  ``wrpo.sequence_logps`` (no_grad) and ``wrpo.sft_loss``; the vocabulary (41) does not divide evenly.
- :data:`FUNCTIONAL`: ``wrpo_kernels``' functions given ``distribute_tensor(weight, mesh, [Shard(0)])``
  (and a bias alike), fp64 on the torch backend and fp32 on the Triton one (the interpreter on CPU).
- :func:`refusals`: what is refused, and how; :func:`untied_by_colwise`: what a tied model becomes.
- :func:`communication`: every collective of a fused loss call (forward and backward), for two vocabularies.

:func:`run_mesh` spawns 4 ranks on a 2 x 2 ("dp", "tp") mesh: ``ColwiseParallel`` on the head over "tp",
then FSDP2 (``fully_shard`` per decoder layer and the root) over "dp"; each dp rank takes its half of the
global batch (the same on both tp ranks) and divides by the global counts over the dp world.

The single-process results come from the same functions called with ``mesh=None`` (the test process).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# Triton reads this when its kernels are defined: set before wrpo_kernels is imported (in the ranks too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import wrpo.model.attention  # noqa: E402, F401  (registers attn_implementation="wrpo_segments")
import wrpo_kernels as wk  # noqa: E402
from wrpo import batch_counts, pack_groups, pad_groups, preference_loss, sequence_logps, sft_loss  # noqa: E402
from wrpo.data.collate import pack_shared_prefix  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fsdp_step, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
import fsdp_step  # noqa: E402
from fsdp_step import finish_rank, free_port, join_gloo, spawn  # noqa: E402
from helpers import make_batch  # noqa: E402

GROUPS, K, VOCAB, TP, DP = 4, 3, 41, 2, 2
OPTIONS = {"beta": 0.3, "alpha": 0.2, "nll_weight": 0.2, "backend": "torch"}

# name -> (layout, attention, tied embeddings)
MODEL_CASES = {
    "padded": ("padded", "sdpa", False),
    "rows": ("rows", "sdpa", False),
    "shared": ("shared", "wrpo_segments", False),
    "padded_tied": ("padded", "sdpa", True),
}
MESH_CASES = ("padded", "rows", "shared")

# name -> (call, options, chunk_tokens, bias, backend): a batch of 3 groups of 3 responses (6, 7 and 14
# labelled rows of 12, 10 and 21), H = 6, V = 41. chunk_tokens 4 cuts every group into row tiles (the
# fused loss's two-pass path), 16 takes whole groups (two chunks), None all in one chunk.
FUNCTIONAL = {
    "dpo": ("fused", {}, None, True, "torch"),
    "dpo_cut": ("fused", {}, 4, True, "torch"),
    "dpo_no_bias_groups": ("fused", {}, 16, False, "torch"),
    "simpo_mean": (
        "fused",
        {"loss_type": "simpo", "nll_weight": 0.3, "logp_reduction": "mean"},
        16,
        True,
        "torch",
    ),
    "ipo_counts": (
        "fused",
        {"loss_type": "ipo", "num_groups": 5, "num_nll_tokens": 7, "nll_weight": 0.1},
        4,
        True,
        "torch",
    ),
    "softcap_temperature": ("fused", {"softcap": 2.0, "temperature": 0.7}, None, True, "torch"),
    "softcap_temperature_cut": ("fused", {"softcap": 2.0, "temperature": 0.7}, 4, True, "torch"),
    "smoothing_gamma": ("fused", {"label_smoothing": 0.1, "gamma": 0.2}, 16, True, "torch"),
    "logprobs": ("logprobs", {}, 3, True, "torch"),
    "logprobs_tokens_softcap": ("logprobs", {"reduction": "none", "softcap": 3.0}, None, True, "torch"),
    "logprobs_no_grad": ("logprobs_no_grad", {}, None, True, "torch"),
    "logprobs_no_grad_mean": ("logprobs_no_grad", {"reduction": "mean"}, 5, False, "torch"),
    "nll": ("nll", {}, None, True, "torch"),
    "nll_cut_softcap": ("nll", {"softcap": 2.0, "num_tokens": 11}, 4, False, "torch"),
    "triton_dpo": ("fused", {"nll_weight": 0.2}, None, True, "triton"),
    "triton_softcap_cut": ("fused", {"softcap": 2.0, "temperature": 0.7}, 4, True, "triton"),
    "triton_logprobs": ("logprobs", {}, 3, True, "triton"),
    "triton_logprobs_no_grad": ("logprobs_no_grad", {}, None, True, "triton"),
    "triton_nll": ("nll", {}, 4, True, "triton"),
}

COMM_VOCABS = (41, 4001)  # the same tokens (labels < 41) and chunk_tokens, two vocabularies
COMM_CHUNKS = (4, 16)


def triton_available() -> bool:
    from wrpo_kernels.api import triton_unavailable_reason

    return triton_unavailable_reason(torch.device("cpu")) is None


def full(t):
    """A DTensor gathered whole; a plain tensor (or None) as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---------------------------------------------------------------------------------------------- model


def build_model(attn: str, tied: bool) -> LlamaForCausalLM:
    return fsdp_step.build_model(attn, tied, vocab=VOCAB)


def is_tied(model) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def parallelize(model, mesh, tied: bool):
    """``lm_head`` ColwiseParallel over ``mesh``; a tied model's embedding RowwiseParallel (its weight
    also ``Shard(0)``: the same rows) and the tie made again, since ``parallelize_module`` registers new
    parameters (:func:`untied_by_colwise`)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"lm_head": ColwiseParallel()}
    if tied:  # token ids are replicated inputs, not a Shard(-1) activation
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate())
    parallelize_module(model, mesh, plan)
    if tied:
        model.tie_weights()
        if not is_tied(model):
            raise AssertionError("tie_weights() did not tie the parallel head to the embedding")
    return model


def global_groups() -> list[dict]:
    """Tokens over the whole vocabulary (the labels reach both ranks' rows)."""
    return fsdp_step.global_groups(vocab=VOCAB)


def collate(groups: list[dict], layout: str) -> dict:
    if layout == "padded":
        return pad_groups(groups, pad_token_id=0)
    if layout == "shared":
        return pack_shared_prefix(groups, pad_token_id=0)
    return pack_groups(groups, row_per_group=layout == "rows", pad_token_id=0)


def grads_of(model) -> dict:
    return {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def model_case(case: str, mesh=None) -> dict:
    """preference_loss (fwd + bwd), sequence_logps under no_grad and sft_loss (fwd + bwd) of the global
    batch; ``mesh``: the head made ColwiseParallel over it (every rank the whole batch)."""
    layout, attn, tied = MODEL_CASES[case]
    model = build_model(attn, tied)
    if mesh is not None:
        parallelize(model, mesh, tied)
    batch = collate(global_groups(), layout)
    out = preference_loss(model, batch, ref_logps=batch["ref_logps"].double(), **OPTIONS)
    out.loss.backward()
    weight = model.lm_head.weight
    result = {
        "loss": out.loss.detach(),
        "logps": out.logps,
        "metrics": {k: v.detach() for k, v in out.metrics.items()},
        "grads": grads_of(model),
        "tied": is_tied(model),
        "weight": (type(weight).__name__, str(getattr(weight, "placements", None))),
        "weight_grad": (type(weight.grad).__name__, str(getattr(weight.grad, "placements", None))),
    }
    with torch.no_grad():
        result["sequence_logps"] = sequence_logps(model, batch, backend="torch")
    model.zero_grad(set_to_none=True)
    loss, logps = sft_loss(model, batch, backend="torch")
    loss.backward()
    result.update(sft_loss=loss.detach(), sft_logps=logps, sft_grads=grads_of(model))
    return result


def untied_by_colwise(mesh) -> dict:
    """A tied model (tie_word_embeddings=True) with only ``lm_head`` ColwiseParallel: torch's
    ``parallelize_module`` registers a new (DTensor) parameter on the head, the embedding keeps the
    old one. What the model looks like then, and the error ``preference_loss`` raises."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    model = build_model("sdpa", True)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    batch = collate(global_groups(), "padded")
    try:
        preference_loss(model, batch, ref_logps=batch["ref_logps"].double(), **OPTIONS)
        error = None
    except ValueError as e:
        error = (type(e).__name__, str(e))
    return {
        "tied": is_tied(model),
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "embed": type(model.model.embed_tokens.weight).__name__,
        "head": type(model.lm_head.weight).__name__,
        "error": error,
    }


# ----------------------------------------------------------------------------------------- functional


def functional_batch(vocab: int = VOCAB):
    batch = make_batch(B=3, K=3, H=6, V=VOCAB, seed=1, ignore_frac=0.2, with_bias=True)
    if vocab != VOCAB:  # the same tokens (labels < VOCAB), a wider head
        g = torch.Generator().manual_seed(2)
        batch.weight = torch.randn(vocab, batch.H, generator=g, dtype=torch.float64) * (1.5 / batch.H**0.5)
        batch.bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5
    return batch


def functional_case(name: str, mesh=None, *, reference: bool = False, vocab: int = VOCAB) -> dict:
    """One :data:`FUNCTIONAL` call (and its backward). ``mesh``: weight and bias distributed ``Shard(0)``
    over it. ``reference``: the torch backend in fp64 whatever the case says (the Triton cases' reference).
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    call, opts, chunk, with_bias, backend = FUNCTIONAL[name]
    dtype = torch.float32 if backend == "triton" else torch.float64
    if reference:
        backend, dtype = "torch", torch.float64
    batch = functional_batch(vocab)
    grad = call != "logprobs_no_grad"
    h, w, b = batch.params(dtype, requires_grad=grad)
    if not with_bias:
        b = None
    if mesh is not None:
        w = distribute_tensor(w.detach(), mesh, [Shard(0)]).requires_grad_(grad)
        if b is not None:
            b = distribute_tensor(b.detach(), mesh, [Shard(0)]).requires_grad_(grad)
    kw = {"bias": b, "backend": backend, "chunk_tokens": chunk, **opts}
    args = (h, w, batch.labels, batch.cu_seqlens)
    out = {}
    if call == "fused":
        res = wk.fused_linear_wrpo_loss(*args, ref_logps=batch.ref_logps, **kw)
        res.loss.backward()
        out.update(
            loss=res.loss.detach(), logps=res.logps, metrics={k: v.detach() for k, v in res.metrics.items()}
        )
    elif call == "nll":
        loss, logps = wk.fused_linear_nll_loss(*args, **kw)
        loss.backward()
        out.update(loss=loss.detach(), logps=logps)
    else:
        with torch.set_grad_enabled(grad):
            logps = wk.linear_logprobs(*args, **kw)
        if grad:  # a weighted sum: every sequence's (or token's) gradient differs
            (
                logps * torch.linspace(0.5, 1.5, logps.numel(), dtype=logps.dtype).view_as(logps)
            ).sum().backward()
        out.update(logps=logps.detach(), requires_grad=logps.requires_grad)
    if grad:
        out.update(dX=h.grad, dW=full(w.grad), db=full(None if b is None else b.grad))
        out["dW_type"] = (type(w.grad).__name__, str(getattr(w.grad, "placements", None)))
    return out


def refusals(mesh, rank: int) -> dict:
    """name -> (exception type, message) or None: calls that must be refused on every rank alike."""
    from torch.distributed.tensor import Shard, distribute_tensor

    batch = functional_batch()
    h, w, b = batch.params()
    row = distribute_tensor(w.detach(), mesh, [Shard(0)])
    labels = batch.labels.clone()
    if rank == 1:  # another batch on this rank: the same rows and bounds, other tokens
        labels[labels >= 0] = (labels[labels >= 0] + 1) % VOCAB
    fsdp_head, fsdp_batch = fsdp_head_outside_forward(mesh, rank)
    calls = {
        "shard1": lambda: wk.fused_linear_wrpo_loss(
            h,
            distribute_tensor(w.detach(), mesh, [Shard(1)]),
            batch.labels,
            batch.cu_seqlens,
            ref_logps=batch.ref_logps,
            backend="torch",
        ),
        "different_labels": lambda: wk.fused_linear_wrpo_loss(
            h, row, labels, batch.cu_seqlens, ref_logps=batch.ref_logps, backend="torch"
        ),
        "different_labels_logprobs": lambda: wk.linear_logprobs(
            h, row, labels, batch.cu_seqlens, backend="torch"
        ),
        "fsdp_outside_forward": lambda: wk.fused_linear_wrpo_loss(
            torch.randn(fsdp_batch["labels"].numel(), fsdp_head.shape[1], dtype=torch.float64),
            fsdp_head,
            fsdp_batch["labels"].reshape(-1),
            fsdp_batch["cu_seqlens"],
            ref_logps=fsdp_batch["ref_logps"].double(),
            backend="torch",
        ),
        "reference": lambda: wk.fused_linear_wrpo_loss(
            h, row, batch.labels, batch.cu_seqlens, ref_logps=batch.ref_logps, backend="reference"
        ),
        "bias_not_sharded": lambda: wk.fused_linear_wrpo_loss(
            h, row, batch.labels, batch.cu_seqlens, bias=b, ref_logps=batch.ref_logps, backend="torch"
        ),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except Exception as e:  # the parent checks the type and the message
            out[name] = (type(e).__name__, str(e))
    out["fsdp_placements"] = str(fsdp_head.placements)
    return out


def fsdp_head_outside_forward(mesh, rank: int):
    """FSDP2's head weight outside the forward (a data-parallel ``Shard(0)``) and this rank's half of
    the groups: the loss given them directly sees another batch on each rank."""
    from torch.distributed.fsdp import fully_shard

    model = build_model("sdpa", False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    share = GROUPS // TP
    return model.lm_head.weight, pack_groups(global_groups()[rank * share : (rank + 1) * share])


# ------------------------------------------------------------------------------------- communication


class CollectiveLog:
    """Wraps ``torch.distributed.all_reduce`` / ``all_gather`` (what wrpo_kernels.vocab_parallel calls,
    its ``all_reduce`` included) and records each call: (what called it, op, shape, dtype, bytes)."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __enter__(self):
        self.saved = dist.all_reduce, dist.all_gather
        real_reduce, real_gather = self.saved

        def caller():
            frame = sys._getframe(2)
            name = frame.f_code.co_name
            if name == "all_reduce" and frame.f_globals.get("__name__") == "wrpo_kernels.vocab_parallel":
                name = "vocab_parallel.all_reduce<-" + sys._getframe(3).f_code.co_name
            return name

        def all_reduce(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append(
                (caller(), str(op).split(".")[-1], tuple(t.shape), str(t.dtype), t.numel() * t.element_size())
            )
            return real_reduce(t, op=op, group=group, async_op=async_op)

        def all_gather(out, t, group=None, async_op=False):
            nbytes = t.numel() * t.element_size() * len(out)
            self.calls.append((caller(), "ALL_GATHER", tuple(t.shape), str(t.dtype), nbytes))
            return real_gather(out, t, group=group, async_op=async_op)

        dist.all_reduce, dist.all_gather = all_reduce, all_gather
        return self

    def __exit__(self, *exc):
        dist.all_reduce, dist.all_gather = self.saved


def communication(mesh) -> dict:
    """(vocab, chunk_tokens) -> every collective of one fused loss call, forward then backward."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}
    for vocab in COMM_VOCABS:
        for chunk in COMM_CHUNKS:
            batch = functional_batch(vocab)
            h, w, b = batch.params()
            w = distribute_tensor(w.detach(), mesh, [Shard(0)]).requires_grad_(True)
            b = distribute_tensor(b.detach(), mesh, [Shard(0)]).requires_grad_(True)
            with CollectiveLog() as fwd:
                res = wk.fused_linear_wrpo_loss(
                    h,
                    w,
                    batch.labels,
                    batch.cu_seqlens,
                    bias=b,
                    ref_logps=batch.ref_logps,
                    backend="torch",
                    chunk_tokens=chunk,
                )
            with CollectiveLog() as bwd:
                res.loss.backward()
            out[(vocab, chunk)] = {
                "forward": fwd.calls,
                "backward": bwd.calls,
                "local_rows": w.to_local().shape[0],
            }
    return out


# ----------------------------------------------------------------------------------------------- ranks


def rank_main(rank: int, cases, world: int, port: int, out_dir: str) -> None:
    """Joins the gloo group, runs ``cases(rank)`` and rank 0 writes its results ``OUT_DIR/<name>.pt``."""
    join_gloo(rank, world, port)
    finish_rank(rank, lambda: cases(rank), out_dir)


def tp_cases(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    results = {f"model_{case}": model_case(case, mesh) for case in MODEL_CASES}
    triton = triton_available()
    results.update(
        {
            f"functional_{name}": functional_case(name, mesh)
            for name, spec in FUNCTIONAL.items()
            if spec[4] != "triton" or triton
        }
    )
    results["untied"] = untied_by_colwise(mesh)
    results["refusals"] = refusals(mesh, rank)
    results["communication"] = communication(mesh)
    return results


def mesh_case(case: str, mesh=None) -> dict:
    """preference_loss (fwd + bwd) of the global batch: ``mesh`` None, one plain process; else the
    2 x 2 (dp, tp) mesh, this dp rank's half of the groups, divided by the global counts / dp world."""
    layout, attn, _ = MODEL_CASES[case]
    model = build_model(attn, False)
    groups, counts = global_groups(), batch_counts(collate(global_groups(), layout))
    norms = {"num_groups": counts[0], "num_nll_tokens": counts[1]}
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        parallelize(model, mesh["tp"], False)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp, share = mesh["dp"].get_local_rank(), GROUPS // DP
        groups = groups[dp * share : (dp + 1) * share]
        norms = {k: v / DP for k, v in norms.items()}
    batch = collate(groups, layout)
    with HeadSeen() as seen:
        out = preference_loss(model, batch, ref_logps=batch["ref_logps"].double(), **OPTIONS, **norms)
    out.loss.backward()
    loss = out.loss.detach().clone()
    weight = model.lm_head.weight
    result = {
        "weight": (type(weight).__name__, str(getattr(weight, "placements", None))),
        "seen": seen.weights,
    }
    if mesh is not None:
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        loss = loss / DP
        result["weight_grad"] = (type(weight.grad).__name__, str(weight.grad.placements))
        result["forward_restored"] = "forward" not in vars(model)
    return {**result, "loss": loss, "grads": grads_of(model)}


class HeadSeen:
    """Records the head weight the fused loss is given (inside the model's forward): its type, placements
    and mesh dimension names, through ``wrpo_kernels.api.vocab_shard``."""

    def __enter__(self):
        import wrpo_kernels.api as api

        self.weights, self.real = [], api.vocab_shard

        def vocab_shard(weight, bias):
            mesh = getattr(weight, "device_mesh", None)
            self.weights.append(
                (
                    type(weight).__name__,
                    str(getattr(weight, "placements", None)),
                    None if mesh is None else mesh.mesh_dim_names,
                )
            )
            return self.real(weight, bias)

        api.vocab_shard = vocab_shard
        return self

    def __exit__(self, *exc):
        import wrpo_kernels.api as api

        api.vocab_shard = self.real


def mesh_control(mesh) -> dict:
    """The FSDP2 x TP head weight outside the forward (sharded over dp and tp) given to the fused loss."""
    model = build_model("sdpa", False)
    from torch.distributed.fsdp import fully_shard

    parallelize(model, mesh["tp"], False)
    fully_shard(model, mesh=mesh["dp"])
    weight = model.lm_head.weight
    batch = pack_groups(global_groups())
    hidden = torch.randn(batch["labels"].numel(), weight.shape[1], dtype=torch.float64)
    try:
        wk.fused_linear_wrpo_loss(
            hidden,
            weight,
            batch["labels"].reshape(-1),
            batch["cu_seqlens"],
            ref_logps=batch["ref_logps"].double(),
            backend="torch",
        )
        error = None
    except Exception as e:
        error = (type(e).__name__, str(e))
    return {"placements": str(weight.placements), "error": error}


def mesh_cases(rank: int) -> dict:
    import logging

    from torch.distributed.device_mesh import init_device_mesh

    # full_tensor() of the 2-D gradients warns that it gathers in two steps: only the test's comparison
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    results = {f"mesh_{case}": mesh_case(case, mesh) for case in MESH_CASES}
    results["mesh_control"] = mesh_control(mesh)
    return results


def run_tp(out_dir, timeout: float = 240.0) -> None:
    """Spawns the :data:`TP` ranks running :func:`tp_cases` (all the TP cases)."""
    spawn(rank_main, (tp_cases, TP, free_port(), str(out_dir)), TP, timeout, "tensor-parallel")


def run_mesh(out_dir, timeout: float = 240.0) -> None:
    """Spawns DP x TP ranks running :func:`mesh_cases` (FSDP2 x TP)."""
    spawn(rank_main, (mesh_cases, DP * TP, free_port(), str(out_dir)), DP * TP, timeout, "FSDP2 x TP")


if __name__ == "__main__":
    run_tp(sys.argv[1])
    run_mesh(sys.argv[1])
