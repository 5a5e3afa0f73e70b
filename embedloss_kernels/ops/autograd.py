"""One autograd for every backend's loss-and-gradients op: reverse mode, forward mode, ``torch.func`` and compile.

Every op of the contract (``ops/__init__.py``) returns ``(loss, grad_first, grad_second)`` with the gradients of the
scalar loss already computed in its forward pass. :func:`loss_from_op` calls it through :class:`LossFromSavedGrads`,
which gives the loss every derivative PyTorch can ask of a scalar function whose gradient is known:

* reverse mode (``backward``, ``torch.autograd.grad``, ``torch.func.grad`` / ``vjp`` / ``jacrev``):
  ``d first = grad_output * grad_first`` (and ``second`` likewise);
* forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``): the loss's tangent is
  ``<grad_first, tangent_first> + <grad_second, tangent_second>``;
* ``torch.func.vmap``: the op runs once per batch entry (the :meth:`LossFromSavedGrads.vmap` rule);
* ``torch.compile(fullgraph=True)``: dynamo cannot trace an ``autograd.Function`` with a custom ``jvp``, so while
  compiling the same function without it (:class:`CompiledLossFromSavedGrads`) is used (forward mode then raises
  PyTorch's "implement the jvp" error, never a zero tangent).

Second derivatives are refused loudly (the gradients are computed numbers, not a graph): ``create_graph=True``
raises at once; under ``torch.func`` (whose ``grad`` always builds a graph) the first derivative is returned and
differentiating it again raises. A second ``backward`` through a freed graph raises PyTorch's own error (the saved
gradients are released by the first). A loss computed without gradients (``compute_grad=False``) refuses backward and
forward mode rather than returning zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

DOUBLE_BACKWARD_MESSAGE = (
    "embedloss_kernels losses do not support double backward (create_graph=True) or any second derivative: their "
    "gradient is computed in the forward pass. Use embedloss_kernels.reference for higher-order derivatives."
)
NO_GRAD_MESSAGE = (
    "the embedloss_kernels loss was computed without gradients (compute_grad=False: no input required grad when it "
    "ran) but {} was called; recompute the loss with inputs that require grad (or a dual tensor for forward mode)"
)


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jvp, vmap, jacrev, jacfwd...) is running around this call."""
    return torch._C._are_functorch_transforms_active()


def needs_grad(*tensors: Tensor) -> bool:
    """Whether the op must compute its gradients: an input requires grad (reverse mode), carries a tangent (forward
    mode), or a ``torch.func`` transform is active (its wrapped tensors may need either)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    if torch.compiler.is_compiling():
        return False
    if transforms_active():
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a computed gradient, tied to the inputs it is the gradient of: differentiating it raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: Tensor, *anchors: Tensor) -> Tensor:
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


def _check_computed(grad_first: Tensor, grad_second: Tensor, what: str) -> None:
    if grad_first.numel() == 0 and grad_second.numel() == 0:
        raise RuntimeError(NO_GRAD_MESSAGE.format(what))


def _dot(saved: Tensor, tangent: Tensor, dtype: torch.dtype) -> Tensor:
    return (saved.to(dtype) * tangent.to(dtype)).sum()


class CompiledLossFromSavedGrads(torch.autograd.Function):
    """``apply(op, first, second, *rest) -> (loss, grad_first, grad_second)`` with ``op(first, second, *rest)`` a
    loss-and-gradients op; the loss is differentiable, the gradients are not. No forward mode (traceable by dynamo)."""

    @staticmethod
    def forward(op, first: Tensor, second: Tensor, *rest):
        return op(first, second, *rest)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, first, second, *_ = inputs
        _, grad_first, grad_second = output
        ctx.mark_non_differentiable(grad_first, grad_second)
        ctx.save_for_backward(grad_first, grad_second, first, second)
        ctx.n_rest = len(inputs) - 3

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused):
        nested = transforms_active()
        if torch.is_grad_enabled() and not nested:
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        grad_first, grad_second, first, second = ctx.saved_tensors  # a second backward raises PyTorch's error here
        _check_computed(grad_first, grad_second, "backward")
        grads = [grad_first * grad_loss.to(grad_first.dtype), grad_second * grad_loss.to(grad_second.dtype)]
        if torch.is_grad_enabled():  # torch.func builds a graph of every gradient: make differentiating it raise
            grads = [_FirstOrderOnly.apply(g, first, second) for g in grads]
        return (None, *grads) + (None,) * ctx.n_rest

    @staticmethod
    def vmap(info, in_dims, op, first, second, *rest):
        """The op once per batch entry (the kernels take one batch of embeddings), stacked."""
        args = (first, second, *rest)
        outs = []
        for i in range(info.batch_size):
            entry = [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims[1:])]
            outs.append(LossFromSavedGrads.apply(op, *entry))
        return tuple(torch.stack(out) for out in zip(*outs)), (0, 0, 0)


class LossFromSavedGrads(CompiledLossFromSavedGrads):
    """:class:`CompiledLossFromSavedGrads` with forward mode: the loss's tangent from the saved gradients."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        CompiledLossFromSavedGrads.setup_context(ctx, inputs, output)
        _, first, second, *_ = inputs
        _, grad_first, grad_second = output
        ctx.save_for_forward(grad_first, grad_second, first, second)
        ctx.loss_dtype = output[0].dtype

    @staticmethod
    def jvp(ctx, _op, tangent_first, tangent_second, *_rest):
        grad_first, grad_second, first, second = ctx.saved_tensors
        _check_computed(grad_first, grad_second, "forward-mode AD (jvp)")
        tangent = None
        for grad, t in ((grad_first, tangent_first), (grad_second, tangent_second)):
            if t is not None:
                term = _dot(grad, t, ctx.loss_dtype)
                tangent = term if tangent is None else tangent + term
        # Nested transforms, or reverse mode over this forward mode, would differentiate the tangent: make that raise.
        if transforms_active() or (torch.is_grad_enabled() and (first.requires_grad or second.requires_grad)):
            tangent = _FirstOrderOnly.apply(tangent, first, second)
        return tangent, None, None


def loss_from_op(op, first: Tensor, second: Tensor, *rest) -> Tensor:
    """The differentiable loss of ``op(first, second, *rest)`` (its gradients computed in the forward pass)."""
    fn = CompiledLossFromSavedGrads if torch.compiler.is_compiling() else LossFromSavedGrads
    return fn.apply(op, first, second, *rest)[0]
