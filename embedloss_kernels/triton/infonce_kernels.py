"""InfoNCE logit-block kernels: one direction block ``L = c * X_g Y^T`` at a time (``c`` = scale, or scale + alpha on
penalized columns), with its masks, never stored whole.

* :func:`row_lse_kernel`: online row max / sum of ``exp(L - max)`` over column tiles (pass 1, per row).
* :func:`softmax_grad_kernel`: recomputes a row block's tiles and writes ``G = w * exp(L - lse) - onehot`` into a
  bounded (rows x columns) workspace; the launcher turns it into ``dX = G Y`` and ``dY = G^T X`` with matmuls.

Column ``c`` of a block belongs to query ``owner[c] = c % bq`` (``owner_ptr``: an int32 vector the launcher
builds). ``PEN_MODE``: 0 none, 1 boost columns of other queries (in-batch), 2 boost own hard negatives
(``owner[c] == g``, ``c != g``), 3 boost all but the positive ``c == g``. ``MASK_MODE``: 0 none, 1 mask
``c == g`` (query_to_query), 2 mask ``owner[c] == g`` (doc_to_doc).
"""

import triton
import triton.language as tl


@triton.jit
def _own(owner_ptr, rows, cols, col_ok):
    """(BM, BN): column ``c`` is one of row ``g``'s own docs (``c % bq == g``). The owner index is read from a
    precomputed int32 vector: an integer modulo by a runtime divisor in the tile costs registers (it spilled)."""
    owner = tl.load(owner_ptr + cols, mask=col_ok, other=-1)
    return owner[None, :] == rows[:, None]


@triton.jit
def _logit_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, owner_ptr, scale, boost,
                PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                PREC: tl.constexpr):
    """The (BM, BN) tile of logits, masked entries at -inf; D is walked in BK chunks padded with zeros."""
    ks = tl.arange(0, BK)
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=ACC)
    for k0 in range(0, n_dim, BK):
        k_ok = (k0 + ks) < n_dim
        xt = tl.load(x_ptr + rows[:, None] * stride_x + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        yt = tl.load(y_ptr + cols[:, None] * stride_y + (k0 + ks)[None, :], mask=col_ok[:, None] & k_ok[None, :],
                     other=0.0)
        if PREC == "upcast":  # the interpreter's bf16 dot is wrong: multiply in the accumulator type instead
            acc += tl.dot(xt.to(ACC), tl.trans(yt.to(ACC)), out_dtype=ACC)
        else:
            acc += tl.dot(xt, tl.trans(yt), input_precision=PREC, out_dtype=ACC)
    pos = cols[None, :] == rows[:, None]
    if PEN_MODE == 1:
        coef = tl.where(_own(owner_ptr, rows, cols, col_ok), scale, scale + boost)
    elif PEN_MODE == 2:
        coef = tl.where(_own(owner_ptr, rows, cols, col_ok) & (~pos), scale + boost, scale)
    elif PEN_MODE == 3:
        coef = tl.where(pos, scale, scale + boost)
    else:
        coef = tl.zeros_like(acc) + scale
    logits = acc * coef
    valid = row_ok[:, None] & col_ok[None, :]
    if MASK_MODE == 1:
        valid = valid & (~pos)
    elif MASK_MODE == 2:
        valid = valid & (~_own(owner_ptr, rows, cols, col_ok))
    return tl.where(valid, logits, float("-inf"))


@triton.jit
def row_lse_kernel(x_ptr, y_ptr, max_ptr, sum_ptr, pos_ptr, row_start, row_count, n_cols, n_dim, stride_x, stride_y,
                   owner_ptr, scale, boost, PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Per local row: running max and sum of ``exp(L - max)`` over every column tile (the max is subtracted
    before exponentiating, so scale 100 on large-norm dot products cannot overflow). Also stores the logit at column
    ``g`` (the positive, read off the same tile so that a lone column gives an exact zero loss)."""
    local = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = local < row_count
    rows = row_start + local
    m = tl.full((BM,), float("-inf"), dtype=ACC)
    s = tl.zeros((BM,), dtype=ACC)
    p = tl.zeros((BM,), dtype=ACC)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        col_ok = cols < n_cols
        lg = _logit_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, owner_ptr, scale, boost,
                         PEN_MODE, MASK_MODE, BK, ACC, PREC)
        m_new = tl.maximum(m, tl.max(lg, axis=1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile so far: keep exp finite
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(lg - safe[:, None]), axis=1)
        m = m_new
        p += tl.sum(tl.where((cols[None, :] == rows[:, None]) & (lg > float("-inf")), lg, 0.0), axis=1)
    tl.store(max_ptr + local, m, mask=row_ok)
    tl.store(sum_ptr + local, s, mask=row_ok)
    tl.store(pos_ptr + local, p, mask=row_ok)


@triton.jit
def softmax_grad_kernel(x_ptr, y_ptr, lse_ptr, g_ptr, row_start, row_count, n_cols, n_dim, stride_x, stride_y,
                        stride_g, owner_ptr, scale, boost, weight, onehot, PEN_MODE: tl.constexpr,
                        MASK_MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        ACC: tl.constexpr, PREC: tl.constexpr):
    """``G[i, c] = weight * exp(L[i, c] - lse[i]) - onehot * [c == g_i]`` for one tile of the row block."""
    local = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok = local < row_count
    col_ok = cols < n_cols
    rows = row_start + local
    lg = _logit_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, owner_ptr, scale, boost,
                     PEN_MODE, MASK_MODE, BK, ACC, PREC)
    lse = tl.load(lse_ptr + local, mask=row_ok, other=0.0)
    g = weight * tl.exp(lg - lse[:, None])
    g = tl.where(cols[None, :] == rows[:, None], g - onehot, g)
    tl.store(g_ptr + local[:, None] * stride_g + cols[None, :], g, mask=row_ok[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------------------------------------------------
# Flash-style strategy (small D): no workspace; the gradient products are accumulated on chip from recomputed tiles.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _grad_tile(x_ptr, y_ptr, lse_ptr, local, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, owner_ptr, scale,
               boost, weight, onehot, PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr, BK: tl.constexpr,
               ACC: tl.constexpr, PREC: tl.constexpr):
    """``G = weight * exp(L - lse) - onehot * [c == g]`` for one (BM, BN) tile; zero outside the block."""
    lg = _logit_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, owner_ptr, scale, boost,
                     PEN_MODE, MASK_MODE, BK, ACC, PREC)
    lse = tl.load(lse_ptr + local, mask=row_ok, other=0.0)
    g = weight * tl.exp(lg - lse[:, None])
    g = tl.where(cols[None, :] == rows[:, None], g - onehot, g)
    return tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)


@triton.jit
def _mm(a, b, ACC: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with fp32/fp64 accumulation; G (``a``) is cast to ``b``'s type for the tensor cores."""
    if PREC == "upcast":
        return tl.dot(a.to(ACC), b.to(ACC), out_dtype=ACC)
    return tl.dot(a.to(b.dtype), b, input_precision=PREC, out_dtype=ACC)


@triton.jit
def flash_dx_kernel(x_ptr, y_ptr, lse_ptr, dx_ptr, row_start, row_count, n_cols, n_dim, stride_x, stride_y,
                    stride_dx, owner_ptr, scale, boost, weight, onehot, PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Row-parallel: ``dX[rows] = G Y`` over every column tile, the (BM, BK >= D) accumulator in registers."""
    local = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = local < row_count
    rows = row_start + local
    ks = tl.arange(0, BK)
    k_ok = ks < n_dim
    acc = tl.zeros((BM, BK), dtype=ACC)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        col_ok = cols < n_cols
        g = _grad_tile(x_ptr, y_ptr, lse_ptr, local, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, owner_ptr,
                       scale, boost, weight, onehot, PEN_MODE, MASK_MODE, BK, ACC, PREC)
        yt = tl.load(y_ptr + cols[:, None] * stride_y + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _mm(g, yt, ACC, PREC)
    tl.store(dx_ptr + local[:, None] * stride_dx + ks[None, :], acc, mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def flash_dy_kernel(x_ptr, y_ptr, lse_ptr, dy_ptr, row_start, row_count, n_cols, n_dim, stride_x, stride_y,
                    stride_dy, owner_ptr, scale, boost, weight, onehot, PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Column-parallel: ``dY[cols] = G^T X[rows]`` over every row tile; each program owns its columns, so the loop
    order swap needs no atomics."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < n_cols
    ks = tl.arange(0, BK)
    k_ok = ks < n_dim
    acc = tl.zeros((BN, BK), dtype=ACC)
    for r0 in range(0, row_count, BM):
        local = r0 + tl.arange(0, BM)
        row_ok = local < row_count
        rows = row_start + local
        g = _grad_tile(x_ptr, y_ptr, lse_ptr, local, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, owner_ptr,
                       scale, boost, weight, onehot, PEN_MODE, MASK_MODE, BK, ACC, PREC)
        xt = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _mm(tl.trans(g), xt, ACC, PREC)
    tl.store(dy_ptr + cols[:, None] * stride_dy + ks[None, :], acc, mask=col_ok[:, None] & k_ok[None, :])
