"""The ``triton`` backend: the Triton kernels (:mod:`embedloss_kernels.kernels`) for CUDA tensors, and for CPU tensors
through the Triton interpreter when ``TRITON_INTERPRET=1``. One launcher module per loss beside this one; what they
share is here: whether the backend can run (:func:`why_not`), the accumulator type and the one-time tile
autotuning. The tiles themselves are :mod:`embedloss_kernels.heuristics.triton`'s.

Where a loss's algorithm is the ``torch`` backend's row-block loop with a Triton row pass (CoSENT beyond the tiled
kernels' batch, Matryoshka, GIST), the launcher passes its kernel into that loop: this backend builds on the torch
backend, never the other way round.
"""

from __future__ import annotations

import torch

from ...core.versions import TRITON_RANGE, as_text, major_minor
from ...heuristics.triton import autotune_enabled, is_interpreted

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any failure leaves the backend unavailable, with the reason
    triton = tl = None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"


def why_not(device: torch.device) -> str | None:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    version = major_minor(triton.__version__)
    if not TRITON_RANGE[0] <= version <= TRITON_RANGE[1]:
        low, high = map(as_text, TRITON_RANGE)
        return f"triton {triton.__version__} is outside the supported {low}-{high}"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    if device.type == "cpu":
        if is_interpreted():
            return None
        return "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    return f"the triton backend runs on cuda (or cpu through the interpreter), not {device.type}"


def acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_TUNED: dict = {}


def launch(kernel, grid, args: tuple, meta: dict, configs: list[dict], key: tuple) -> None:
    """Launch ``kernel`` with the best of ``configs`` for ``key`` = (kernel, D, dtype, arch, modes): timed once per
    key with ``triton.testing.do_bench`` on the GPU (every kernel launched here only writes its outputs, so the
    trial runs are harmless); the first config where there is one, under the interpreter, or with
    ``EMBEDLOSS_TRITON_AUTOTUNE=0``."""
    if len(configs) == 1 or is_interpreted() or not autotune_enabled():
        best = configs[0]
    elif key in _TUNED:
        best = _TUNED[key]
    else:
        def run(cfg):
            return lambda: kernel[grid(cfg)](*args, **meta, **cfg)

        times = [triton.testing.do_bench(run(cfg), warmup=5, rep=20) for cfg in configs]
        best = _TUNED[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    kernel[grid(best)](*args, **meta, **best)
