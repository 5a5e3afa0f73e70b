"""GIST on the ``torch`` backend: ``embedloss_torch::gist`` (contract: ``embedloss_kernels/core/contract.py``).

The row-block algorithm of the InfoNCE op with one more product per block: the guide's similarities of the block,
compared with each row's threshold and turned into a ``-inf`` mask on the model's logits, then dropped. No
normalized copies of the model's inputs are made: every product is taken on the raw rows and scaled by the inverse
norms, and the gradients are accumulated with respect to the normalized rows (times their inverse norms) and mapped
back through the normalization once at the end. The guide's rows are normalized once (forward only, no gradient),
and the candidates tied with (or within rounding of) a row's threshold are decided exactly (``settle_ties_``).
Reads top to bottom: norms -> the guide's ties -> forward (loss and gradients together); the op's registration is
:mod:`embedloss_kernels.ops`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.contract import GIST_ABSOLUTE, GIST_EPS
from ...heuristics.blocks import budget_rows
from ..common import work_dtype


def inverse_norms(x: Tensor) -> tuple[Tensor, Tensor]:
    """``1 / max(||x||, GIST_EPS)`` (the factor ``nn.CosineSimilarity`` divides by) and ``1 / ||x||`` (0 for a zero
    row), both (n,)."""
    norm = torch.linalg.vector_norm(x, dim=1)
    inv_clamped = norm.clamp_min(GIST_EPS).reciprocal_()
    inv_true = torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))
    return inv_clamped, inv_true


def normalization_backward_(x: Tensor, inv_clamped: Tensor, inv_true: Tensor, h: Tensor) -> Tensor:
    """In place on ``h``: d loss / d x from ``h = (d loss / d x_hat) / max(||x||, eps)``, ``x_hat = x / max(||x||,
    eps)`` with the clamp held constant (as ``nn.CosineSimilarity``)::

        dx = h - x <x, h> / (max(||x||, eps) ||x||)        (the radial term is 0 for a zero row)
    """
    radial = (x * h).sum(dim=1).mul_(inv_clamped).mul_(inv_true)
    return h.addcmul_(x, radial[:, None], value=-1.0)


def row_thresholds(t: Tensor, margin_strategy: int, margin: float) -> Tensor:
    """The guide similarity above which a candidate is masked: ``t - margin`` or ``t - |t| * margin``."""
    return t - margin if margin_strategy == GIST_ABSOLUTE else t - t.abs() * margin


# -- the guide's similarities: ties with the threshold -------------------------------------------------------------
# sentence-transformers takes t_i from the same guide matrix as every candidate's similarity (the diagonal of its
# anchor-positive one) and masks strictly (>): a repeated text gives a candidate exactly equal to t_i, kept. A BLAS
# product gives no such guarantee (the same pair of rows can round differently at another position, in another
# product, or swapped), so every backend decides in two steps: the product of the normalized guide rows settles
# every candidate farther than ``tie_band`` from the row's bound, and the few within it (and every t_i) are
# recomputed by :func:`exact_dots`, whose result depends on the two rows only (symmetric, any position/shape/device).
def normalized_guide(x: Tensor) -> Tensor:
    """``x / max(||x||, GIST_EPS)`` (nn.CosineSimilarity's normalization): equal rows give equal rows."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(GIST_EPS)


_EXACT_CHUNK = 1 << 22  # elements of one chunk of products in exact_dots


def exact_dots(x: Tensor, y: Tensor) -> Tensor:
    """``(x * y).sum(1)`` summed in a fixed pairwise tree of elementwise adds (no reduction kernel, whose order may
    depend on the shape or device): the same bits for the same pair of rows, in either order, anywhere. (n,)."""
    n, dim = x.shape
    if dim == 0:
        return x.new_zeros((n,))
    width = 1 << (dim - 1).bit_length()
    out = x.new_empty((n,))
    step = max(1, _EXACT_CHUNK // width)
    for r0 in range(0, n, step):
        prod = x[r0:r0 + step] * y[r0:r0 + step]
        if width != dim:
            prod = torch.nn.functional.pad(prod, (0, width - dim))
        w = width
        while w > 1:
            w //= 2
            prod = prod[:, :w] + prod[:, w:]
        out[r0:r0 + step] = prod[:, 0]
    return out


def tie_band(dim: int, dtype: torch.dtype) -> float:
    """A bound on |product - exact_dots| + rounding for unit rows of ``dim`` coordinates in ``dtype`` (each is within
    (dim + 2) u of the true dot; a reduced-precision fp32 product (tf32, bf16) adds 2^-8 per operand's rounding):
    outside it, the product's decision is the exact one."""
    u = torch.finfo(dtype).eps / 2
    u_in = 2.0 ** -8 if dtype != torch.float64 and torch.get_float32_matmul_precision() != "highest" else 0.0
    return 3.0 * (u_in + (dim + 2) * u)


def settle_ties_(out: Tensor, near: Tensor, x_guide: Tensor, y_guide: Tensor, bound: Tensor) -> Tensor:
    """In place on ``out`` (n, m): ``-inf`` at the entries flagged ``near`` whose exact guide similarity
    (:func:`exact_dots` of the normalized rows) is above the row's bound; the other flagged entries keep their
    logit. (A host sync when anything is flagged; on a GPU, reading the flags is one.)"""
    i, j = near.nonzero(as_tuple=True)
    if i.numel():
        drop = exact_dots(x_guide[i], y_guide[j]) > bound[i]
        out[i[drop], j[drop]] = float("-inf")
    return out


def masked_logits(
    x: Tensor,
    y: Tensor,
    x_guide: Tensor,
    y_guide: Tensor,
    row_factor: Tensor,
    col_inv: Tensor,
    bound: Tensor,
    band: float,
    exempt_start: int | None,
) -> Tensor:
    """One block of logits: ``x @ y.T`` times ``row_factor[i] * col_inv[j]`` (scale and inverse norms), ``-inf``
    where the guide's similarity ``x_guide @ y_guide.T`` (normalized rows) is ``> bound[i]``, except at column
    ``exempt_start + i`` (the row's own positive) when given; entries within ``band`` of the bound are decided by
    :func:`settle_ties_`. (n, m), in x's dtype.

    The guide's product is the one extra product of the block (forward only); the triton backend computes the
    same block in one kernel (``embedloss_kernels/triton/gist_kernels.py``)."""
    diff = (x_guide @ y_guide.T).sub_(bound[:, None])
    mask = diff > band
    near = diff.abs_() <= band
    if exempt_start is not None:
        ar = torch.arange(x.shape[0], device=x.device)
        mask[ar, ar + exempt_start] = False
        near[ar, ar + exempt_start] = False
    logits = (x @ y.T).mul_(row_factor[:, None]).mul_(col_inv).masked_fill_(mask, float("-inf"))
    return settle_ties_(logits, near, x_guide, y_guide, bound)


def gist_forward(
    anchor: Tensor,
    candidates: Tensor,
    anchor_guide: Tensor,
    candidates_guide: Tensor,
    columns: int,
    row_start: int,
    scale: float,
    margin_strategy: int,
    margin: float,
    contrast_anchors: bool,
    contrast_positives: bool,
    compute_grad: bool,
    block_rows: int,
    block_logits=masked_logits,
) -> tuple[Tensor, Tensor, Tensor]:
    """GIST loss and (when ``compute_grad``) d loss / d anchor, d loss / d candidates, one block of anchor rows at a
    time. With ``^`` the cosine-normalized rows, ``'`` the guide's and ``own = row_start + i``::

        t_i = a'^_i . p'^_own;   mask(g) = g > t_i - margin  (or t_i - |t_i| margin), never at the positive
        (t_i and every g near it by exact_dots: a repeated text's g equals t_i exactly, kept)
        L = s * [a^_i C^T | a^_i A^T | p^_own P^T]   masked where mask(the guide's same product)
        loss_i = LSE(L_i) - L_i[own];   G = (softmax - onehot) * s / B
        d a^_i += G_c C^ + G_aa A^;  d C^ += G_c^T a^_i;  d A^ += G_aa^T a^_i
        d p^_own += G_pp P^;  d P^ += G_pp^T p^_own

    ``block_logits``: the function forming one masked block (:func:`masked_logits`; the triton backend passes its
    kernel's launcher), so the loss maths is written once.
    """
    wd, gwd = work_dtype(anchor.dtype), work_dtype(anchor_guide.dtype)
    a, c = anchor.to(wd), candidates.to(wd)
    ag, cg = anchor_guide.to(gwd), candidates_guide.to(gwd)
    b, bw = a.shape[0], c.shape[0] // columns
    p, pg = c[:bw], cg[:bw]
    inv_a, tinv_a = inverse_norms(a)
    inv_c, tinv_c = inverse_norms(c)
    ag, cg = normalized_guide(ag), normalized_guide(cg)
    pg = cg[:bw]
    inv_p = inv_c[:bw]
    # every row's threshold t_i = cos(a'_i, p'_own), in the guide's precision, by the computation that decides
    # every candidate near it (exact_dots): a repeated text ties exactly, as in sentence-transformers
    own_all = slice(row_start, row_start + b)
    t = exact_dots(ag, pg[own_all])
    bounds = row_thresholds(t, margin_strategy, margin)
    band = tie_band(ag.shape[1], gwd)
    s_a, s_p = inv_a * scale, inv_p * scale

    width = c.shape[0] + (b if contrast_anchors else 0) + (bw if contrast_positives else 0)
    # the block's logits (width), the guide product of its largest sub-block and its boolean mask, and the LSE's
    # temporaries: three buffers of the block's width stay inside the budget
    rows_per_block = block_rows if block_rows > 0 else budget_rows(width, torch.finfo(wd).bits // 8, 3)
    ha = torch.zeros_like(a) if compute_grad else None  # d loss / d a^, divided by max(||a||, eps)
    hc = torch.zeros_like(c) if compute_grad else None
    loss_sum = torch.zeros((), dtype=wd, device=a.device)

    for r0 in range(0, b, rows_per_block):
        r1 = min(r0 + rows_per_block, b)
        p0, p1 = row_start + r0, row_start + r1
        ar = torch.arange(r1 - r0, device=a.device)
        own = ar + p0  # the positive's row in the pool
        a_blk, bound = a[r0:r1], bounds[r0:r1]

        # -- the masked blocks: anchor vs the pool (its positive exempt), anchor vs anchors, positive vs positives --
        blocks = [block_logits(a_blk, c, ag[r0:r1], cg, s_a[r0:r1], inv_c, bound, band, p0)]
        positive = blocks[0][ar, own].clone()
        if contrast_anchors:
            blocks.append(block_logits(a_blk, a, ag[r0:r1], ag, s_a[r0:r1], inv_a, bound, band, None))
        if contrast_positives:
            blocks.append(block_logits(p[p0:p1], p, pg[p0:p1], pg, s_p[p0:p1], inv_p, bound, band, None))

        # -- exact row LSE over every block (the positive is never masked, so the max is finite) --
        row_max = torch.stack([blk.amax(dim=1) for blk in blocks]).amax(0)
        total = sum(blk.sub_(row_max[:, None]).exp_().sum(1) for blk in blocks)
        loss_sum += (row_max + total.log() - positive).sum()
        if not compute_grad:
            continue

        # -- G = (softmax - onehot) * s / B, times the rows' and columns' inverse norms; then the products --
        weight = (scale / b) / total
        blocks[0].mul_((weight * inv_a[r0:r1])[:, None])
        blocks[0][ar, own] -= (scale / b) * inv_a[r0:r1]
        ha[r0:r1].addmm_(blocks[0].mul_(inv_c), c)
        hc.addmm_(blocks[0].T, a_blk)
        k = 1
        if contrast_anchors:
            g_aa = blocks[k].mul_((weight * inv_a[r0:r1])[:, None]).mul_(inv_a)
            ha[r0:r1].addmm_(g_aa, a)
            ha.addmm_(g_aa.T, a_blk)
            k += 1
        if contrast_positives:
            g_pp = blocks[k].mul_((weight * inv_p[p0:p1])[:, None]).mul_(inv_p)
            hc[p0:p1].addmm_(g_pp, p)
            hc[:bw].addmm_(g_pp.T, p[p0:p1])
        del blocks

    loss = loss_sum / b
    if not compute_grad:
        return loss, anchor.new_empty((0,)), candidates.new_empty((0,))
    da = normalization_backward_(a, inv_a, tinv_a, ha)
    dc = normalization_backward_(c, inv_c, tinv_c, hc)
    return loss, da.to(anchor.dtype), dc.to(candidates.dtype)
