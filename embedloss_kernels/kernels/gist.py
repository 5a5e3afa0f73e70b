"""GIST's masked logit block in one Triton kernel: the model's and the guide's products of a (BM, BN) tile, the
guide's false-negative test against each row's bound, and the masked, scaled logits stored; the guide's
similarities never leave registers.

Per tile, with ``rf`` the rows' factor (scale / max(||x_i||, eps)), ``ci`` the columns' inverse norms and ``gr``,
``gc`` the guide's::

    L[i, j] = (x_i . y_j) rf_i ci_j,   -inf where (x'_i . y'_j) gr_i gc_j > bound_i  (except j == i + exempt_start)

Every factor arrives as a tensor (never a Python float), so a float64 launch stays float64 end to end. The loss
maths around the block (LSE, softmax - onehot, the gradient products) is the torch backend's
(``embedloss_kernels/backends/torch/gist.py``), which calls this kernel's launcher for each block.
"""

import triton
import triton.language as tl

from .infonce import dot_tile


@triton.jit
def gist_masked_logits_kernel(
    x_ptr, y_ptr, xg_ptr, yg_ptr,  # model rows (n, D), columns (m, D); the guide's (n, D'), (m, D')
    row_factor_ptr, col_inv_ptr, guide_row_inv_ptr, guide_col_inv_ptr, bound_ptr,  # (n,), (m,), (n,), (m,), (n,)
    out_ptr,  # (n, m) masked logits
    n_rows, n_cols, n_dim, guide_dim,
    stride_x, stride_y, stride_xg, stride_yg, stride_out,
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
    # -- the guide's similarities, compared with each row's bound (strictly) --
    guide = dot_tile(xg_ptr, yg_ptr, rows, cols, row_ok, col_ok, guide_dim, stride_xg, stride_yg, BKG, GACC, GPREC)
    gr = tl.load(guide_row_inv_ptr + rows, mask=row_ok, other=0.0)
    gc = tl.load(guide_col_inv_ptr + cols, mask=col_ok, other=0.0)
    bound = tl.load(bound_ptr + rows, mask=row_ok, other=0.0)
    masked = guide * gr[:, None] * gc[None, :] > bound[:, None]
    if HAS_EXEMPT:  # the row's own positive is never masked
        masked = masked & (cols[None, :] != rows[:, None] + exempt_start)
    out = tl.where(masked, float("-inf"), logits)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
