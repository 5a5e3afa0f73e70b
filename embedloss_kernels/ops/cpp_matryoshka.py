"""The ``cpp`` backend's Matryoshka op: ``embedloss_cpp::matryoshka`` (C++ kernel in ``csrc/cpu/matryoshka_cpu.cpp``).

The kernel is registered by the extension ``embedloss_kernels._C``; this module adds its fake implementation and its
autograd (backward = ``grad_output *`` the gradients computed in the forward pass), the same as the torch backend's.
"""

from __future__ import annotations

import torch

from . import cpp_ops
from .torch_matryoshka import register_matryoshka_fake
from .torch_ops import backward_scaled_grads, setup_saved_grads


def _missing() -> str | None:
    if cpp_ops._IMPORT_ERROR is not None:
        return cpp_ops._IMPORT_ERROR
    if not hasattr(torch.ops.embedloss_cpp, "matryoshka"):
        return "the C++ extension was built without the Matryoshka kernel; rebuild it (python setup.py build_ext)"
    return None


def why_not(device: torch.device) -> str | None:
    return _missing() or cpp_ops.why_not(device)


if _missing() is None:
    register_matryoshka_fake("embedloss_cpp")
    torch.library.register_autograd("embedloss_cpp::matryoshka", backward_scaled_grads,
                                    setup_context=setup_saved_grads)
    matryoshka = torch.ops.embedloss_cpp.matryoshka
