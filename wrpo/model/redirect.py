"""Running a function inside the call to a (wrapped) model, with the LM head's parameters whole.

Wrappers that shard or synchronise parameters act when the model is called: DDP prepares its gradient
reduction, FSDP2 (``fully_shard``) all-gathers the root's parameters (the LM head among them) in a
forward pre-hook, DeepSpeed ZeRO-3 gathers a submodule's parameters when that submodule is called.
Reading ``lm_head.weight`` outside such a call sees a shard (a DTensor) or a released, 0-element
parameter. :func:`call_inside_forward` therefore swaps the model's ``forward`` for one call so that
calling the (wrapped) model runs the given function, then restores it; the head itself is never
called, so under ZeRO-3 its parameters are gathered explicitly (:func:`gathered_head`).
"""

from __future__ import annotations

import contextlib

import torch


def call_inside_forward(model, lm: torch.nn.Module, fn):
    """Run ``fn()`` as ``lm.forward`` while calling ``model`` (``lm`` or a wrapper around it), so that
    the wrappers' forward hooks (gathering, gradient sync) act around it; returns ``fn()``'s result."""
    had_own = "forward" in vars(lm)
    original = lm.forward

    def restore():
        if had_own:
            lm.forward = original
        else:
            vars(lm).pop("forward", None)

    def redirected(*_args, **_kwargs):
        restore()  # a nested call of the model inside fn gets its real forward
        return fn()

    lm.forward = redirected
    try:
        return model()
    finally:
        restore()


@contextlib.contextmanager
def gathered_head(head: torch.nn.Module, owner: torch.nn.Module):
    """The head's parameters whole for the duration: DeepSpeed ZeRO-3 partitions them (``ds_id``).

    They are also registered as used by ``owner`` (the model whose forward runs the loss): the fused
    loss computes the weight gradient in its forward, and autograd accumulates it into the parameter in
    the backward, when ZeRO-3 has partitioned the head again unless the owner's backward gathers it."""
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed  # a ZeRO-3 parameter implies deepspeed is installed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if all(p.ds_status == ZeroParamStatus.AVAILABLE for p in params):
        # registered by an earlier call, the owner's forward has gathered them and releases them
        # after it: partitioning them here would free parameters the owner still holds
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, fwd_module=owner):
        yield
