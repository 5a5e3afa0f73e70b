"""GIST's masked logit block in one Triton kernel: the model's and the guide's products of a (BM, BN) tile, the
guide's false-negative test against each row's bound, and the masked, scaled logits stored; the guide's
similarities never leave registers.

Per tile, with ``rf`` the rows' factor (scale / max(||x_i||, eps)), ``ci`` the columns' inverse norms and the
guide's rows already normalized (x' / max(||x'||, eps))::

    L[i, j] = (x_i . y_j) rf_i ci_j,   -inf where x'_i . y'_j - bound_i > band  (except j == i + exempt_start)

An entry within ``band`` of its row's bound (a repeated text ties with the threshold exactly in
sentence-transformers) keeps its logit and is flagged in ``near``: the launcher decides it by the exact computation
that gave the bound (``embedloss_kernels/backends/torch/gist.py``, ``settle_ties_``), so a tile's rounding never breaks
a tie. Every factor arrives as a tensor (never a Python float), so a float64 launch stays float64 end to end. The
loss maths around the block (LSE, softmax - onehot, the gradient products) is the torch backend's, which calls this
kernel's launcher for each block.
"""

import triton
import triton.language as tl

from .infonce import dot_tile


@triton.jit
def gist_masked_logits_kernel(
    x_ptr, y_ptr, xg_ptr, yg_ptr,  # model rows (n, D), columns (m, D); the guide's (n, D'), (m, D')
    row_factor_ptr, col_inv_ptr, bound_ptr, band_ptr,  # (n,), (m,), (n,), (1,)
    out_ptr, near_ptr,  # (n, m) masked logits; (n, m) int8: 1 where the guide's similarity is within band
    n_rows, n_cols, n_dim, guide_dim,
    stride_x, stride_y, stride_xg, stride_yg, stride_out, stride_near,
    exempt_start,
    HAS_EXEMPT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKG: tl.constexpr,
    ACC: tl.constexpr, GACC: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    # -- the model's logits --
    logits = dot_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, n_dim, stride_x, stride_y, BK, ACC, PREC)
    rf = tl.load(row_factor_ptr + rows, mask=row_ok, other=0.0)
    ci = tl.load(col_inv_ptr + cols, mask=col_ok, other=0.0)
    logits = logits * rf[:, None] * ci[None, :]
    # -- the guide's similarities (normalized rows), compared with each row's bound (strictly) --
    guide = dot_tile(xg_ptr, yg_ptr, rows, cols, row_ok, col_ok, guide_dim, stride_xg, stride_yg, BKG, GACC, GPREC)
    bound = tl.load(bound_ptr + rows, mask=row_ok, other=0.0)
    band = tl.load(band_ptr)
    diff = guide - bound[:, None]
    masked = diff > band
    near = tl.abs(diff) <= band
    if HAS_EXEMPT:  # the row's own positive is never masked
        own = cols[None, :] == rows[:, None] + exempt_start
        masked = masked & ~own
        near = near & ~own
    out = tl.where(masked, float("-inf"), logits)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok)
    tl.store(near_ptr + rows[:, None].to(tl.int64) * stride_near + cols[None, :], near.to(tl.int8), mask=ok)
