"""The ``triton`` backend's ``gist``, for CUDA tensors (and CPU tensors through the Triton interpreter,
``TRITON_INTERPRET=1``).

Each masked logit block is one launch of :func:`~embedloss_kernels.kernels.gist.gist_masked_logits_kernel`
(the model's and the guide's products of a tile, the guide's test against the row bound, the masked logits
stored; the few entries within rounding of the bound flagged and decided exactly after it), so the guide's
similarities are never written; the row LSE, ``softmax - onehot`` and the gradient
products (cuBLAS) are the torch backend's row-block loop (:func:`~embedloss_kernels.backends.torch.gist.gist_forward`),
to which the launcher is passed. Every scalar reaches the kernel inside a tensor of the work dtype.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ...heuristics.triton import dot_precision, gist_tiles, is_interpreted
from ..torch.gist import gist_forward as gist_block_loop
from ..torch.gist import settle_ties_
from . import acc_type, triton

if triton is not None:
    from ...kernels.gist import gist_masked_logits_kernel


def masked_logits_triton(x: Tensor, y: Tensor, x_guide: Tensor, y_guide: Tensor, row_factor: Tensor,
                         col_inv: Tensor, bound: Tensor, band: float, exempt_start: int | None) -> Tensor:
    """The launcher: the same block as :func:`~embedloss_kernels.backends.torch.gist.masked_logits`, in one kernel
    (the entries it flags within ``band`` of their bound decided after it by ``settle_ties_``)."""
    x, y, x_guide, y_guide = (t.contiguous() for t in (x, y, x_guide, y_guide))
    n, m = x.shape[0], y.shape[0]
    out = torch.empty((n, m), dtype=x.dtype, device=x.device)
    near = torch.empty((n, m), dtype=torch.int8, device=x.device)
    band_t = torch.full((1,), band, dtype=bound.dtype, device=x.device)
    prec, gprec = dot_precision(x.dtype), dot_precision(x_guide.dtype)
    bm, bn, bk = gist_tiles(x.shape[1], x.dtype, is_interpreted(), prec)
    _, _, bkg = gist_tiles(x_guide.shape[1], x_guide.dtype, is_interpreted(), gprec)
    acc, gacc = acc_type(x.dtype), acc_type(x_guide.dtype)
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


def gist_forward(anchor, candidates, anchor_guide, candidates_guide, columns, row_start, scale, margin_strategy,
                 margin, contrast_anchors, contrast_positives, compute_grad, block_rows):
    return gist_block_loop(anchor, candidates, anchor_guide, candidates_guide, columns, row_start, scale,
                           margin_strategy, margin, contrast_anchors, contrast_positives, compute_grad, block_rows,
                           block_logits=masked_logits_triton)
