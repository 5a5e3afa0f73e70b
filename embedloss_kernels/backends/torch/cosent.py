"""The ``torch`` backend's ``cosent`` (CoSENT / AnglE): the sorted O(B log B) algorithm, no B x B tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import blocked as _blocked
from ..common import no_grads, pair_similarity, work_dtype


def cosent_forward(
    x: Tensor, y: Tensor, labels: Tensor, scale: float, similarity: int, compute_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """CoSENT in O(B log B) with its gradient, no B x B tensor.

    Sorted by label, with ``t = scale * sim`` and ``Z = 1 + sum_{y_i > y_j} exp(t_j - t_i)``::

        loss = log Z
        d loss / d t_k = [exp(t_k) * sum_{i: y_i > y_k} exp(-t_i) - exp(-t_k) * sum_{j: y_j < y_k} exp(t_j)] / Z

    Both sums are a suffix / prefix ``logcumsumexp`` read at the ends of ``k``'s tie group. The similarity and its
    backward are row-local: on the GPU path (``_blocked``) they run a few rows at a time (upcast, normalized and
    mapped back per slice), so nothing but (B,) vectors and the gradients is as large as the inputs.
    """
    wd = work_dtype(x.dtype)
    step = max(1, _blocked.FINISH_ELEMS // max(x.shape[1], 1)) if _blocked.use_blocked(x) else max(x.shape[0], 1)
    chunks = [(r0, min(r0 + step, x.shape[0])) for r0 in range(0, x.shape[0], step)]
    sim = torch.empty(x.shape[0], dtype=wd, device=x.device)
    for r0, r1 in chunks:
        sim[r0:r1] = pair_similarity(x[r0:r1].to(wd), y[r0:r1].to(wd), similarity)[0]
    t = sim * scale

    sorted_labels, order = labels.to(torch.float64).sort()
    ts = t[order]
    neg_inf = ts.new_full((1,), float("-inf"))
    higher_start = torch.searchsorted(sorted_labels, sorted_labels, right=True)
    lower_end = torch.searchsorted(sorted_labels, sorted_labels, right=False)
    suffix = torch.cat([torch.logcumsumexp(-ts.flip(0), 0).flip(0), neg_inf])  # suffix[m] = LSE(-t[m:])
    as_lower = ts + suffix[higher_start]  # log sum_{i: y_i > y_k} exp(t_k - t_i)
    loss = torch.logsumexp(torch.cat([ts.new_zeros(1), as_lower]), 0)
    if not compute_grad:
        return no_grads(loss, x)

    prefix = torch.cat([neg_inf, torch.logcumsumexp(ts, 0)])  # prefix[m] = LSE(t[:m])
    as_higher = prefix[lower_end] - ts  # log sum_{j: y_j < y_k} exp(t_j - t_k)
    dts = (as_lower - loss).exp() - (as_higher - loss).exp()
    grad_scale = torch.dot(dts, sim[order])  # d loss / d scale = sum_k d loss / d t_k * sim_k, direct (any scale)
    dsim = torch.empty_like(dts).scatter_(0, order, dts) * scale  # back to input order
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    for r0, r1 in chunks:
        _, backward = pair_similarity(x[r0:r1].to(wd), y[r0:r1].to(wd), similarity)
        dx[r0:r1], dy[r0:r1] = backward(dsim[r0:r1])
    return loss, dx, dy, grad_scale
