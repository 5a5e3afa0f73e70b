"""The ``cpp`` backend: the C++ extension ``embedloss_kernels._C`` (sources in ``csrc/``), the default on CPU.

The extension registers ``embedloss_cpp::infonce``, ``embedloss_cpp::cosent`` (the contract of
``embedloss_kernels/ops/__init__.py``) with their CPU kernels and autograd, and ``embedloss_cpp::scaled_grads``
(their backward). This module adds the fake implementations that ``torch.compile`` traces with. When the extension
is missing (built with ``EMBEDLOSS_NO_EXT=1``, or its compile failed) :func:`why_not` says so and the package runs
on the ``torch`` backend.
"""

from __future__ import annotations

import logging

import torch

from .torch_ops import register_fakes

_log = logging.getLogger("embedloss_kernels")

try:
    from embedloss_kernels import _C  # noqa: F401 - importing it registers the ops
except ImportError as exc:
    _IMPORT_ERROR: str | None = (
        f"the C++ extension embedloss_kernels._C is not built ({exc}); reinstall with "
        "`pip install --no-build-isolation -e .` (without EMBEDLOSS_NO_EXT=1) to build it"
    )
else:
    _IMPORT_ERROR = None

_warned = False


def why_not(device: torch.device) -> str | None:
    global _warned
    if _IMPORT_ERROR is not None:
        if not _warned:
            _warned = True
            _log.warning("embedloss_kernels: the cpp backend is unavailable, running on the torch backend: %s",
                         _IMPORT_ERROR)
        return _IMPORT_ERROR
    if torch.device(device).type != "cpu":
        return "the cpp backend runs on CPU only"
    return None


if _IMPORT_ERROR is None:

    register_fakes("embedloss_cpp")

    @torch.library.register_fake("embedloss_cpp::scaled_grads")
    def _scaled_grads_fake(grad_loss, grad_first, grad_second):
        return torch.empty_like(grad_first), torch.empty_like(grad_second)

    infonce = torch.ops.embedloss_cpp.infonce
    cosent = torch.ops.embedloss_cpp.cosent
