"""The saved-gradients rule, written once: every loss's gradient is computed in the forward pass and backward only
scales it by ``grad_output``. It serves every op of every backend, in two places:

* :func:`loss_from_op`, the functional API's call of an op: reverse mode, forward mode, ``torch.func`` and compile;
* :func:`register_op_autograd`, the autograd of the registered ops themselves (``torch.ops.embedloss_<backend>.<loss>``
  called directly), through ``torch.library.register_autograd``.

Both backwards are :func:`backward_from_saved`. Every op of the contract (``core/contract.py``) returns
``(loss, grad_first, grad_second, grad_scale)`` (``siglip`` adds ``grad_bias``) with the gradients of the scalar loss
already computed in its forward pass. :func:`loss_from_op` calls it through
:class:`LossFromSavedGrads`, which gives the loss every derivative PyTorch can ask of a scalar function whose
gradient is known:

* reverse mode (``backward``, ``torch.autograd.grad``, ``torch.func.grad`` / ``vjp`` / ``jacrev``):
  ``d first = grad_output * grad_first`` (``second``, a tensor ``scale`` and a tensor ``bias`` likewise);
* forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp`` / ``jacfwd``): the loss's tangent is
  ``<grad_first, tangent_first> + <grad_second, tangent_second> (+ grad_scale * tangent_scale
  + grad_bias * tangent_bias)``;
* ``torch.func.vmap``: the op runs once per batch entry (the :meth:`LossFromSavedGrads.vmap` rule);
* ``torch.compile(fullgraph=True)``: dynamo cannot trace an ``autograd.Function`` with a custom ``jvp``, so while
  compiling the same function without it (:class:`CompiledLossFromSavedGrads`) is used (forward mode then raises
  PyTorch's "implement the jvp" error, never a zero tangent).

Backward allocates nothing of the gradients' size: the gradient outputs get no zero-filled gradients
(``set_materialize_grads(False)``), and when the engine releases the graph after this node (no ``retain_graph`` or
``create_graph``; the C++ extension reports it) the saved gradients are scaled in place and handed on, so that
``AccumulateGrad`` keeps them as ``.grad``. A retained graph gets copies, so a later in-place change of ``.grad`` never
reaches the next backward.

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

from ..core import extension

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


def _dual_level_active() -> bool:
    """Whether forward-mode AD may run on this call (the inputs reach setup_context without their tangents)."""
    return getattr(forward_ad, "_current_level", 0) >= 0  # unknown torch: assume it may


_EXTENSION = extension.load()
# ``embedloss_kernels._C.graph_task_keeps_graph`` (the extension's one function), or ``None`` without it
_KEEPS_GRAPH = None if isinstance(_EXTENSION, str) else getattr(_EXTENSION, "graph_task_keeps_graph", None)


def _saved_tensor_hooks_active() -> bool:
    """Whether a ``saved_tensors_hooks`` pack hook saw the saved gradients: it may keep what it packed, so they must
    never change afterwards."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True  # unknown torch: assume a hook may be there
    return top(True) is not None


def _plain(t: Tensor) -> bool:
    """A plain dense tensor: not fake, functional, a subclass, or batched (``is_grads_batched`` / vmap)."""
    if type(t) is not Tensor or t.layout != torch.strided:
        return False
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is None:
        return False  # unknown torch: assume it may be wrapped
    # ``is_grads_batched`` / ``jacobian(vectorize=True)`` batch grad_output with the legacy vmap
    return not (functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t))


def _saved_grads_are_released(ctx, *tensors: Tensor) -> bool:
    """Whether backward may scale the saved gradients in place and hand them on (``AccumulateGrad`` then keeps them
    as ``.grad`` with no copy): nobody but this node can see them (``ctx.private``: the functional API returns only
    the loss; a direct op call returns the gradients too), no saved-tensor hook packed them, and the engine releases
    them as soon as this backward returns (an eager backward without ``retain_graph``/``create_graph``, plain tensors;
    under ``retain_graph`` a later in-place change of ``.grad`` would reach the next backward through the shared
    storage). Without the extension, or when unsure, False (backward copies)."""
    if not ctx.private or ctx.hooked or _KEEPS_GRAPH is None:
        return False
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or transforms_active():
        return False
    if not all(_plain(t) for t in tensors):
        return False
    storages = [t.untyped_storage().data_ptr() for t in tensors[:2]]
    if len(set(storages)) < len(storages):  # one buffer behind both gradients: scaling each in place would repeat
        return False
    return not _KEEPS_GRAPH()


def _scaled(saved: Tensor, grad_loss: Tensor, in_place: bool) -> Tensor:
    factor = grad_loss.to(saved.dtype)
    return saved.mul_(factor) if in_place else saved * factor


def _save(ctx, output, private: bool) -> None:
    """Keep the gradients the op computed (``output[1:]``) for backward. The gradient outputs never receive a
    gradient: without ``set_materialize_grads(False)`` backward would get zero-filled tensors of their size."""
    ctx.set_materialize_grads(False)
    ctx.private = private
    ctx.hooked = torch.compiler.is_compiling() or _saved_tensor_hooks_active()  # compiled: never in place anyway
    grad_first, grad_second, grad_scale, grad_bias = (*output[1:], None, None)[:4]
    ctx.mark_non_differentiable(*output[1:])
    return grad_first, grad_second, grad_scale, grad_bias


def backward_from_saved(ctx, grad_loss: Tensor | None, grad_first: Tensor, grad_second: Tensor):
    """The one backward: ``grad_output *`` the saved gradients (scaled in place and handed on only when
    :func:`_saved_grads_are_released`); ``None`` when no gradient reached the loss. Raises when the loss was computed
    without gradients."""
    _check_computed(grad_first, grad_second, "backward")
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized as zeros)
        return None, None
    in_place = _saved_grads_are_released(ctx, grad_first, grad_second, grad_loss)
    return _scaled(grad_first, grad_loss, in_place), _scaled(grad_second, grad_loss, in_place)


def _like(t) -> tuple | None:
    return (t.dtype, t.shape) if isinstance(t, Tensor) else None


def _param_grad(grad: Tensor | None, grad_loss: Tensor, like: tuple | None) -> Tensor | None:
    """``grad_output * grad`` for a tensor scale or bias, in its dtype and shape (``None`` for a number)."""
    if like is None or grad is None:
        return None
    dtype, shape = like
    return (grad * grad_loss.to(grad.dtype)).to(dtype).reshape(shape)


def _setup(ctx, inputs, output, keep_inputs: bool) -> None:
    _, scale, bias, first, second, *_ = inputs
    # an op without the scale's gradient (three outputs) serves number scales only (loss_from_op checks)
    grad_first, grad_second, grad_scale, grad_bias = _save(ctx, output, private=True)
    kept = (first, second) if keep_inputs else (None, None)
    ctx.save_for_backward(grad_first, grad_second, grad_scale, grad_bias, *kept)
    ctx.scale_like, ctx.bias_like = _like(scale), _like(bias)
    ctx.n_rest = len(inputs) - 5


class CompiledLossFromSavedGrads(torch.autograd.Function):
    """``apply(op, scale, bias, first, second, *rest) -> (loss, grad_first, grad_second, grad_scale[, grad_bias])``
    with ``op(first, second, *rest)`` a loss-and-gradients op (``rest`` holds the scale's value, as a float or a
    detached 0-dim tensor) and ``scale`` the scale as the user gave it: a tensor (a learnable scale gets
    ``grad_output * grad_scale``) or a number; ``bias`` likewise with the op's fifth output (``None`` for ops without
    one). The loss is differentiable, the gradients are not. No forward mode (traceable by dynamo)."""

    @staticmethod
    def forward(op, scale, bias, first: Tensor, second: Tensor, *rest):
        return op(first, second, *rest)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _setup(ctx, inputs, output, keep_inputs=True)

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused):
        nested = transforms_active()
        if torch.is_grad_enabled() and not nested:
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        # a second backward through a freed graph raises PyTorch's own error here
        grad_first, grad_second, grad_scale, grad_bias, first, second = ctx.saved_tensors
        grads = backward_from_saved(ctx, grad_loss, grad_first, grad_second)
        if grad_loss is None:
            return (None,) * (5 + ctx.n_rest)
        d_scale = _param_grad(grad_scale, grad_loss, ctx.scale_like if ctx.needs_input_grad[1] else None)
        d_bias = _param_grad(grad_bias, grad_loss, ctx.bias_like if ctx.needs_input_grad[2] else None)
        if torch.is_grad_enabled():  # torch.func builds a graph of every gradient: make differentiating it raise
            if first is None:  # the forward ran outside any transform: nothing to tie a graph to
                raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
            grads = [_FirstOrderOnly.apply(g, first, second) for g in grads]
            d_scale, d_bias = (None if d is None else _FirstOrderOnly.apply(d, first, second)
                               for d in (d_scale, d_bias))
        return (None, d_scale, d_bias, *grads) + (None,) * ctx.n_rest

    @staticmethod
    def vmap(info, in_dims, op, scale, bias, first, second, *rest):
        """The op once per batch entry (the kernels take one batch of embeddings), stacked."""
        args = (scale, bias, first, second, *rest)
        outs = []
        for i in range(info.batch_size):
            entry = [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims[1:])]
            outs.append(LossFromSavedGrads.apply(op, *entry))
        stacked = tuple(torch.stack(out) for out in zip(*outs))
        return stacked, (0,) * len(stacked)


class LossFromSavedGrads(CompiledLossFromSavedGrads):
    """:class:`CompiledLossFromSavedGrads` with forward mode: the loss's tangent from the saved gradients."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, _, _, first, second, *_ = inputs
        # The inputs are only needed to tie a torch.func gradient or a forward-mode tangent to them (so that
        # differentiating it raises). Plain reverse mode does not keep them: ``second`` is often the candidates
        # concatenated by the caller, which would otherwise stay alive until backward (B*K*D more peak memory).
        keep = transforms_active() or _dual_level_active()
        _setup(ctx, inputs, output, keep_inputs=keep)
        if not keep:
            first = second = None
        grad_first, grad_second, grad_scale, grad_bias = (*output[1:], None, None)[:4]
        ctx.save_for_forward(grad_first, grad_second, grad_scale, grad_bias, first, second)
        ctx.loss_dtype = output[0].dtype
        ctx.n_outputs = len(output)

    @staticmethod
    def jvp(ctx, _op, tangent_scale, tangent_bias, tangent_first, tangent_second, *_rest):
        grad_first, grad_second, grad_scale, grad_bias, first, second = ctx.saved_tensors
        _check_computed(grad_first, grad_second, "forward-mode AD (jvp)")
        tangent = None
        pairs = [(grad_first, tangent_first), (grad_second, tangent_second)]
        for grad, t in ((grad_scale, tangent_scale), (grad_bias, tangent_bias)):
            if isinstance(t, Tensor) and grad is not None:
                pairs.append((grad.reshape(()), t.reshape(())))
        for grad, t in pairs:
            if t is not None:
                term = _dot(grad, t, ctx.loss_dtype)
                tangent = term if tangent is None else tangent + term
        # Nested transforms, or reverse mode over this forward mode, would differentiate the tangent: make that raise.
        if first is not None and (transforms_active()
                                  or (torch.is_grad_enabled() and (first.requires_grad or second.requires_grad))):
            tangent = _FirstOrderOnly.apply(tangent, first, second)
        return (tangent,) + (None,) * (ctx.n_outputs - 1)


def loss_from_op(op, first: Tensor, second: Tensor, *rest, scale=None, bias=None) -> Tensor:
    """The differentiable loss of ``op(first, second, *rest)`` (its gradients computed in the forward pass);
    ``scale``: the scale when it is a tensor (it then gets a gradient), else ``None``; ``bias`` likewise, for an op
    whose fifth output is the bias's gradient (``siglip``)."""
    if torch.compiler.is_compiling() and not needs_grad(*(t for t in (first, second, scale, bias) if t is not None)):
        # nothing to differentiate (evaluation under compile): the op alone. Dynamo cannot trace an autograd.Function
        # that no input needs: it binds the Function's context to ``forward``'s first argument (torch 2.13)
        return op(first, second, *rest)[0]
    fn = CompiledLossFromSavedGrads if torch.compiler.is_compiling() else LossFromSavedGrads
    out = fn.apply(op, scale, bias, first, second, *rest)
    if scale is not None and len(out) < 4 and scale.requires_grad:
        raise NotImplementedError(f"embedloss_kernels: {op} gives no gradient for a learnable scale")
    if bias is not None and len(out) < 5 and bias.requires_grad:
        raise NotImplementedError(f"embedloss_kernels: {op} gives no gradient for a learnable bias")
    return out[0]


def _op_setup_context(ctx, inputs, output) -> None:
    # the caller holds the returned gradients
    grad_first, grad_second, grad_scale, grad_bias = _save(ctx, output, private=False)
    # siglip (five outputs) takes its scale and bias as tensors, the third and fourth inputs: they get theirs too
    params = (grad_scale, grad_bias) if len(output) == 5 else ()
    ctx.save_for_backward(grad_first, grad_second, *params)
    ctx.param_like = [_like(t) for t in inputs[2 : 2 + len(params)]]
    ctx.n_inputs = len(inputs)


def _op_backward(ctx, grad_loss, *_output_grads):
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
    grad_first, grad_second, *params = ctx.saved_tensors
    grads = backward_from_saved(ctx, grad_loss, grad_first, grad_second)
    if grad_loss is not None:
        grads += tuple(_param_grad(g, grad_loss, like) for g, like in zip(params, ctx.param_like))
    else:
        grads += (None,) * len(params)
    return grads + (None,) * (ctx.n_inputs - len(grads))


def register_op_autograd(qualname: str, lib) -> None:
    """The autograd of a registered op (``namespace::loss``) called directly: the same rule, never in place (the
    caller holds the gradients the op returned), double backward refused."""
    torch.library.register_autograd(qualname, _op_backward, setup_context=_op_setup_context, lib=lib)
