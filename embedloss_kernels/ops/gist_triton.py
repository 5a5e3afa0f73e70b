"""GIST on the ``triton`` backend: ``embedloss_triton::gist`` for CUDA tensors (and CPU tensors through the
Triton interpreter, ``TRITON_INTERPRET=1``).

Each masked logit block is one launch of :func:`~embedloss_kernels.triton.gist_kernels.gist_masked_logits_kernel`
(the model's and the guide's products of a tile, the guide's test against the row bound, the masked logits
stored; the few entries within rounding of the bound flagged and decided exactly after it), so the guide's
similarities are never written; the row LSE, ``softmax - onehot`` and the gradient
products (cuBLAS) are the torch backend's row-block loop (:func:`~embedloss_kernels.ops.gist_torch.gist_forward`),
to which the launcher is passed. Every scalar reaches the kernel inside a tensor of the work dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import GIST_SCHEMA
from . import triton_ops as _triton_ops
from .gist_torch import backward_scaled_grads, gist_forward, register_gist_fake, settle_ties_, setup_saved_grads

why_not = _triton_ops.why_not

if _triton_ops._IMPORT_ERROR is None:
    import triton
    import triton.language as tl

    from ..triton.gist_kernels import gist_masked_logits_kernel


def _tiles(dim: int, dtype: torch.dtype, interpreted: bool, precision: str) -> tuple[int, int, int]:
    """(BM, BN, BK): 16x16 tiles under the interpreter (slow; odd shapes cross tiles), else 32x32 for fp32 and
    16x16 for fp64 (FMA dots, twice the registers per element); BK >= 16 for tl.dot, and 16 for every FMA dot (fp64,
    fp32 without tf32): at BK 32 an fp32 FMA guide dot beside the model's tile spills on sm_80 (compile_check)."""
    bk = 16 if dim <= 16 or dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee") else 32
    if interpreted or dtype == torch.float64:
        return 16, 16, bk
    return 32, 32, bk


def masked_logits_triton(x: Tensor, y: Tensor, x_guide: Tensor, y_guide: Tensor, row_factor: Tensor,
                         col_inv: Tensor, bound: Tensor, band: float, exempt_start: int | None) -> Tensor:
    """The launcher: the same block as :func:`~embedloss_kernels.ops.gist_torch.masked_logits`, in one kernel
    (the entries it flags within ``band`` of their bound decided after it by ``settle_ties_``)."""
    x, y, x_guide, y_guide = (t.contiguous() for t in (x, y, x_guide, y_guide))
    n, m = x.shape[0], y.shape[0]
    out = torch.empty((n, m), dtype=x.dtype, device=x.device)
    near = torch.empty((n, m), dtype=torch.int8, device=x.device)
    band_t = torch.full((1,), band, dtype=bound.dtype, device=x.device)
    interpreted = _triton_ops._interpreted()
    prec, gprec = _triton_ops._precision(x.dtype), _triton_ops._precision(x_guide.dtype)
    bm, bn, bk = _tiles(x.shape[1], x.dtype, interpreted, prec)
    _, _, bkg = _tiles(x_guide.shape[1], x_guide.dtype, interpreted, gprec)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    gacc = tl.float64 if x_guide.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(n, bm), triton.cdiv(m, bn))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        gist_masked_logits_kernel[grid](
            x, y, x_guide, y_guide, row_factor.contiguous(), col_inv.contiguous(), bound.contiguous(), band_t, out,
            near, n, m, x.shape[1], x_guide.shape[1], x.stride(0), y.stride(0), x_guide.stride(0), y_guide.stride(0),
            out.stride(0), near.stride(0),
            0 if exempt_start is None else exempt_start, HAS_EXEMPT=exempt_start is not None, BM=bm, BN=bn, BK=bk,
            BKG=bkg, ACC=acc, GACC=gacc, PREC=prec, GPREC=gprec,
        )
    return settle_ties_(out, near.bool(), x_guide, y_guide, bound)


_lib = torch.library.Library("embedloss_triton", "FRAGMENT")
_lib.define("gist" + GIST_SCHEMA)


@torch.library.impl("embedloss_triton::gist", "CompositeExplicitAutograd", lib=_lib)
def _gist_triton(anchor, candidates, anchor_guide, candidates_guide, columns, row_start, scale, margin_strategy,
                 margin, contrast_anchors, contrast_positives, compute_grad, block_rows):
    return gist_forward(anchor, candidates, anchor_guide, candidates_guide, columns, row_start, scale,
                        margin_strategy, margin, contrast_anchors, contrast_positives, compute_grad, block_rows,
                        block_logits=masked_logits_triton)


register_gist_fake("embedloss_triton", _lib)
torch.library.register_autograd("embedloss_triton::gist", backward_scaled_grads, setup_context=setup_saved_grads,
                                lib=_lib)

gist = torch.ops.embedloss_triton.gist
