"""``once_differentiable`` for the backwards of the autograd functions, also under a constant grad_output.

The backwards of ``FusedLinearWRPOFunction``, ``LinearLogprobsFunction`` and ``PreferenceLossFunction``
return gradients computed from saved constants (the fused loss even computes them in its forward):
autograd cannot differentiate them again, and a second derivative through them would silently lack
their part. ``torch.autograd.function.once_differentiable`` turns such an attempt into an error, but
only when a gradient flowing in requires grad; after ``torch.autograd.grad(loss, x, create_graph=True)``
(a ones grad_output that does not) it returns plain tensors, and a gradient penalty built on them would
quietly miss this function's second-order part. Here the outputs carry the error node whenever the
graph of the backward is being recorded (``create_graph=True``).
"""

from __future__ import annotations

import functools

import torch


def once_differentiable(backward):
    """Decorate a ``backward(ctx, *grad_outputs)``: runs it without recording a graph; with
    ``create_graph=True`` its outputs require grad through a node that raises ("trying to
    differentiate twice a function that was marked with @once_differentiable")."""
    marked = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        tensors = [
            i for i, g in enumerate(grad_outputs) if isinstance(g, torch.Tensor) and g.is_floating_point()
        ]
        if torch.is_grad_enabled() and tensors and not any(grad_outputs[i].requires_grad for i in tensors):
            # a detached alias that requires grad: once_differentiable then attaches its error node
            i = tensors[0]
            grad_outputs = (
                *grad_outputs[:i],
                grad_outputs[i].detach().requires_grad_(),
                *grad_outputs[i + 1 :],
            )
        return marked(ctx, *grad_outputs)

    return wrapper
