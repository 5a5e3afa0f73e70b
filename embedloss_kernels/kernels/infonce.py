"""InfoNCE logit-block kernels: one direction block ``L = c * rx_i * ry_j * X_g Y^T`` at a time (``c`` = scale, or
scale + alpha on penalized columns; ``rx``, ``ry`` = inverse row norms for cosine, ones for dot), with its masks.
The inputs are read raw: normalization is two vectors applied to the tiles, never a normalized copy.

* :func:`row_lse_kernel`: online row max / sum of ``exp(L - max)`` over column tiles (pass 1, per row).
* :func:`softmax_grad_kernel`: recomputes a row block's tiles and writes ``G~ = (w * exp(L - lse) - onehot) * rx *
  ry`` (as ``(w / sum) * exp(L - max)``: :func:`_grad_from_logits`) into a bounded (rows x columns) workspace in
  the input dtype; the launcher turns it into ``G~ Y`` and ``G~^T X`` with tensor-core matmuls (fp32
  accumulation), already divided by the norms the normalization backward needs.
* :func:`row_pass_kernel`: the gradient-in-forward row block: the launcher computes ``S = X_g Y^T`` (fp32) with
  cuBLAS; this kernel applies scale, norms, masks and hardness, takes the exact LSE, and overwrites ``S`` with
  ``G~`` (16-bit ``G~`` in the first half of each fp32 row), so S is computed once per block.
* :func:`flash_dx_kernel` / :func:`flash_dy_kernel`: small D, no workspace: ``G~ Y`` and ``G~^T X`` accumulated on
  chip from recomputed tiles.

Column ``c`` of a block belongs to query ``owner[c] = c % bq`` (``owner_ptr``: an int32 vector the launcher
builds). ``PEN_MODE``: 0 none, 1 boost columns of other queries (in-batch), 2 boost own hard negatives
(``owner[c] == g``, ``c != g``), 3 boost all but the positive ``c == g``. ``MASK_MODE``: 0 none, 1 mask
``c == g`` (query_to_query), 2 mask ``owner[c] == g`` (doc_to_doc).

``EXP2``: logits are formed in base 2 (``scale`` and ``boost`` arrive multiplied by log2(e), ``exp2`` replaces
``exp``: one multiply fewer per logit). Stored maxima and positives stay in the kernel's units (log2 when ``EXP2``;
the launcher combines them with ``exp2`` / ``log2`` and converts only the loss), and the gradient kernels read the
row's (max, sum), never an LSE: a round trip through natural units (``m * ln 2``, later ``lse * log2(e)``) is
rounded twice, so a row's max logit no longer gave ``exp2(L - lse) == 1`` and a single-candidate row a gradient of
~1e-6 * scale instead of 0; an LSE ``max + log(sum)`` itself is rounded at the max's magnitude (~1e-5 at logit 144),
which a nearly saturated row's ``softmax - 1`` inherits.
float64 keeps ``exp`` (its scalars must not pass through an fp32 log2(e) product).

Float scalars ``(scale, boost, weight, onehot)`` arrive in a small tensor of the work dtype (``params_ptr``), never as
Python floats: a compiled kernel takes a float parameter as fp32, and so does triton 3.9's interpreter even where it
is annotated ``tl.float64``, which rounded a float64 loss's scale, hardness boost and weights to fp32 (1e-8 relative
errors). Four scalar loads per program.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the launcher multiplies scale and boost by it


@triton.jit
def _params(params_ptr):
    """The kernel's float scalars ``(scale, boost, weight, onehot)``, read from a tensor in the work dtype."""
    return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2), tl.load(params_ptr + 3)


@triton.jit
def _own(owner_ptr, rows, cols, col_ok):
    """(BM, BN): column ``c`` is one of row ``g``'s own docs (``c % bq == g``). The owner index is read from a
    precomputed int32 vector: an integer modulo by a runtime divisor in the tile costs registers (it spilled)."""
    owner = tl.load(owner_ptr + cols, mask=col_ok, other=-1)
    return owner[None, :] == rows[:, None]


@triton.jit
def _scale_and_mask(dots, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, owner_ptr, scale, boost, PEN_MODE: tl.constexpr,
                    MASK_MODE: tl.constexpr):
    """Raw dot products (BM, BN) -> logits: per-column coefficient (hardness), inverse norms, masks at -inf."""
    pos = cols[None, :] == rows[:, None]
    if PEN_MODE == 1:
        coef = tl.where(_own(owner_ptr, rows, cols, col_ok), scale, scale + boost)
    elif PEN_MODE == 2:
        coef = tl.where(_own(owner_ptr, rows, cols, col_ok) & (~pos), scale + boost, scale)
    elif PEN_MODE == 3:
        coef = tl.where(pos, scale, scale + boost)
    else:
        coef = scale
    rx = tl.load(rx_ptr + rows, mask=row_ok, other=0.0)  # inverse norms, indexed by global row / column
    ry = tl.load(ry_ptr + cols, mask=col_ok, other=0.0)
    logits = dots * coef * (rx[:, None] * ry[None, :])  # rx * ry commutes: a pair and its transpose (query_to_doc
    # and doc_to_query) get the same logit
    valid = row_ok[:, None] & col_ok[None, :]
    if MASK_MODE == 1:
        valid = valid & (~pos)
    elif MASK_MODE == 2:
        valid = valid & (~_own(owner_ptr, rows, cols, col_ok))
    return tl.where(valid, logits, float("-inf"))


@triton.jit
def dot_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, BK: tl.constexpr, ACC: tl.constexpr,
             PREC: tl.constexpr):
    """(BM, BN) = x[rows] . y[cols]^T in ACC, D walked in BK chunks padded with zeros (also GIST's kernel)."""
    ks = tl.arange(0, BK)
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=ACC)
    for k0 in range(0, n_dim, BK):
        k_ok = (k0 + ks) < n_dim
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + (k0 + ks)[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        yt = tl.load(y_ptr + cols[:, None].to(tl.int64) * stride_y + (k0 + ks)[None, :],
                     mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if PREC == "upcast":  # the interpreter's bf16 dot is wrong: multiply in the accumulator type instead
            acc += tl.dot(xt.to(ACC), tl.trans(yt.to(ACC)), out_dtype=ACC)
        else:
            acc += tl.dot(xt, tl.trans(yt), input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _logit_tile(x_ptr, y_ptr, rx_ptr, ry_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y,
                owner_ptr, scale, boost, PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr, BK: tl.constexpr,
                ACC: tl.constexpr, PREC: tl.constexpr):
    """The (BM, BN) tile of logits, masked entries at -inf; D is walked in BK chunks padded with zeros."""
    acc = dot_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, BK, ACC, PREC)
    return _scale_and_mask(acc, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, owner_ptr, scale, boost, PEN_MODE,
                           MASK_MODE)


@triton.jit
def _exp(x, EXP2: tl.constexpr):
    if EXP2:
        return tl.exp2(x)
    return tl.exp(x)


@triton.jit
def row_lse_kernel(x_ptr, y_ptr, rx_ptr, ry_ptr, max_ptr, sum_ptr, pos_ptr, row_start, row_count, n_cols, n_dim,
                   stride_x, stride_y, owner_ptr, params_ptr,
                   PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, EXP2: tl.constexpr):
    """Per local row: running max and sum of ``exp(L - max)`` over every column tile (the max is subtracted
    before exponentiating, so scale 100 on large-norm dot products cannot overflow). Also stores the logit at column
    ``g`` (the positive, read off the same tile so that a lone column gives an exact zero loss)."""
    scale, boost, _, _ = _params(params_ptr)
    local = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = local < row_count
    rows = row_start + local
    m = tl.full((BM,), float("-inf"), dtype=ACC)
    s = tl.zeros((BM,), dtype=ACC)
    p = tl.zeros((BM,), dtype=ACC)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        col_ok = cols < n_cols
        lg = _logit_tile(x_ptr, y_ptr, rx_ptr, ry_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y,
                         owner_ptr, scale, boost, PEN_MODE, MASK_MODE, BK, ACC, PREC)
        m_new = tl.maximum(m, tl.max(lg, axis=1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile so far: keep exp finite
        s = s * _exp(m - safe, EXP2) + tl.sum(_exp(lg - safe[:, None], EXP2), axis=1)
        m = m_new
        p += tl.sum(tl.where((cols[None, :] == rows[:, None]) & (lg > float("-inf")), lg, 0.0), axis=1)
    tl.store(max_ptr + local, m, mask=row_ok)  # in the logits' units (log2 with EXP2): never converted back
    tl.store(sum_ptr + local, s, mask=row_ok)
    tl.store(pos_ptr + local, p, mask=row_ok)


@triton.jit
def _grouped(pid, n_row_tiles, n_col_tiles, GROUP: tl.constexpr):
    """Grouped launch order: GROUP row tiles sweep the column tiles together, so a column tile read by one program is
    still in L2 for the next GROUP - 1 (the same swizzle as a grouped matmul)."""
    per_group = GROUP * n_col_tiles
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_row_tiles - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def softmax_grad_kernel(x_ptr, y_ptr, rx_ptr, ry_ptr, smax_ptr, wsum_ptr, g_ptr, row_start, row_count, n_cols, n_dim,
                        stride_x, stride_y, stride_g, owner_ptr, params_ptr,
                        PEN_MODE: tl.constexpr,
                        MASK_MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        ACC: tl.constexpr, PREC: tl.constexpr, EXP2: tl.constexpr, GROUP: tl.constexpr):
    """``G~[i, c] = (weight * exp(L[i, c] - lse[i]) - onehot * [c == g_i]) * rx_i * ry_c`` for one tile, stored in
    ``g_ptr``'s dtype (the input's: 16-bit G feeds tensor-core products); the softmax from the row's max and
    ``weight / sum`` (``smax_ptr``, ``wsum_ptr``: the launcher divides, an fp64 division in flash_dx_kernel spilled
    on sm_80)."""
    scale, boost, weight, onehot = _params(params_ptr)
    n_row_tiles = tl.cdiv(row_count, BM)
    tile_m, tile_n = _grouped(tl.program_id(0), n_row_tiles, tl.cdiv(n_cols, BN), GROUP)
    local = tile_m * BM + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    row_ok = local < row_count
    col_ok = cols < n_cols
    rows = row_start + local
    lg = _logit_tile(x_ptr, y_ptr, rx_ptr, ry_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y,
                     owner_ptr, scale, boost, PEN_MODE, MASK_MODE, BK, ACC, PREC)
    smax = tl.load(smax_ptr + local, mask=row_ok, other=0.0)
    wsum = tl.load(wsum_ptr + local, mask=row_ok, other=0.0)
    g = _grad_from_logits(lg, smax, wsum, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, onehot, EXP2)
    tl.store(g_ptr + local[:, None].to(tl.int64) * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_from_logits(lg, smax, wsum, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, onehot, EXP2: tl.constexpr):
    """``(weight * exp(L - lse) - onehot * [c == g]) * rx * ry``, zero outside, with the softmax formed as
    ``(weight / sum) * exp(L - max)`` from the row's max and ``wsum = weight / sum`` (BM,), in the logits' units
    (log2 with ``EXP2``): ``L - max`` is exact at the max (``exp2(0) == 1``: a lone column gives ``1 - onehot ==
    0``) and ``1 / sum`` is rounded once, relative to 1, where ``exp(L - (max + log(sum)))`` inherits the LSE's
    rounding at the max's magnitude. The same per-logit work: the per-row factor replaces the multiply by
    ``weight``."""
    g = wsum[:, None] * _exp(lg - smax[:, None], EXP2)
    g = tl.where(cols[None, :] == rows[:, None], g - onehot, g)
    rx = tl.load(rx_ptr + rows, mask=row_ok, other=0.0)
    ry = tl.load(ry_ptr + cols, mask=col_ok, other=0.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], g * rx[:, None] * ry[None, :], 0.0)


# ------------------------------------------------------------------------------------------------------------------
# Gradient in the forward pass: S of a row block from cuBLAS, one fused row pass turns it into G~ in place.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def row_pass_kernel(s_ptr, g_ptr, rx_ptr, ry_ptr, smax_ptr, wsum_ptr, max_ptr, sum_ptr, pos_ptr, row_start, row_count,
                    n_cols, stride_s, stride_g, owner_ptr, params_ptr,
                    PEN_MODE: tl.constexpr,
                    MASK_MODE: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    EXP2: tl.constexpr):
    """BM rows of ``S`` (raw dot products, fp32/fp64, row stride ``stride_s``) per program.

    ``MODE`` 0 (one direction): row max / sum / positive, then ``G~`` written over the same rows; 1: statistics only
    (several directions share a joint LSE the launcher combines); 2: ``G~`` only, from the softmax's max and
    ``weight / sum`` (``smax_ptr``, ``wsum_ptr``).
    ``g_ptr`` may alias ``s_ptr`` (``G~`` in 16-bit occupies the first half of each fp32 row): a program reads a
    column tile before writing it, and writes only at or before the columns it has read.
    """
    scale, boost, weight, onehot = _params(params_ptr)
    local = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = local < row_count
    rows = row_start + local
    s_rows = s_ptr + local[:, None].to(tl.int64) * stride_s
    if MODE != 2:
        m = tl.full((BM,), float("-inf"), dtype=s_ptr.dtype.element_ty)
        s = tl.zeros((BM,), dtype=s_ptr.dtype.element_ty)
        p = tl.zeros((BM,), dtype=s_ptr.dtype.element_ty)
        for c0 in range(0, n_cols, BN):
            cols = c0 + tl.arange(0, BN)
            col_ok = cols < n_cols
            dots = tl.load(s_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            lg = _scale_and_mask(dots, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, owner_ptr, scale, boost, PEN_MODE,
                                 MASK_MODE)
            m_new = tl.maximum(m, tl.max(lg, axis=1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * _exp(m - safe, EXP2) + tl.sum(_exp(lg - safe[:, None], EXP2), axis=1)
            m = m_new
            p += tl.sum(tl.where((cols[None, :] == rows[:, None]) & (lg > float("-inf")), lg, 0.0), axis=1)
        tl.store(max_ptr + local, m, mask=row_ok)  # in the logits' units, like row_lse_kernel
        tl.store(sum_ptr + local, s, mask=row_ok)
        tl.store(pos_ptr + local, p, mask=row_ok)
        smax, wsum = m, weight / tl.where(row_ok, s, 1.0)
    if MODE != 1:
        if MODE == 2:
            smax = tl.load(smax_ptr + local, mask=row_ok, other=0.0)
            wsum = tl.load(wsum_ptr + local, mask=row_ok, other=0.0)
        g_rows = g_ptr + local[:, None].to(tl.int64) * stride_g
        for c0 in range(0, n_cols, BN):
            cols = c0 + tl.arange(0, BN)
            col_ok = cols < n_cols
            dots = tl.load(s_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            lg = _scale_and_mask(dots, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, owner_ptr, scale, boost, PEN_MODE,
                                 MASK_MODE)
            g = _grad_from_logits(lg, smax, wsum, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, onehot, EXP2)
            tl.store(g_rows + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ------------------------------------------------------------------------------------------------------------------
# Flash-style strategy (small D): no workspace; the gradient products are accumulated on chip from recomputed tiles.
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, ACC: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with fp32/fp64 accumulation; G (``a``) is cast to ``b``'s type for the tensor cores."""
    if PREC == "upcast":
        return tl.dot(a.to(ACC), b.to(ACC), out_dtype=ACC)
    return tl.dot(a.to(b.dtype), b, input_precision=PREC, out_dtype=ACC)


@triton.jit
def flash_dx_kernel(x_ptr, y_ptr, rx_ptr, ry_ptr, smax_ptr, wsum_ptr, dx_ptr, row_start, row_count, n_cols, n_dim,
                    stride_x, stride_y, stride_dx, owner_ptr, params_ptr,
                    PEN_MODE: tl.constexpr,
                    MASK_MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr, EXP2: tl.constexpr):
    """Row-parallel: ``dX[rows] = G~ Y`` over every column tile, the (BM, BK >= D) accumulator in registers (the
    scalars are read in the loop: held across it, an fp64 kernel spilled on sm_80)."""
    local = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = local < row_count
    rows = row_start + local
    ks = tl.arange(0, BK)
    k_ok = ks < n_dim
    acc = tl.zeros((BM, BK), dtype=ACC)
    smax = tl.load(smax_ptr + local, mask=row_ok, other=0.0)
    wsum = tl.load(wsum_ptr + local, mask=row_ok, other=0.0)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        col_ok = cols < n_cols
        scale, boost, _, onehot = _params(params_ptr)
        lg = _logit_tile(x_ptr, y_ptr, rx_ptr, ry_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y,
                         owner_ptr, scale, boost, PEN_MODE, MASK_MODE, BK, ACC, PREC)
        g = _grad_from_logits(lg, smax, wsum, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, onehot, EXP2)
        yt = tl.load(y_ptr + cols[:, None].to(tl.int64) * stride_y + ks[None, :],
                     mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _mm(g, yt, ACC, PREC)
    tl.store(dx_ptr + local[:, None].to(tl.int64) * stride_dx + ks[None, :], acc,
             mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def flash_dy_kernel(x_ptr, y_ptr, rx_ptr, ry_ptr, smax_ptr, wsum_ptr, dy_ptr, row_start, row_count, n_cols, n_dim,
                    stride_x, stride_y, stride_dy, owner_ptr, params_ptr,
                    PEN_MODE: tl.constexpr,
                    MASK_MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr, EXP2: tl.constexpr):
    """Column-parallel: ``dY[cols] = G~^T X[rows]`` over every row tile; each program owns its columns, so the loop
    order swap needs no atomics (the scalars are read in the loop, as flash_dx_kernel)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < n_cols
    ks = tl.arange(0, BK)
    k_ok = ks < n_dim
    acc = tl.zeros((BN, BK), dtype=ACC)
    for r0 in range(0, row_count, BM):
        local = r0 + tl.arange(0, BM)
        row_ok = local < row_count
        rows = row_start + local
        smax = tl.load(smax_ptr + local, mask=row_ok, other=0.0)
        wsum = tl.load(wsum_ptr + local, mask=row_ok, other=0.0)
        scale, boost, _, onehot = _params(params_ptr)
        lg = _logit_tile(x_ptr, y_ptr, rx_ptr, ry_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y,
                         owner_ptr, scale, boost, PEN_MODE, MASK_MODE, BK, ACC, PREC)
        g = _grad_from_logits(lg, smax, wsum, rows, cols, row_ok, col_ok, rx_ptr, ry_ptr, onehot, EXP2)
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _mm(tl.trans(g), xt, ACC, PREC)
    tl.store(dy_ptr + cols[:, None].to(tl.int64) * stride_dy + ks[None, :], acc,
             mask=col_ok[:, None] & k_ok[None, :])
