"""The registered ops: ``embedloss_<backend>::<loss>`` for every backend and loss, from one schema per loss.

For each backend, :func:`backend_ops` defines the ops from ``core/contract.py``'s schemas, registers the backend's
implementations (``backends/<backend>/<loss>.py``'s ``<loss>_forward``; the ``cpp`` backend's CPU kernels register
themselves when the extension loads), one fake implementation per loss for ``torch.compile`` (every backend's op has
the contract's output shapes), and the one autograd rule of :mod:`embedloss_kernels.ops.autograd`. Every backend's
ops are registered when this module is imported: a first call of a loss may come from code ``torch.compile`` traces,
which runs imports but cannot trace a registration. A backend that cannot run still gets its ops (its ``why_not``
says why); :data:`REGISTERED` holds the reason where registering failed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.common import work_dtype
from ..core.contract import BACKENDS, LOSSES, SCHEMAS
from .autograd import register_op_autograd

_libs: list = []


def _python_impls(backend: str) -> dict:
    """``{loss: <loss>_forward}`` of a backend written in Python (plain imports: torch.compile traces them)."""
    if backend == "torch":
        from ..backends.torch import cosent, gist, infonce, matryoshka, siglip
    else:
        from ..backends.triton import cosent, gist, infonce, matryoshka, siglip
    return {"infonce": infonce.infonce_forward, "cosent": cosent.cosent_forward,
            "matryoshka": matryoshka.matryoshka_forward, "gist": gist.gist_forward, "siglip": siglip.siglip_forward}


def _without_autocast(forward):
    """``forward`` with autocast off: the op computes in its inputs' dtypes (fp32 logits and LSE for 16-bit inputs),
    the same under ``torch.autocast`` as without, on every backend (the C++ kernels never see autocast)."""

    def impl(first: Tensor, *args):
        with torch.autocast(first.device.type, enabled=False):
            return forward(first, *args)

    impl.__name__ = impl.__qualname__ = forward.__name__
    return impl


def _arguments(schema: str) -> list[str]:
    return [arg.split()[-1] for arg in schema[1 : schema.index(") ->")].split(", ")]


def _fake(loss: str):
    """The fake implementation of ``loss``: its outputs' shapes and dtypes from the first two inputs (every
    gradient after the two inputs' is 0-dim in the loss's dtype: the scale's, and siglip's bias's)."""
    schema = SCHEMAS[loss]
    grad_at = _arguments(schema).index("compute_grad")
    n_outputs = schema.split("->")[1].count("Tensor")

    def fake(first: Tensor, second: Tensor, *args):
        loss_out = first.new_empty((), dtype=work_dtype(first.dtype))
        if not args[grad_at - 2]:
            grads = (first.new_empty((0,)), first.new_empty((0,)), loss_out.new_empty((0,)), loss_out.new_empty((0,)))
        else:
            grads = (torch.empty_like(first), torch.empty_like(second), torch.empty_like(loss_out),
                     torch.empty_like(loss_out))
        return (loss_out, *grads[: n_outputs - 1])

    return fake


def _register(backend: str) -> dict:
    namespace = f"embedloss_{backend}"
    impls = {} if backend == "cpp" else _python_impls(backend)  # the extension registers the cpp kernels itself
    lib = torch.library.Library(namespace, "DEF")
    for loss in LOSSES:
        lib.define(loss + SCHEMAS[loss])
        if loss in impls:
            lib.impl(loss, _without_autocast(impls[loss]), "CompositeExplicitAutograd")
        torch.library.register_fake(f"{namespace}::{loss}", _fake(loss), lib=lib)
        register_op_autograd(f"{namespace}::{loss}", lib)
    _libs.append(lib)
    return {loss: getattr(getattr(torch.ops, namespace), loss) for loss in LOSSES}


REGISTERED: dict[str, dict | str] = {}
for _backend in BACKENDS:
    try:
        REGISTERED[_backend] = _register(_backend)
    except Exception as exc:  # noqa: BLE001 - that backend cannot run; dispatch.why_not reports this reason
        REGISTERED[_backend] = f"{type(exc).__name__}: {exc}"


def backend_ops(backend: str) -> dict:
    """``{loss: torch.ops.embedloss_<backend>.<loss>}`` (a ``RuntimeError`` with the reason if they failed to
    register)."""
    ops = REGISTERED[backend]
    if isinstance(ops, str):
        raise RuntimeError(f"the {backend} backend's ops failed to register: {ops}")
    return ops
