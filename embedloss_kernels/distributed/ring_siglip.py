"""The ring schedule for SigLIP: no rank holds the world's texts, only its own block, the one in flight and one
gradient accumulator (``O(B·D)`` per rank whatever W), where the gather schedule holds ``W·B·D``.

Rank ``r`` owns rows ``x`` (its images or anchors, B_r of them) and a column block ``y`` (its texts, or its pool
``[P; N_1; ...]`` with the positives first). The loss of rank ``r`` is its rows against every rank's block, the
positives only in its own (``positive_offset = 0``), each block one call of the fused ``siglip`` op:

* forward: the blocks go round the ring ``l -> l + 1`` (W - 1 hops, padded to the largest block, the next hop posted
  before the current block is scored); each rank sums the loss of its rows against each visiting block
  (``compute_grad=False``: one matmul-equivalent per block).
* backward (autograd, so each rank's ``grad_output`` scales its own share): the blocks go round again, each rank
  recomputing its block's loss with gradients (three matmul-equivalents), keeping ``dX``, ``d/ds``, ``d/db``, and adding
  its ``dY`` into the accumulator that travels one hop behind its block; after the full circle rank ``r`` holds the
  accumulator of block ``r + 1`` with every rank's share in it, and one last hop hands it to its owner.

The numbers are OpenCLIP's ``SigLipLoss`` for every ``dist_impl``: each rank's loss, its images' and its scale's and
bias's gradients from its own loss, and each text's gradient summed over every rank's loss.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from ..backends.common import work_dtype
from .ring import _shift, _wait

_TAG_BLOCK, _TAG_ACC = 21, 22


class _SigLipRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale, bias, op, sizes: tuple[int, ...], rank: int, group,
                block_rows: int):
        wd = work_dtype(x.dtype)
        s = _op_scalar(scale, x, wd)
        b = _op_scalar(bias, x, wd)
        ring = SimpleNamespace(rank=rank, world=len(sizes), group=group)
        ctx.op, ctx.sizes, ctx.ring, ctx.block_rows = op, sizes, ring, block_rows
        ctx.scale_like = (scale.dtype, scale.shape) if isinstance(scale, Tensor) else None
        ctx.bias_like = (bias.dtype, bias.shape) if isinstance(bias, Tensor) else None
        ctx.save_for_backward(x, y, s, b)
        loss = torch.zeros((), dtype=wd, device=x.device)
        for k, block in _visiting(y, sizes, ring):
            loss += op(x, block, s, b, 0, k == 0, False, block_rows)[0]
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        x, y, s, b = ctx.saved_tensors
        op, sizes, ring = ctx.op, ctx.sizes, ctx.ring
        wd, bmax = s.dtype, max(sizes)
        g = grad_loss.to(wd)
        dx = torch.zeros(x.shape, dtype=wd, device=x.device)
        ds = torch.zeros((), dtype=wd, device=x.device)
        db = torch.zeros((), dtype=wd, device=x.device)
        acc = None
        for k, block in _visiting(y, sizes, ring):
            if k > 0:  # the accumulator of this block, from the rank that scored it last
                incoming = torch.empty(bmax, y.shape[1], dtype=wd, device=y.device)
                _wait(_shift(acc, incoming, ring, _TAG_ACC + 2 * k))
                acc = incoming
            else:
                acc = torch.zeros(bmax, y.shape[1], dtype=wd, device=y.device)
            _, gx, gy, gs, gb = op(x, block, s, b, 0, k == 0, True, ctx.block_rows)
            dx.add_(gx.to(wd), alpha=1.0)
            acc[: block.shape[0]].add_(gy.to(wd))
            ds += gs
            db += gb
        # this rank holds the accumulator of block rank + 1, complete: one last hop to its owner
        own = torch.empty_like(acc)
        _wait(_shift(acc, own, ring, _TAG_ACC + 2 * ring.world))
        dy = own[: y.shape[0]].mul_(g).to(y.dtype)
        dx = dx.mul_(g).to(x.dtype)
        d_scale = None if ctx.scale_like is None else (ds * g).to(ctx.scale_like[0]).reshape(ctx.scale_like[1])
        d_bias = None if ctx.bias_like is None else (db * g).to(ctx.bias_like[0]).reshape(ctx.bias_like[1])
        return dx, dy, d_scale, d_bias, None, None, None, None, None


def _op_scalar(value, like: Tensor, wd: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=like.device, dtype=wd)
    return torch.tensor(float(value), device=like.device, dtype=wd)


def _visiting(y: Tensor, sizes: tuple[int, ...], ring):
    """``(k, block)`` for k = 0 .. W - 1: the block of rank ``rank - k`` (this rank's own first), each next one
    received while the current one is scored."""
    world, bmax = ring.world, max(sizes)
    cur = y.new_zeros(bmax, y.shape[1]) if y.shape[0] < bmax else y.contiguous()
    if y.shape[0] < bmax:
        cur[: y.shape[0]] = y
    for k in range(world):
        reqs, nxt = None, None
        if k < world - 1:
            nxt = torch.empty_like(cur)
            reqs = _shift(cur, nxt, ring, _TAG_BLOCK + 2 * k)
        yield k, cur[: sizes[(ring.rank - k) % world]]
        if reqs is not None:
            _wait(reqs)
            cur = nxt


def siglip_ring(x: Tensor, y: Tensor, scale, bias, op, sizes: tuple[int, ...], rank: int, group=None,
                block_rows: int = 0) -> Tensor:
    """The SigLIP loss of this rank's rows ``x`` against every rank's column block (this rank's ``y``, positives
    first), through the ring; ``sizes``: every rank's block rows (:func:`collectives.gather_metadata`). ``scale``,
    ``bias``: numbers or one-element tensors (tensors get their gradients)."""
    return _SigLipRing.apply(x.contiguous(), y.contiguous(), scale, bias, op, tuple(sizes), rank, group, block_rows)
