"""The one place that loads the C++ extension ``embedloss_kernels._C`` (``csrc/``): the CPU kernels of the ``cpp``
backend (registered as the library loads) and ``graph_task_keeps_graph`` for the autograd rule."""

from __future__ import annotations

import importlib
from types import ModuleType


def load() -> ModuleType | str:
    """The extension module, or a string saying why it could not be loaded (it is optional)."""
    try:
        # by name, not ``from embedloss_kernels import _C``: that would import the package's top from a leaf
        return importlib.import_module("embedloss_kernels._C")
    except ImportError as exc:
        return str(exc)
