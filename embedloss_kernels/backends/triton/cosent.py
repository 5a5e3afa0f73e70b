"""The ``triton`` backend's ``cosent`` (CoSENT / AnglE): two pairwise kernels (:mod:`embedloss_kernels.kernels.cosent`)
up to the batch where the quadratic work overtakes the torch backend's sorted O(B log B) path, which runs beyond it
(:func:`~embedloss_kernels.heuristics.triton.cosent_strategy`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...heuristics.triton import cosent_strategy, is_interpreted, pair_block
from ..common import no_grads, pair_similarity, work_dtype
from ..torch.cosent import cosent_forward as cosent_sorted
from . import acc_type, triton

if triton is not None:
    from ...kernels.cosent import pair_grad_kernel, pair_lse_kernel


def cosent_tiled(x: Tensor, y: Tensor, labels: Tensor, scale: float, similarity: int, compute_grad: bool):
    """CoSENT through the pairwise kernels: per-row LSE over lower-labelled pairs, then d loss / d t per row."""
    wd = work_dtype(x.dtype)
    sim, backward = pair_similarity(x.to(wd), y.to(wd), similarity)
    t = (sim * scale).contiguous()
    lab = labels.to(device=x.device, dtype=torch.float64).contiguous()
    n = t.shape[0]
    acc = acc_type(x.dtype)
    bm, bn = (16, 16) if is_interpreted() else pair_block(x.dtype)
    m = torch.empty_like(t)
    s = torch.empty_like(t)
    pair_lse_kernel[(triton.cdiv(n, bm),)](t, lab, m, s, n, BM=bm, BN=bn, ACC=acc)
    # log(1 + sum_i s_i e^{m_i}): rows without a lower-labelled pair have m = -inf and drop out.
    loss = torch.logsumexp(torch.cat([t.new_zeros(1), m + s.log()]), 0)
    if not compute_grad:
        return no_grads(loss, x)
    dt = torch.empty_like(t)
    pair_grad_kernel[(triton.cdiv(n, bm),)](t, lab, loss.reshape(1), dt, n, BM=bm, BN=bn, ACC=acc)
    dx, dy = backward(dt * scale)
    return loss, dx.to(x.dtype), dy.to(x.dtype), torch.dot(dt, sim)  # d loss / d scale = sum_k dt_k sim_k


def cosent_forward(x: Tensor, y: Tensor, labels: Tensor, scale: float, similarity: int, compute_grad: bool):
    if cosent_strategy(x.shape[0]) == "tiled":
        return cosent_tiled(x, y, labels, scale, similarity, compute_grad)
    return cosent_sorted(x, y, labels, scale, similarity, compute_grad)
