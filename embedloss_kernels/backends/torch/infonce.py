"""The ``torch`` backend's ``infonce`` (MNRL): the row-block algorithm of docs/DESIGN.md in plain PyTorch, on any
device. Reads top to bottom: the logit blocks of a row block and their gradient products (shared with the ring
schedule, :mod:`embedloss_kernels.distributed.ring`) -> the row-block forward (loss and gradients together) -> the
exact row LSE -> the blocked-product path of the GPU (:mod:`embedloss_kernels.backends.blocked`)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.contract import (
    DOC_TO_DOC,
    DOC_TO_QUERY,
    HARDNESS_ALL,
    HARDNESS_HARD,
    HARDNESS_IN_BATCH,
    HARDNESS_NONE,
    QUERY_TO_DOC,
    QUERY_TO_QUERY,
)
from ...heuristics.blocks import block_rows as gpu_block_rows
from ...heuristics.blocks import budget_rows
from .. import blocked as _blocked
from ..common import no_grads, normalize_rows, normalize_rows_backward, scale_grad_from_radial, work_dtype


def direction_logits(
    q_rows: Tensor,
    p_rows: Tensor | None,
    q_cols: Tensor,
    a_cols: Tensor,
    scale: float,
    directions: int,
    hardness_mode: int,
    alpha: float,
    own_start: int | None,
    sim=None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """The logit blocks of a block of anchor rows against one set of columns: the loss maths of one row block,
    shared by :func:`infonce_forward` (every column at once) and the ring schedule (one rank's columns at a time).

    ``q_rows`` (n, D): the anchors' queries; ``p_rows`` (n, D): their positives (needed for doc_to_query /
    doc_to_doc only); ``q_cols`` (m, D): query columns; ``a_cols`` (K*m, D): their docs ``[P; N_1; ...]``, doc ``c``
    of query column ``j`` at row ``j + c*m``. ``own_start``: the column of the first anchor's own query when the
    anchors' own columns are among these (anchor ``i`` owns query column ``own_start + i`` and docs
    ``own_start + i + c*m``), ``None`` when they are not (a foreign block: nothing is masked; in_batch_negatives and
    all_negatives boost every query_to_doc column, hard_negatives none).

    ``sim(x, y)``: the (unscaled) similarity block of rows ``x`` against columns ``y``; ``x @ y.T`` by default (the
    inputs already normalized); the blocked-product path passes raw 16-bit rows with the norms as vectors.

    Returns the blocks ``{"qd", "qq", "dq", "dd"}`` (those selected; computed in place on the matmul outputs, no
    other (n, columns) buffer) and the positive logits ``s * sim(q_i, p_i)`` (``None`` for a foreign block).
    """
    sim = sim or (lambda x, y: x @ y.T)
    n, m = q_rows.shape[0], q_cols.shape[0]
    n_cols = a_cols.shape[0] // m
    device = q_rows.device
    ar = torch.arange(n, device=device)
    own = None if own_start is None else ar + own_start  # column of each anchor's own query == its positive
    logits = {"qd": sim(q_rows, a_cols)}  # (n, K*m)
    positive = None if own is None else logits["qd"][ar, own] * scale
    if alpha > 0 and own is None:
        logits["qd"].mul_(scale if hardness_mode == HARDNESS_HARD else scale + alpha)
    elif alpha > 0:
        own_cols = own[:, None] + m * torch.arange(n_cols, device=device)  # (n, K) own docs
        if hardness_mode == HARDNESS_HARD:
            hard = own_cols[:, 1:]
            boosted = logits["qd"][ar[:, None], hard] * (scale + alpha)
            logits["qd"].mul_(scale)
            logits["qd"][ar[:, None], hard] = boosted
        else:
            keep = own_cols if hardness_mode == HARDNESS_IN_BATCH else own_cols[:, :1]
            assert hardness_mode in (HARDNESS_IN_BATCH, HARDNESS_ALL)
            plain = logits["qd"][ar[:, None], keep] * scale
            logits["qd"].mul_(scale + alpha)
            logits["qd"][ar[:, None], keep] = plain
    else:
        logits["qd"].mul_(scale)
    if directions & QUERY_TO_QUERY:
        logits["qq"] = sim(q_rows, q_cols).mul_(scale)
        if own is not None:
            logits["qq"][ar, own] = float("-inf")
    if directions & DOC_TO_QUERY:
        logits["dq"] = sim(p_rows, q_cols).mul_(scale)
    if directions & DOC_TO_DOC:
        logits["dd"] = sim(p_rows, a_cols).mul_(scale)
        if own is not None:
            logits["dd"][ar[:, None], own[:, None] + m * torch.arange(n_cols, device=device)] = float("-inf")
    return logits, positive


def accumulate_block_grads(
    g: dict[str, Tensor],
    q_rows: Tensor,
    p_rows: Tensor | None,
    q_cols: Tensor,
    a_cols: Tensor,
    dq_rows: Tensor,
    dp_rows: Tensor,
    dq_cols: Tensor,
    da_cols: Tensor,
) -> None:
    """The matmuls of one row block: ``g`` holds d loss / d sim per block of :func:`direction_logits` (same keys and
    shapes); adds the anchors' gradients to ``dq_rows`` / ``dp_rows`` and the columns' to ``dq_cols`` / ``da_cols``
    (which may be the same storage as the row gradients)."""
    dq_rows += g["qd"] @ a_cols
    da_cols += g["qd"].T @ q_rows
    if "qq" in g:
        dq_rows += g["qq"] @ q_cols
        dq_cols += g["qq"].T @ q_rows
    if "dq" in g:
        dp_rows += g["dq"] @ q_cols
        dq_cols += g["dq"].T @ p_rows
    if "dd" in g:
        dp_rows += g["dd"] @ a_cols
        da_cols += g["dd"].T @ p_rows


def infonce_forward(
    q: Tensor,
    a: Tensor,
    row_start: int,
    row_count: int,
    scale: float,
    cosine: bool,
    directions: int,
    joint: bool,
    hardness_mode: int,
    hardness_strength: float,
    compute_grad: bool,
    block_rows: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and (when ``compute_grad``) d loss / d q, d loss / d a, d loss / d scale, one row block of anchors at a
    time.

    Per block of anchor rows ``g`` (global indices), with ``Q``, ``A`` the (normalized) queries and candidates
    and ``P = A[:Bq]`` the positives::

        L_qd = s * Q_g A^T (+ alpha * sg(Q_g A^T) on penalized columns)   (R, C)
        L_qq = s * Q_g Q^T, column g masked                               (R, Bq)
        L_dq = s * P_g Q^T                                                (R, Bq)
        L_dd = s * P_g A^T, columns g + c*Bq masked                       (R, C)
        loss_g = LSE(blocks) - L_qd[g, g]       (joint; per_direction: mean of per-block LSEs)
        G = (softmax - onehot(positive)) / row_count;  d sim = s * G  (the penalty is stop-gradient)
        dQ_g += s G_qd A + s G_qq Q;  dA += s G_qd^T Q_g + s G_dd^T P_g;  dP_g += s G_dq Q + s G_dd A;
        dQ += s G_qq^T Q_g + s G_dq^T P_g

    The logit blocks are :func:`direction_logits` and the matmuls :func:`accumulate_block_grads`, shared with the
    ring schedule (``embedloss_kernels.ring``). query_to_doc | doc_to_query over every row, without a penalty, with
    the gradient (CLIP, MNSRL) takes :func:`_infonce_symmetric` instead: 4 products per block, not 6.
    """
    if _blocked.use_blocked(q):
        return _infonce_blocked(q, a, row_start, row_count, scale, cosine, directions, joint, hardness_mode,
                                hardness_strength, compute_grad, block_rows)
    out_dtype = q.dtype
    wd = work_dtype(q.dtype)
    bq = q.shape[0]
    qf, af = q.to(wd), a.to(wd)
    if cosine:
        qf, q_norm = normalize_rows(qf)
        af, a_norm = normalize_rows(af)
    alpha = hardness_strength if hardness_mode != HARDNESS_NONE else 0.0
    if symmetric_applies(directions, alpha, compute_grad, row_start, row_count, bq):
        loss, dq, da = _infonce_symmetric(qf, af, scale, joint, block_rows)
        grad_scale = scale_grad_from_radial(qf, dq, af, da, scale)
        if cosine:
            dq = normalize_rows_backward(qf, q_norm, dq)
            da = normalize_rows_backward(af, a_norm, da)
        return loss, dq.to(out_dtype), da.to(out_dtype), grad_scale
    use_qq = bool(directions & QUERY_TO_QUERY)
    use_dq = bool(directions & DOC_TO_QUERY)
    use_dd = bool(directions & DOC_TO_DOC)
    n_blocks = 1 + use_qq + use_dq + use_dd

    width = a.shape[0] * (1 + use_dd) + bq * (use_qq + use_dq)
    # the logits are transformed in place, but the joint LSE's shifted exponentials and the matmul temporaries add
    # about three more buffers of the same size: four in all stay inside the budget
    rows_per_block = block_rows if block_rows > 0 else budget_rows(width, torch.finfo(wd).bits // 8, 4)
    dq = torch.zeros_like(qf) if compute_grad else None
    da = torch.zeros_like(af) if compute_grad else None
    loss_sum = torch.zeros((), dtype=wd, device=q.device)
    inv_rows = 1.0 / row_count

    for r0 in range(row_start, row_start + row_count, rows_per_block):
        r1 = min(r0 + rows_per_block, row_start + row_count)
        n = r1 - r0
        ar = torch.arange(n, device=q.device)
        own = ar + r0  # global index of each anchor row == its positive's column
        q_blk = qf[r0:r1]
        p_blk = af[r0:r1] if (use_dq or use_dd) else None

        logits, positive = direction_logits(q_blk, p_blk, qf, af, scale, directions, hardness_mode, alpha, r0)

        # -- exact row LSE; the blocks become exp(L - max) in place, reused as the softmax numerators --
        sums, lse_mean = row_block_lse(logits, joint)
        loss_sum += (lse_mean - positive).sum()
        if not compute_grad:
            continue

        # -- G = softmax - onehot, scaled by s / row_count; then the three matmuls --
        weight = scale * inv_rows / (1 if joint else n_blocks)
        for key, blk in logits.items():
            blk.mul_((weight / sums[key])[:, None])
        logits["qd"][ar, own] -= scale * inv_rows
        accumulate_block_grads(logits, q_blk, p_blk, qf, af, dq[r0:r1], da[r0:r1], dq, da)

    loss = loss_sum * inv_rows
    if not compute_grad:
        return no_grads(loss, q)
    grad_scale = scale_grad_from_radial(qf, dq, af, da, scale)
    if cosine:
        dq = normalize_rows_backward(qf, q_norm, dq)
        da = normalize_rows_backward(af, a_norm, da)
    return loss, dq.to(out_dtype), da.to(out_dtype), grad_scale


def symmetric_applies(directions: int, alpha: float, compute_grad: bool, row_start: int, row_count: int,
                      bq: int) -> bool:
    """Whether :func:`_infonce_symmetric` computes the op: directions exactly query_to_doc | doc_to_query (CLIP,
    MNSRL), no hardness penalty, the gradient wanted, every row local (the columns' LSEs need every row)."""
    return (directions == QUERY_TO_DOC | DOC_TO_QUERY and not alpha > 0 and compute_grad and row_start == 0
            and row_count == bq)


# Shifted logits (<= 0, shifted by their row's or column's max) below this count as exactly 0: exp(-60) = 8.8e-27
# of the max term, whose sum is >= 1, so dropping them changes no sum by more than columns * 8.8e-27 (far below
# float64's round-off) and no gradient entry by more than that fraction of its row's. It keeps the vectorized exp on
# its fast path: arguments in the thousands (raw dot products) ran ~10x slower and took most of this path's time,
# and exp's subnormal results, scaled by the softmax weights, would reach the gradient products (BLAS on subnormal
# operands ran ~100x slower).
EXP_CUT = -60.0


def _exp_shifted_(x: Tensor) -> Tensor:
    """``exp`` in place of shifted logits, 0 below :data:`EXP_CUT`."""
    return torch.nn.functional.threshold_(x, EXP_CUT, float("-inf")).exp_()


def _infonce_symmetric(qf: Tensor, af: Tensor, scale: float, joint: bool, block_rows: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """query_to_doc | doc_to_query in two passes over row blocks and four products instead of six (the C++ kernel's
    ``infonce_sym_blocks`` does the same). ``qf`` (Bq, D), ``af`` (K*Bq, D): the work-dtype rows (normalized under
    cosine). Returns the loss and the gradients of ``qf`` and ``af``.

    ``L_dq[j, i] = S[i, j]`` for ``S = s Q A^T`` and ``i, j < Bq``: doc ``j``'s doc_to_query row is column ``j`` of
    the positive block. With ``r_i`` the LSE of row ``i`` of ``S`` and ``c_j`` that of column ``j < Bq``::

        per_direction: a = r, b = c, w = 1/2;   loss = mean_i ((r_i + c_i) / 2 - S_ii)
        joint:         a = b = J = logaddexp(r, c), w = 1;   loss = mean_i (J_i - S_ii)
        G_ij = (w exp(S_ij - a_i) + [j < Bq] w exp(S_ij - b_j) - [i == j]) / Bq;   d sim = s G

    Pass 1 (one product per block): the rows' max and sum of exp, and the columns' running max and sum of exp
    merged across blocks. Pass 2 (three products per block): ``S`` again, ``G`` in place (each exp shifted by the
    exact max of its row or column, the normalization a multiplier), ``dQ_g += s G A``, ``dA += s G^T Q_g``.
    """
    bq, cols = qf.shape[0], af.shape[0]
    wd, device = qf.dtype, qf.device
    # the logits and the positive block's exponentials: no other block-sized buffer (the products write into them)
    rows = block_rows if block_rows > 0 else budget_rows(cols + bq, torch.finfo(wd).bits // 8, 4)
    rows = min(rows, bq)
    buf = torch.empty((rows, cols), dtype=wd, device=device)
    tmp = torch.empty((rows, bq), dtype=wd, device=device)
    row_max = torch.empty(bq, dtype=wd, device=device)
    row_sum = torch.empty(bq, dtype=wd, device=device)
    positive = torch.empty(bq, dtype=wd, device=device)
    col_max = torch.full((bq,), float("-inf"), dtype=wd, device=device)
    col_sum = torch.zeros(bq, dtype=torch.float64, device=device)

    # -- pass 1: row and column statistics --
    for r0 in range(0, bq, rows):
        r1 = min(r0 + rows, bq)
        ar = torch.arange(r1 - r0, device=device)
        s_blk = buf[: r1 - r0].addmm_(qf[r0:r1], af.T, beta=0.0, alpha=scale)  # beta 0: buf's contents unread
        positive[r0:r1] = s_blk[ar, ar + r0]
        pos_block = s_blk[:, :bq]
        new_max = torch.maximum(col_max, pos_block.amax(0))
        col_sum.mul_((col_max - new_max).double().exp_())  # exp(-inf) = 0 on the first block
        col_max = new_max
        col_sum += _exp_shifted_(torch.sub(pos_block, new_max, out=tmp[: r1 - r0])).sum(0).double()
        m = s_blk.amax(1)
        row_max[r0:r1] = m
        row_sum[r0:r1] = _exp_shifted_(s_blk.sub_(m[:, None])).sum(1)

    # -- the loss, and the multipliers of pass 2: w exp(S - a) = coef * exp(S - max) --
    r = row_max.double() + row_sum.double().log()
    c = col_max.double() + col_sum.log()
    if joint:
        a = b = torch.logaddexp(r, c)
        loss_rows, w = a - positive.double(), 1.0
    else:
        a, b = r, c
        loss_rows, w = 0.5 * (r + c) - positive.double(), 0.5
    f = scale / bq
    row_coef = (f * w * (row_max.double() - a).exp()).to(wd)
    col_coef = (f * w * (col_max.double() - b).exp()).to(wd)
    loss = (loss_rows.sum() / bq).to(wd)

    # -- pass 2: s G in place, then the two gradient products --
    dq, da = torch.zeros_like(qf), torch.zeros_like(af)
    for r0 in range(0, bq, rows):
        r1 = min(r0 + rows, bq)
        ar = torch.arange(r1 - r0, device=device)
        q_blk = qf[r0:r1]
        h = buf[: r1 - r0].addmm_(q_blk, af.T, beta=0.0, alpha=scale)
        col_part = _exp_shifted_(torch.sub(h[:, :bq], col_max, out=tmp[: r1 - r0]))
        _exp_shifted_(h.sub_(row_max[r0:r1, None])).mul_(row_coef[r0:r1, None])
        h[:, :bq].addcmul_(col_part, col_coef)
        h[ar, ar + r0] -= f
        dq[r0:r1].addmm_(h, af)
        da.addmm_(h.T, q_blk)
    return loss, dq, da


def row_block_lse(logits: dict[str, Tensor], joint: bool) -> tuple[dict[str, Tensor], Tensor]:
    """Exact row LSE of a block's logit blocks, which become ``exp(L - max)`` in place: returns the per-block sums
    (the softmax denominators; the joint sum for every block when ``joint``) and the mean LSE of each row."""
    if joint:
        row_max = torch.stack([blk.amax(dim=1) for blk in logits.values()]).amax(0)
        maxes = dict.fromkeys(logits, row_max)
    else:
        maxes = {k: blk.amax(dim=1) for k, blk in logits.items()}
    sums = {k: blk.sub_(maxes[k][:, None]).exp_().sum(1) for k, blk in logits.items()}
    if joint:
        total = sum(sums.values())
        return dict.fromkeys(logits, total), row_max + total.log()
    return sums, sum(maxes[k] + sums[k].log() for k in logits) / len(logits)


def _infonce_blocked(q: Tensor, a: Tensor, row_start: int, row_count: int, scale: float, cosine: bool,
                     directions: int, joint: bool, hardness_mode: int, hardness_strength: float, compute_grad: bool,
                     block_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The row-block algorithm on raw inputs (the GPU path, ``_blocked``): logits from products in the input dtype
    with fp32 outputs and the inverse norms as vectors, ``G~`` in the input dtype, fp32 accumulators."""
    q, a = q.contiguous(), a.contiguous()
    rq, ra = _blocked.inv_norms(q, cosine), _blocked.inv_norms(a, cosine)
    q, a, rq, ra, cq, ca = _blocked.shorten_long_rows(q, a, rq, ra, cosine)
    use_qq, use_dq, use_dd = (bool(directions & bit) for bit in (QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC))
    n_blocks = 1 + use_qq + use_dq + use_dd
    alpha = hardness_strength if hardness_mode != HARDNESS_NONE else 0.0
    width = a.shape[0] * (1 + use_dd) + q.shape[0] * (use_qq + use_dq)
    # fp32 logits, the exp / mask temporaries of the same size, and the 16-bit G~ copy
    per_logit = 2 * torch.finfo(_blocked.acc_dtype(q.dtype)).bits // 8 + q.element_size()
    rows_per_block = block_rows if block_rows > 0 else gpu_block_rows(row_count, width, per_logit, q.device)
    inv_rows = 1.0 / row_count
    grads = _blocked.BlockGrads(q, a, rq, ra, directions, cosine, scale * inv_rows) if compute_grad else None
    loss_sum = torch.zeros((), dtype=_blocked.acc_dtype(q.dtype), device=q.device)

    for r0 in range(row_start, row_start + row_count, rows_per_block):
        r1 = min(r0 + rows_per_block, row_start + row_count)
        ar = torch.arange(r1 - r0, device=q.device)
        q_blk, p_blk = q[r0:r1], (a[r0:r1] if (use_dq or use_dd) else None)
        inv = {id(q): rq, id(a): ra, id(q_blk): rq[r0:r1]}
        if p_blk is not None:
            inv[id(p_blk)] = ra[r0:r1]

        def sim(x, y, inv=inv):
            return _blocked.mm_acc(x, y.T).mul_(inv[id(x)][:, None]).mul_(inv[id(y)][None, :])

        logits, positive = direction_logits(q_blk, p_blk, q, a, scale, directions, hardness_mode, alpha, r0, sim)
        sums, lse_mean = row_block_lse(logits, joint)
        loss_sum += (lse_mean - positive).sum()
        if not compute_grad:
            continue
        # G~ = (w * softmax - onehot) * rx * ry in the input dtype; scale / row_count is the products' alpha
        rows_inv = {"qd": rq[r0:r1], "qq": rq[r0:r1], "dq": ra[r0:r1], "dd": ra[r0:r1]}
        cols_inv = {"qd": ra, "qq": rq, "dq": rq, "dd": ra}
        for key, blk in logits.items():
            blk.mul_(((1.0 if joint else 1.0 / n_blocks) / sums[key] * rows_inv[key])[:, None])
            if key == "qd":
                blk[ar, ar + r0] -= rows_inv[key]
            g = blk.mul_(cols_inv[key][None, :]).to(q.dtype)
            del blk
            grads.add(key, r0, r1, g)
        del logits

    loss = loss_sum * inv_rows
    if not compute_grad:
        return no_grads(loss, q)
    dq, da = grads.finish()
    return loss, _blocked.unshorten(dq, cq), _blocked.unshorten(da, ca), grads.scale_grad(scale)


