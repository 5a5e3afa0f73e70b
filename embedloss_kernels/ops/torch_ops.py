"""The ``torch`` backend: the row-block algorithm of docs/DESIGN.md in plain PyTorch, on any device.

Reads top to bottom: normalization helpers -> InfoNCE row-block forward (loss and gradients together) ->
CoSENT sorted forward -> registered ops (``embedloss_torch::infonce``, ``embedloss_torch::cosent``) with their
fake implementations and autograd.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import (
    COSENT_SCHEMA,
    DOC_TO_DOC,
    DOC_TO_QUERY,
    EPS,
    HARDNESS_ALL,
    HARDNESS_HARD,
    HARDNESS_IN_BATCH,
    HARDNESS_NONE,
    INFONCE_SCHEMA,
    QUERY_TO_QUERY,
    SIM_ANGLE,
    SIM_COSINE,
    _blocked,
)
from .autograd import _saved_grads_are_released, _scaled

DEFAULT_BLOCK_MIB = 32.0


def why_not(device: torch.device) -> str | None:
    return None  # plain PyTorch runs wherever torch does


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, LSE and softmax precision: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_budget_bytes() -> float:
    """Memory for one row block's logits (``EMBEDLOSS_BLOCK_MIB``, default 32 MiB); a value that is not a positive
    number raises ``ValueError`` naming the variable (every backend's automatic block size reads it)."""
    raw = os.environ.get("EMBEDLOSS_BLOCK_MIB", "").strip()
    if not raw:
        return DEFAULT_BLOCK_MIB * 2**20
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    if not mib > 0 or mib == float("inf"):
        raise ValueError(f"EMBEDLOSS_BLOCK_MIB must be a positive number of MiB, got {raw!r}")
    return mib * 2**20


def normalize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x / max(||x||, EPS)`` and the clamped norms (n, 1), as ``F.normalize``."""
    norm = x.norm(dim=1, keepdim=True).clamp_min_(EPS)
    return x / norm, norm


def normalize_rows_backward(x_hat: Tensor, norm: Tensor, grad_hat: Tensor) -> Tensor:
    """Map d/dx_hat back to d/dx: ``(g - x_hat <x_hat, g>) / ||x||``; rows clamped at EPS get ``g / EPS``."""
    radial = (x_hat * grad_hat).sum(dim=1, keepdim=True)
    radial = radial.masked_fill_(norm <= EPS, 0.0)
    return grad_hat.addcmul(x_hat, radial, value=-1.0).div_(norm)


def scale_grad_from_radial(x: Tensor, dx: Tensor, y: Tensor, dy: Tensor, scale: float) -> Tensor:
    """d loss / d scale of a loss of the logits ``s * <x_i, y_j>`` (plus stop-gradient terms), from the gradients
    ``dx``, ``dy`` with respect to the vectors that entered the products (the normalized ones under cosine, before
    the normalization's backward): every logit's ``d/ds = sim`` reaches both of its vectors as ``s * G * sim``, so
    ``sum <x, dx> + sum <y, dy> = 2 s sum(G * sim) = 2 s dL/ds``. ``scale`` must not be 0 (callers route it to the
    direct computation)."""
    radial = torch.vdot(x.reshape(-1), dx.reshape(-1)) + torch.vdot(y.reshape(-1), dy.reshape(-1))
    return radial / (2.0 * scale)


def no_grads(loss: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's outputs without gradients: three distinct empty tensors (outputs of an op must not alias)."""
    return loss, like.new_empty((0,)), like.new_empty((0,)), loss.new_empty((0,))


# ----------------------------------------------------------------------------------------------------------------
# InfoNCE / MNRL
# ----------------------------------------------------------------------------------------------------------------
def _auto_block_rows(columns: int, elem: int) -> int:
    # A block's logits are transformed in place, but the joint LSE's shifted exponentials and the matmul
    # temporaries add about three more buffers of the same size: four in all stay inside the budget.
    return max(1, int(block_budget_bytes() // (4 * elem * max(columns, 1))))


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
    ring schedule (``embedloss_kernels.ring``).
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
    use_qq = bool(directions & QUERY_TO_QUERY)
    use_dq = bool(directions & DOC_TO_QUERY)
    use_dd = bool(directions & DOC_TO_DOC)
    n_blocks = 1 + use_qq + use_dq + use_dd
    alpha = hardness_strength if hardness_mode != HARDNESS_NONE else 0.0

    width = a.shape[0] * (1 + use_dd) + bq * (use_qq + use_dq)
    rows_per_block = block_rows if block_rows > 0 else _auto_block_rows(width, torch.finfo(wd).bits // 8)
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
    rows_per_block = block_rows if block_rows > 0 else _blocked.block_rows(row_count, width, per_logit, q.device)
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


# ----------------------------------------------------------------------------------------------------------------
# CoSENT / AnglE
# ----------------------------------------------------------------------------------------------------------------
def _swap_halves(x: Tensor, sign_first: float) -> Tensor:
    """``[sign_first * x_im, -sign_first * x_re]``: d/dx of the AnglE sine term, up to the partner's factor."""
    re, im = x.chunk(2, dim=1)
    return torch.cat([sign_first * im, -sign_first * re], dim=1)


def pair_similarity(x: Tensor, y: Tensor, similarity: int):
    """Row-wise similarity of ``x``, ``y`` (work dtype) and a function mapping d loss / d sim back to (d x, d y).
    Row-local: callers may apply it to any slice of rows."""
    d = x.shape[1]
    if similarity == SIM_ANGLE and d % 2:
        x, y = torch.nn.functional.pad(x, (0, 1)), torch.nn.functional.pad(y, (0, 1))
    if similarity in (SIM_COSINE, SIM_ANGLE):
        x, x_norm = normalize_rows(x)
        y, y_norm = normalize_rows(y)
    if similarity == SIM_ANGLE:
        y_rot = y + _swap_halves(y, -1.0)
        z = (x * y_rot).sum(1)  # cos + sin
        sim = z.abs()
    else:
        sim = (x * y).sum(1)

    def backward(dsim: Tensor) -> tuple[Tensor, Tensor]:
        if similarity == SIM_ANGLE:
            dz = (dsim * z.sign())[:, None]
            dx, dy = dz * y_rot, dz * (x + _swap_halves(x, 1.0))
        else:
            dx, dy = dsim[:, None] * y, dsim[:, None] * x
        if similarity in (SIM_COSINE, SIM_ANGLE):
            dx = normalize_rows_backward(x, x_norm, dx)[:, :d]
            dy = normalize_rows_backward(y, y_norm, dy)[:, :d]
        return dx, dy

    return sim, backward


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


# ----------------------------------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------------------------------
_lib = torch.library.Library("embedloss_torch", "DEF")
_lib.define("infonce" + INFONCE_SCHEMA)
_lib.define("cosent" + COSENT_SCHEMA)
torch.library.impl("embedloss_torch::infonce", "CompositeExplicitAutograd", lib=_lib)(infonce_forward)
torch.library.impl("embedloss_torch::cosent", "CompositeExplicitAutograd", lib=_lib)(cosent_forward)


def _loss_and_grads_fake(first: Tensor, second: Tensor, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss = first.new_empty((), dtype=work_dtype(first.dtype))
    if not compute_grad:
        return no_grads(loss, first)
    return loss, torch.empty_like(first), torch.empty_like(second), torch.empty_like(loss)


def register_fakes(namespace: str, lib=None) -> None:
    """Fake (meta) implementations of ``<namespace>::infonce`` and ``<namespace>::cosent``: every backend's ops
    share the contract's output shapes, so torch.compile traces any of them without a graph break."""

    def infonce_fake(q, a, row_start, row_count, scale, cosine, directions, joint, hardness_mode, hardness_strength,
                     compute_grad, block_rows):
        return _loss_and_grads_fake(q, a, compute_grad)

    def cosent_fake(x, y, labels, scale, similarity, compute_grad):
        return _loss_and_grads_fake(x, y, compute_grad)

    torch.library.register_fake(f"{namespace}::infonce", infonce_fake, lib=lib)
    torch.library.register_fake(f"{namespace}::cosent", cosent_fake, lib=lib)


register_fakes("embedloss_torch", _lib)


def setup_saved_grads(ctx, inputs, output) -> None:
    """Autograd context of a loss-and-grads op: keep the two gradients computed in the forward pass (the gradient
    outputs get no zero-filled gradients in backward)."""
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2])  # (loss, grad_first, grad_second[, grad_scale])


def backward_scaled_grads(ctx, grad_loss, *_output_grads):
    """Backward of a loss-and-grads op: ``grad_output *`` the saved gradients, in place and handed on when the graph
    is released (the rule of :mod:`embedloss_kernels.ops.autograd`); double backward is refused."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "embedloss_kernels losses do not support double backward (create_graph=True): their gradient is "
            "computed in the forward pass. Use embedloss_kernels.reference for higher-order derivatives."
        )
    grad_first, grad_second = ctx.saved_tensors
    if grad_first.numel() == 0 and grad_second.numel() == 0:
        raise RuntimeError("the loss was computed without gradients (compute_grad=False) but backward was called")
    rest = (None,) * (len(ctx.needs_input_grad) - 2)
    if grad_loss is None:
        return (None, None) + rest
    in_place = _saved_grads_are_released(grad_first, grad_second, grad_loss)
    return (_scaled(grad_first, grad_loss, in_place), _scaled(grad_second, grad_loss, in_place)) + rest


torch.library.register_autograd("embedloss_torch::infonce", backward_scaled_grads, setup_context=setup_saved_grads,
                                lib=_lib)
torch.library.register_autograd("embedloss_torch::cosent", backward_scaled_grads, setup_context=setup_saved_grads,
                                lib=_lib)

infonce = torch.ops.embedloss_torch.infonce
cosent = torch.ops.embedloss_torch.cosent
