"""The ``triton`` backend's ``siglip``: the torch backend's row-block loop (:func:`siglip_blocks`) with the Triton
elementwise pass of :mod:`embedloss_kernels.kernels.siglip`. Per block, ``S = X_b Y^T`` once (cuBLAS, fp32 out), the
kernel turns it into the loss sums and ``G`` in the input dtype in place, then ``G Y`` and ``G^T X_b`` on tensor
cores: three matmul-equivalents, like MNRL's ``fused`` strategy."""

from __future__ import annotations

import torch
from torch import Tensor

from ...heuristics.triton import row_pass_config
from ..torch.siglip import siglip_blocks
from . import acc_type, triton

if triton is not None:
    from ...kernels.siglip import siglip_row_kernel


def _row_pass(z: Tensor, s: Tensor, b: Tensor, diag_offset: int | None, compute_grad: bool, dtype: torch.dtype,
              scratch: Tensor | None = None):
    # ``scratch`` (the torch pass's temporary) is not needed: the kernel works in registers
    n, n_cols = z.shape
    g = z if dtype == z.dtype else z.view(dtype)[:, :n_cols]  # G over S (16-bit: the first half of each row)
    loss_rows = torch.empty(n, dtype=z.dtype, device=z.device)
    gsum_rows = torch.empty(n, dtype=z.dtype, device=z.device)
    cfg = row_pass_config(dtype)
    grid = (triton.cdiv(n, cfg["BM"]),)
    siglip_row_kernel[grid](z, g, s, b, loss_rows, gsum_rows, diag_offset or 0, n, n_cols, z.stride(0), g.stride(0),
                            HAS_POS=diag_offset is not None, GRAD=compute_grad, ACC=acc_type(dtype), **cfg)
    if not compute_grad:
        return loss_rows.sum(), None, None
    return loss_rows.sum(), g, gsum_rows.sum()


def siglip_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, positive_offset: int, has_positives: bool,
                   compute_grad: bool, block_rows: int):
    per_logit = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).bits // 8
    return siglip_blocks(x, y, scale, bias, positive_offset, has_positives, compute_grad, block_rows,
                         row_pass=_row_pass, bytes_per_logit=per_logit)
