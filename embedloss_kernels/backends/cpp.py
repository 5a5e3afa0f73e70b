"""The ``cpp`` backend: the C++ extension ``embedloss_kernels._C`` (sources in ``csrc/``), the default on CPU.

Importing the extension registers the CPU kernels of ``embedloss_cpp::<loss>`` (``csrc/cpu/<loss>_cpu.cpp``); the
schemas, fakes and autograd come from :mod:`embedloss_kernels.ops`, as for every backend. When the extension is
missing (built with ``EMBEDLOSS_NO_EXT=1``, or its compile failed) :func:`why_not` says so, once in the log too, and
the package runs on the ``torch`` backend.
"""

from __future__ import annotations

import logging

import torch

from ..core import extension
from ..core.contract import LOSSES

_log = logging.getLogger("embedloss_kernels")

_EXTENSION = extension.load()  # loading it registers the CPU kernels
IMPORT_ERROR: str | None = None
if isinstance(_EXTENSION, str):
    IMPORT_ERROR = (
        f"the C++ extension embedloss_kernels._C is not built ({_EXTENSION}); reinstall with "
        "`pip install --no-build-isolation -e .` (without EMBEDLOSS_NO_EXT=1) to build it"
    )
# the losses the extension has a CPU kernel for (one built before an op existed lacks it); read once, not under compile
_KERNELS = {loss for loss in LOSSES if torch._C._dispatch_has_kernel_for_dispatch_key(f"embedloss_cpp::{loss}", "CPU")}

_warned = False


def why_not(device: torch.device) -> str | None:
    global _warned
    if IMPORT_ERROR is not None:
        if not _warned:
            _warned = True
            _log.warning("embedloss_kernels: the cpp backend is unavailable, running on the torch backend: %s",
                         IMPORT_ERROR)
        return IMPORT_ERROR
    if torch.device(device).type != "cpu":
        return "the cpp backend runs on CPU only"
    return None


def missing_kernel(loss: str) -> str | None:
    """Why the extension has no CPU kernel for ``loss`` (built before the op existed), ``None`` when it has one."""
    if IMPORT_ERROR is None and loss not in _KERNELS:
        return (f"the C++ extension has no {loss} kernel (built before it existed); rebuild it with "
                "`pip install --no-build-isolation -e .`")
    return None
