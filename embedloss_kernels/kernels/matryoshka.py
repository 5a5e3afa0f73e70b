"""Matryoshka row kernels: one dim's row pass over a block of cosines ``cos`` (rows x cols) that the launcher formed
from the prefix products (``embedloss_kernels.backends.triton.matryoshka``).

Logits ``L = scale * cos`` (``scale + boost`` on penalized query_to_doc columns), masked entries at -inf:

* :func:`matryoshka_row_stats_kernel`: per row, the online max and sum of ``exp(L - max)`` over column tiles.
* :func:`matryoshka_row_grad_kernel`: per row, ``G = weight * exp(L - lse) - onehot * [c == g]`` (d loss / d cos)
  into ``g_ptr`` and ``G * cos`` over ``cos`` (the launcher sums it for the normalization's radial terms).

Scalars (``scale``, ``boost``, ``weight``, ``onehot``) are read from a tensor in the work dtype: float64 stays float64.
Column ``c`` belongs to query ``owner[c]`` (an int32 vector). ``PEN_MODE``: 0 none, 1 boost other queries' columns
(in-batch), 2 boost own hard negatives, 3 boost all but the positive. ``MASK_MODE``: 0 none, 1 mask ``c == g``
(query_to_query), 2 mask the row's own docs (doc_to_doc).
"""

import triton
import triton.language as tl


@triton.jit
def _row_logits(x, cols, ok, g, owner_ptr, scale, boost, PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr):
    """(BN,) logits of one column tile of row ``g``; masked and out-of-range columns at -inf."""
    if PEN_MODE != 0 or MASK_MODE == 2:
        own = tl.load(owner_ptr + cols, mask=ok, other=-1) == g
    pos = cols == g
    if PEN_MODE == 1:
        lg = tl.where(own, x * scale, x * (scale + boost))
    elif PEN_MODE == 2:
        lg = tl.where(own & (~pos), x * (scale + boost), x * scale)
    elif PEN_MODE == 3:
        lg = tl.where(pos, x * scale, x * (scale + boost))
    else:
        lg = x * scale
    valid = ok
    if MASK_MODE == 1:
        valid = valid & (~pos)
    elif MASK_MODE == 2:
        valid = valid & (~own)
    return tl.where(valid, lg, float("-inf"))


@triton.jit
def matryoshka_row_stats_kernel(cos_ptr, owner_ptr, params_ptr, max_ptr, sum_ptr, row0, n_cols, stride_c,
                                PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr, BN: tl.constexpr):
    """Row ``i`` (program 0): ``max_j L[i, j]`` and ``sum_j exp(L[i, j] - max)``."""
    i = tl.program_id(0)
    g = row0 + i
    scale = tl.load(params_ptr)
    boost = tl.load(params_ptr + 1)
    lanes = tl.arange(0, BN)
    m = tl.max(tl.full((BN,), float("-inf"), scale.dtype), axis=0)
    s = tl.sum(tl.zeros((BN,), scale.dtype), axis=0)
    row = cos_ptr + i.to(tl.int64) * stride_c
    for c0 in range(0, n_cols, BN):
        cols = c0 + lanes
        ok = cols < n_cols
        x = tl.load(row + cols, mask=ok, other=0.0)
        lg = _row_logits(x, cols, ok, g, owner_ptr, scale, boost, PEN_MODE, MASK_MODE)
        m_new = tl.maximum(m, tl.max(lg, axis=0))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing but masked columns so far: keep exp finite
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(lg - safe), axis=0)
        m = m_new
    tl.store(max_ptr + i, m)
    tl.store(sum_ptr + i, s)


@triton.jit
def matryoshka_row_grad_kernel(cos_ptr, g_ptr, owner_ptr, params_ptr, lse_ptr, row0, n_cols, stride_c, stride_g,
                               POSITIVE: tl.constexpr, PEN_MODE: tl.constexpr, MASK_MODE: tl.constexpr,
                               BN: tl.constexpr):
    """Row ``i``: ``G = weight * exp(L - lse) - onehot * [c == g]`` (the one-hot only in the block holding the
    positive) into ``g_ptr``, and ``G * cos`` over ``cos``."""
    i = tl.program_id(0)
    g = row0 + i
    scale = tl.load(params_ptr)
    boost = tl.load(params_ptr + 1)
    weight = tl.load(params_ptr + 2)
    onehot = tl.load(params_ptr + 3)
    lse = tl.load(lse_ptr + i)
    lanes = tl.arange(0, BN)
    row = cos_ptr + i.to(tl.int64) * stride_c
    out = g_ptr + i.to(tl.int64) * stride_g
    for c0 in range(0, n_cols, BN):
        cols = c0 + lanes
        ok = cols < n_cols
        x = tl.load(row + cols, mask=ok, other=0.0)
        lg = _row_logits(x, cols, ok, g, owner_ptr, scale, boost, PEN_MODE, MASK_MODE)
        grad = weight * tl.exp(lg - lse)
        if POSITIVE:
            grad = tl.where(cols == g, grad - onehot, grad)
        tl.store(out + cols, grad, mask=ok)
        tl.store(row + cols, grad * x, mask=ok)
