"""Host reads of tensor values during one training step (each one a host sync when the tensors live on
a GPU): the layout the collator records is read, not decoded again from ``position_ids``.

Counted: ``item()`` / ``int()`` / ``bool()`` / ``float()`` of a tensor (``aten::_local_scalar_dense``),
``nonzero`` (its output size depends on the values), ``tolist()`` and ``.cpu()`` calls (a ``.cpu()``
followed by ``.tolist()`` counts twice: an upper bound)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers.tiny_models import LLAMA_2x32, sizes
from torch.utils._python_dispatch import TorchDispatchMode

from wrpo import preference_loss
from wrpo.model.capabilities import read_capabilities
from wrpo.model.layout import plan_layout, prepare_layout

VALUE_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class HostReads(TorchDispatchMode):
    """Counts the aten ops that read tensor values on the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in VALUE_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_host_reads():
    """Yields a counter whose ``count`` is the host reads inside the block (see the module docstring)."""
    mode = HostReads()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu")}

    def counted(name):
        def method(self, *args, **kwargs):
            mode.count += 1
            return originals[name](self, *args, **kwargs)

        return method

    for name in originals:
        setattr(torch.Tensor, name, counted(name))
    try:
        with mode:
            yield mode
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def tiny_model(family: str):
    """A tiny fp64 Llama, or an LFM2 (short convolutions run per sequence by ``wrpo.model.mixers``)."""
    import transformers

    torch.manual_seed(0)
    if family == "lfm2":
        config = transformers.Lfm2Config(
            vocab_size=97,
            layer_types=["conv", "full_attention", "conv"],
            block_auto_adjust_ff_dim=False,
            **sizes(32, 64, 3, 4, 2),
        )
    else:
        config = transformers.LlamaConfig(vocab_size=97, **LLAMA_2x32)
    return transformers.AutoModelForCausalLM.from_config(config).double()


def groups(n=3, K=3):
    g = torch.Generator().manual_seed(1)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (), generator=g))  # noqa: E731
    tokens = lambda lo, hi: torch.randint(3, 97, (rand(lo, hi),), generator=g).tolist()  # noqa: E731
    return [
        {"prompt_ids": tokens(2, 7), "responses": [tokens(1, 6) for _ in range(K)], "num_chosen": K - 1}
        for _ in range(n)
    ]


def host_reads_of_one_step(layout: str, family: str = "llama") -> int:
    model = tiny_model(family)
    packing, sharing = layout != "padded", layout == "shared_prefix"
    plan = plan_layout(read_capabilities(model), packing=packing, prefix_sharing=sharing)
    prepare_layout(plan, model)
    batch = plan.collator(0)(groups())
    ref = torch.zeros(3, 3, dtype=torch.float64)
    with counting_host_reads() as reads:
        out = preference_loss(model, batch, ref_logps=ref, backend="torch")
        out.loss.backward()
    return reads.count


# padded: transformers' own mask checks (2; 3 with LFM2's recurrent mask), the label check (1) and the
# CPU-only skip of a 1.0 upstream gradient (1); packed layouts: the label check and that skip. Before the
# collator recorded the layout, a packed Llama step read the positions back 16 more times (27 more with
# shared prefixes): this test run at the commit before wrpo/data/batch.py.
MOST_READS = {"padded": 5, "packed": 2, "shared_prefix": 2}


@pytest.mark.parametrize("family", ["llama", "lfm2"])
@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prefix"])
def test_a_training_step_reads_few_values_back(layout, family):
    reads = host_reads_of_one_step(layout, family)
    assert reads <= MOST_READS[layout], f"{layout} {family}: {reads} host reads"


def test_a_batch_reshaped_after_collation_is_refused():
    model = tiny_model("llama")
    plan = plan_layout(read_capabilities(model), packing=True, prefix_sharing=False)
    prepare_layout(plan, model)
    batch = plan.collator(0)(groups())
    batch["input_ids"], batch["position_ids"] = batch["input_ids"][:, :-1], batch["position_ids"][:, :-1]
    with pytest.raises(ValueError, match=r"recorded for position_ids of shape .* must drop its 'layout'"):
        preference_loss(model, batch, ref_logps=torch.zeros(3, 3, dtype=torch.float64), backend="torch")
