"""The ``torch`` backend's ``siglip`` (sigmoid pairwise loss): row blocks of ``z = s X_b Y^T + b``, one elementwise
pass for the loss and ``G = sigmoid(z) - P``, then ``G Y`` and ``G^T X_b``; no B x N tensor is kept."""

from __future__ import annotations

import torch
from torch import Tensor

from ...heuristics.blocks import block_rows as gpu_block_rows
from ...heuristics.blocks import budget_rows
from .. import blocked as _blocked
from ..common import work_dtype


def check_siglip_inputs(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, positive_offset: int,
                        has_positives: bool, owner: str) -> None:
    """The op's own shape checks (the functional layer validates the user's input before this)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{owner}: x and y must be (B, D) and (N, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or not x.dtype.is_floating_point:
        raise TypeError(f"{owner}: x and y must share a floating dtype, got {x.dtype} and {y.dtype}")
    if scale.numel() != 1 or bias.numel() != 1:
        raise ValueError(f"{owner}: scale and bias must be one-element tensors, got shapes {tuple(scale.shape)} "
                         f"and {tuple(bias.shape)}")
    if has_positives and not 0 <= positive_offset <= y.shape[0] - x.shape[0]:
        raise ValueError(f"{owner}: positive_offset must be in 0..N - B = {y.shape[0] - x.shape[0]} with positives, "
                         f"got {positive_offset}")


def softplus_sum(z: Tensor, scratch: Tensor | None = None) -> Tensor:
    """``sum log(1 + exp(z))`` without overflow at any finite ``z``: ``sum max(z, 0) + sum log1p(exp(-|z|))``, with
    one temporary the size of ``z`` (``scratch`` when given: the row-block loop reuses one across blocks).
    ``max(z, 0) = (z + |z|) / 2`` is exact elementwise (``z + |z|`` is ``2z`` or ``0``)."""
    t = torch.abs(z, out=scratch) if scratch is not None else z.abs()
    relu_sum = t.add_(z).sum() * 0.5
    torch.abs(z, out=t)
    return relu_sum + t.neg_().exp_().log1p_().sum()


def torch_row_pass(z: Tensor, s: Tensor, b: Tensor, diag_offset: int | None, compute_grad: bool, dtype,
                   scratch: Tensor | None = None):
    """One block's elementwise pass, in place over ``z`` (the block's raw products ``X_b Y^T``; ``scratch``: an
    optional buffer of ``z``'s shape for the one temporary): the sum of its loss terms, ``G`` (in ``dtype``;
    ``None`` without gradients) and the sum of ``G``. The positive of the block's row
    ``k`` sits on the diagonal at column ``diag_offset + k`` (``None``: no positives); negating ``z`` there turns
    every term into ``softplus(z')`` and ``G`` into ``sigmoid(z')`` with the diagonal negated again
    (``sigmoid(z) - 1 = -sigmoid(-z)``), exact for large ``|z|`` of both signs."""
    z.mul_(s).add_(b)
    diag = z.diagonal(diag_offset) if diag_offset is not None else None
    if diag is not None:
        diag.neg_()
    loss = softplus_sum(z, scratch)
    if not compute_grad:
        return loss, None, None
    g = z.sigmoid_()
    if diag is not None:
        diag.neg_()
    return loss, g.to(dtype), g.sum()


def siglip_blocks(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, positive_offset: int, has_positives: bool,
                  compute_grad: bool, block_rows: int, row_pass=torch_row_pass, bytes_per_logit: int = 0):
    """The row-block loop of the op (contract in ``core/contract.py``), with the elementwise pass ``row_pass``
    (:func:`torch_row_pass`, or the Triton backend's kernel): per block, ``S = X_b Y^T`` in the accumulator
    precision, the pass, ``G Y`` (this block's ``dX``, and ``sum_i <x_i, (G Y)_i>`` for ``d loss / d scale``) and
    ``G^T X_b`` added into ``dY``. ``scale / B`` multiplies the gradients once at the end (``G`` stays in [-1, 1]),
    so the scale is never read on the host."""
    check_siglip_inputs(x, y, scale, bias, positive_offset, has_positives, "embedloss siglip")
    wd = work_dtype(x.dtype)
    b_rows, n_cols = x.shape[0], y.shape[0]
    s = scale.detach().reshape(()).to(device=x.device, dtype=wd)
    b = bias.detach().reshape(()).to(device=x.device, dtype=wd)
    blocked = _blocked.use_blocked(x)
    if blocked:  # 16-bit products with fp32 sums on the GPU; no upcast copies of the inputs
        xw, yw = x, y
        per_logit = bytes_per_logit or 2 * torch.finfo(wd).bits // 8
        rows = block_rows or gpu_block_rows(b_rows, n_cols, per_logit, x.device)
    else:
        xw, yw = x.to(wd), y.to(wd)
        # the logits and the pass's temporary are two block buffers; the budget counts six, as the peak measured at
        # B = N = 8192 fp32 (2 cores) grows by about three block sizes per block (BLAS workspace, allocator slack):
        # 53 MB of extra memory in all, 0.04x OpenCLIP's, at the same speed
        rows = block_rows or budget_rows(n_cols, torch.finfo(wd).bits // 8, 6)
    rows = max(1, min(rows, max(b_rows, 1)))
    loss = torch.zeros((), dtype=wd, device=x.device)
    if compute_grad:
        dx = torch.empty(x.shape, dtype=wd, device=x.device)
        dy = torch.zeros(y.shape, dtype=wd, device=x.device)
        gsum = torch.zeros((), dtype=wd, device=x.device)
        radial = torch.zeros((), dtype=wd, device=x.device)
    g_dtype = x.dtype if blocked else wd
    # On the CPU path the logits and the pass's temporary live in two buffers reused by every block: a fresh pair per
    # block let freed blocks pile up in the allocator (at B = N = 8192 fp32, peak RSS ~30 MB above the two blocks).
    z_buffer = None if blocked else torch.empty((rows, n_cols), dtype=wd, device=x.device)
    scratch = None if blocked else torch.empty_like(z_buffer)
    for r0 in range(0, b_rows, rows):
        r1 = min(r0 + rows, b_rows)
        z = _blocked.mm_acc(xw[r0:r1], yw.T, out=None if blocked else z_buffer[: r1 - r0])
        part, g, g_part = row_pass(z, s, b, positive_offset + r0 if has_positives else None, compute_grad, g_dtype,
                                   None if blocked else scratch[: r1 - r0])
        loss += part
        if not compute_grad:
            continue
        gsum += g_part
        gy = _blocked.mm_acc(g, yw)
        radial += _blocked.radial_sum(xw[r0:r1], gy)
        dx[r0:r1] = gy
        _blocked.addmm_acc_(dy, g.T, xw[r0:r1], 1.0)
    inv_b = 1.0 / max(b_rows, 1)
    loss = loss * inv_b
    if not compute_grad:
        return loss, x.new_empty((0,)), x.new_empty((0,)), loss.new_empty((0,)), loss.new_empty((0,))
    factor = s * inv_b
    dx = dx.mul_(factor).to(x.dtype)
    dy = dy.mul_(factor).to(y.dtype)
    return loss, dx, dy, radial * inv_b, gsum * inv_b


def siglip_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, positive_offset: int, has_positives: bool,
                   compute_grad: bool, block_rows: int):
    """SigLIP on row blocks with the plain PyTorch elementwise pass (:func:`siglip_blocks`)."""
    return siglip_blocks(x, y, scale, bias, positive_offset, has_positives, compute_grad, block_rows)
