"""The one loader: which backend runs a loss on a device, and its op.

Backends (``core/contract.py``'s ``BACKENDS``): ``torch`` (plain PyTorch, any device), ``cpp`` (the C++ extension,
CPU) and ``triton`` (CUDA, or CPU through the Triton interpreter with ``TRITON_INTERPRET=1``). Every backend has
every loss's op (``embedloss_<backend>::<loss>``, registered by :mod:`embedloss_kernels.ops`) and answers
:func:`why_not`.

``EMBEDLOSS_BACKEND`` = ``auto`` (default) | ``torch`` | ``cpp`` | ``triton`` picks the backend (a ``backend=``
argument of the functional API overrides it). The one fallback rule: ``auto`` takes the first backend of
``triton, torch`` (CUDA tensors) or ``cpp, torch`` (CPU tensors) that can run the loss there; a forced backend that
cannot run raises :class:`BackendUnavailableError` with its reason.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import ops
from .core.contract import BACKENDS, LOSSES

BACKEND_NAMES = BACKENDS
# What auto picks, in order of preference, per device type.
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}

_loaded: dict[str, ModuleType | str] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was forced (``EMBEDLOSS_BACKEND`` or ``backend=``) that cannot run here."""


def _import(name: str) -> ModuleType:
    # Plain import statements, not importlib: torch.compile traces them (it runs the import while tracing), where
    # importlib.import_module is on its skip list, so the first call into the package may be a compiled one.
    if name == "torch":
        from .backends import torch as module
    elif name == "cpp":
        from .backends import cpp as module
    else:
        from .backends import triton as module
    return module


def _load(name: str) -> ModuleType | str:
    """The backend's package, or a string saying why it could not be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = _import(name)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def why_not(name: str, device: torch.device | str, loss: str | None = None) -> str | None:
    """Why backend ``name`` cannot run (``loss``, when given) on ``device``; ``None`` when it can."""
    if name not in BACKEND_NAMES:
        return f"unknown backend {name!r}; expected one of {BACKEND_NAMES}"
    module = _load(name)
    if isinstance(module, str):
        return f"the {name} backend failed to import ({module})"
    reason = module.why_not(torch.device(device))
    if reason is not None:
        return reason
    if isinstance(ops.REGISTERED[name], str):
        return f"the {name} backend's ops failed to register ({ops.REGISTERED[name]})"
    if loss is not None and name == "cpp":
        return module.missing_kernel(loss)
    return None


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


def current_backend(device: torch.device | str = "cpu", backend: str | None = None, loss: str = "infonce") -> str:
    """The name of the backend that runs ``loss`` for tensors on ``device`` now.

    ``backend`` overrides ``EMBEDLOSS_BACKEND``. A forced backend that cannot run raises
    :class:`BackendUnavailableError` naming the reason.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    device = torch.device(device)
    choice = backend.strip().lower() if backend is not None else requested_backend()
    if choice == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if why_not(name, device, loss) is None:
                return name
        raise BackendUnavailableError(
            f"no backend can run {loss} on device {device}: torch: {why_not('torch', device, loss)}"
        )
    if choice not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {('auto',) + BACKEND_NAMES}, got {choice!r}")
    reason = why_not(choice, device, loss)
    if reason is not None:
        raise BackendUnavailableError(f"backend {choice!r} was requested but cannot run on {device} ({loss}): {reason}")
    return choice


def get_op(loss: str, device: torch.device | str, backend: str | None = None):
    """The op ``torch.ops.embedloss_<backend>.<loss>`` of the backend that runs ``loss`` on ``device``."""
    return ops.REGISTERED[current_backend(device, backend, loss)][loss]
