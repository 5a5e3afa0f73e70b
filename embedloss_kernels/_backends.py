"""Backend registry shared by every op.

A backend is a module exposing the same two ops (see ``embedloss_kernels/ops/__init__.py`` for the contract):

* ``infonce(q, a, row_start, row_count, scale, cosine, directions, joint, hardness_mode, hardness_strength,
  compute_grad, block_rows) -> (loss, grad_q, grad_a)``
* ``cosent(x, y, labels, scale, similarity, compute_grad) -> (loss, grad_x, grad_y)``

and a function ``why_not(device: torch.device) -> str | None`` that answers why it cannot run on that device
(``None`` when it can). Each op carries its own autograd (gradient computed in the forward pass; backward only
scales by ``grad_output``).

``EMBEDLOSS_BACKEND`` = ``auto`` (default) | ``torch`` | ``cpp`` | ``triton`` picks the backend. ``auto`` takes
``triton`` for CUDA tensors and ``cpp`` for CPU tensors when they are available, else ``torch``.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

BACKEND_NAMES = ("torch", "cpp", "triton")
_MODULES = {
    "torch": "embedloss_kernels.ops.torch_ops",
    "cpp": "embedloss_kernels.ops.cpp_ops",
    "triton": "embedloss_kernels.ops.triton_ops",
}
# What auto picks, in order of preference, per device type.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}

_loaded: dict[str, ModuleType | str] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``EMBEDLOSS_BACKEND`` or ``backend=``) that cannot run here."""


def _load(name: str) -> ModuleType | str:
    """The backend's module, or a string saying why it could not be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = _import(name)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def _import(name: str) -> ModuleType:
    # Plain import statements, not importlib: torch.compile traces them (it runs the import while tracing), where
    # importlib.import_module is on its skip list, so the first call into the package may be a compiled one.
    if name == "torch":
        from .ops import torch_ops as module
    elif name == "cpp":
        from .ops import cpp_ops as module
    else:
        from .ops import triton_ops as module
    return module


def why_not(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (``None`` when it can)."""
    if name not in _MODULES:
        return f"unknown backend {name!r}; expected one of {BACKEND_NAMES}"
    mod = _load(name)
    if isinstance(mod, str):
        return f"the {name} backend failed to import ({mod})"
    return mod.why_not(torch.device(device))


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run here (on ``device`` when given, else on any local device)."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return [name for name in BACKEND_NAMES if any(why_not(name, d) is None for d in devices)]


def requested_backend() -> str:
    """The value of ``EMBEDLOSS_BACKEND`` (``auto`` when unset), validated."""
    value = os.environ.get("EMBEDLOSS_BACKEND", "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKEND_NAMES:
        raise ValueError(f"EMBEDLOSS_BACKEND must be one of {('auto',) + BACKEND_NAMES}, got {value!r}")
    return value


def current_backend(device: torch.device | str = "cpu", backend: str | None = None) -> str:
    """The name of the backend that runs for tensors on ``device`` now.

    ``backend`` overrides ``EMBEDLOSS_BACKEND``. A forced backend that cannot run raises
    :class:`BackendUnavailableError` naming the reason.
    """
    device = torch.device(device)
    choice = backend.strip().lower() if backend is not None else requested_backend()
    if choice == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if why_not(name, device) is None:
                return name
        raise BackendUnavailableError(f"no backend can run on device {device}: torch: {why_not('torch', device)}")
    if choice not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {choice!r}")
    reason = why_not(choice, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {choice!r} was requested but cannot run on {device}: {reason}")
    return choice


def get_backend(device: torch.device | str, backend: str | None = None) -> ModuleType:
    """The backend module that runs on ``device`` (see :func:`current_backend`)."""
    mod = _load(current_backend(device, backend))
    assert not isinstance(mod, str)
    return mod


# The Matryoshka op lives in its own module per backend (``ops/<name>_matryoshka.py``).
_matryoshka_loaded: dict[str, ModuleType | str] = {}


def _import_matryoshka(name: str) -> ModuleType:
    # plain imports, as _import: torch.compile traces them
    if name == "torch":
        from .ops import torch_matryoshka as module
    elif name == "cpp":
        from .ops import cpp_matryoshka as module
    else:
        from .ops import triton_matryoshka as module
    return module


def _load_matryoshka(name: str) -> ModuleType | str:
    if name not in _matryoshka_loaded:
        try:
            _matryoshka_loaded[name] = _import_matryoshka(name)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the op unavailable on that backend
            _matryoshka_loaded[name] = f"{type(exc).__name__}: {exc}"
    return _matryoshka_loaded[name]


def matryoshka_why_not(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run the Matryoshka op on ``device`` (``None`` when it can)."""
    reason = why_not(name, device)
    if reason is not None:
        return reason
    mod = _load_matryoshka(name)
    if isinstance(mod, str):
        return f"the {name} backend's Matryoshka op failed to import ({mod})"
    return mod.why_not(torch.device(device))


def get_matryoshka_op(device: torch.device | str, backend: str | None = None):
    """The Matryoshka op of the backend that runs on ``device`` (:func:`current_backend`); when the automatic
    choice lacks the op it falls back along the automatic order, a forced backend that lacks it raises
    :class:`BackendUnavailableError`."""
    device = torch.device(device)
    choice = backend.strip().lower() if backend is not None else requested_backend()
    name = current_backend(device, backend)
    reason = matryoshka_why_not(name, device)
    if reason is None:
        return _load_matryoshka(name).matryoshka
    if choice != "auto":
        raise BackendUnavailableError(f"backend {name!r} cannot run the Matryoshka op on {device}: {reason}")
    for other in _AUTO_ORDER.get(device.type, ("torch",)) + ("torch",):
        if matryoshka_why_not(other, device) is None:
            return _load_matryoshka(other).matryoshka
    raise BackendUnavailableError(f"no backend can run the Matryoshka op on {device}: {reason}")
