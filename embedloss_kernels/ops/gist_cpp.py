"""GIST on the ``cpp`` backend: ``embedloss_cpp::gist`` from the C++ extension (``csrc/gist.cpp``,
``csrc/cpu/gist_cpu.cpp``), with its fake implementation for ``torch.compile``. An extension built before the op
existed has no ``gist``: :func:`why_not` says so (and the functional API falls back to the torch backend)."""

from __future__ import annotations

import torch

from . import cpp_ops
from .gist_torch import register_gist_fake

_HAS_OP = cpp_ops._IMPORT_ERROR is None and hasattr(torch.ops.embedloss_cpp, "gist")

if _HAS_OP:
    register_gist_fake("embedloss_cpp")
    gist = torch.ops.embedloss_cpp.gist


def why_not(device: torch.device) -> str | None:
    reason = cpp_ops.why_not(device)
    if reason is not None:
        return reason
    if not _HAS_OP:
        return ("the C++ extension has no gist op (built before it existed); rebuild it with "
                "`python setup.py build_ext --inplace` or `pip install --no-build-isolation -e .`")
    return None
