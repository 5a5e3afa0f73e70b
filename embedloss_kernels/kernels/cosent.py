"""CoSENT / AnglE pairwise kernels over ``t = scale * sim`` (B,), label-ordered pairs ``y_i > y_j`` contributing
``exp(t_j - t_i)``; tiles of (i, j) pairs are formed on chip, so no B x B tensor exists.

* :func:`pair_lse_kernel`: per row ``i``, online max / sum of ``exp(t_j - t_i)`` over the ``j`` with ``y_j < y_i``.
* :func:`pair_grad_kernel`: with the loss ``L`` known, ``d L / d t_k = sum_{i: y_i > y_k} exp(t_k - t_i - L)
  - sum_{j: y_j < y_k} exp(t_j - t_k - L)``; every term is <= 1 since ``L`` bounds each pair's logit.
"""

import triton
import triton.language as tl


@triton.jit
def pair_lse_kernel(t_ptr, y_ptr, max_ptr, sum_ptr, n, BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
    i = tl.program_id(0) * BM + tl.arange(0, BM)
    i_ok = i < n
    ti = tl.load(t_ptr + i, mask=i_ok, other=0.0)
    yi = tl.load(y_ptr + i, mask=i_ok, other=0.0)
    m = tl.full((BM,), float("-inf"), dtype=ACC)
    s = tl.zeros((BM,), dtype=ACC)
    for j0 in range(0, n, BN):
        j = j0 + tl.arange(0, BN)
        j_ok = j < n
        tj = tl.load(t_ptr + j, mask=j_ok, other=0.0)
        yj = tl.load(y_ptr + j, mask=j_ok, other=0.0)
        ok = i_ok[:, None] & j_ok[None, :] & (yi[:, None] > yj[None, :])
        z = tl.where(ok, tj[None, :] - ti[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no lower-labelled pair yet: keep exp finite
        s = s * tl.exp(m - safe) + tl.sum(tl.exp(z - safe[:, None]), axis=1)
        m = m_new
    tl.store(max_ptr + i, m, mask=i_ok)
    tl.store(sum_ptr + i, s, mask=i_ok)


@triton.jit
def pair_grad_kernel(t_ptr, y_ptr, loss_ptr, dt_ptr, n, BM: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr):
    k = tl.program_id(0) * BM + tl.arange(0, BM)
    k_ok = k < n
    tk = tl.load(t_ptr + k, mask=k_ok, other=0.0)
    yk = tl.load(y_ptr + k, mask=k_ok, other=0.0)
    loss = tl.load(loss_ptr)
    acc = tl.zeros((BM,), dtype=ACC)
    for j0 in range(0, n, BN):
        j = j0 + tl.arange(0, BN)
        j_ok = j < n
        tj = tl.load(t_ptr + j, mask=j_ok, other=0.0)
        yj = tl.load(y_ptr + j, mask=j_ok, other=0.0)
        pair_ok = k_ok[:, None] & j_ok[None, :]
        as_lower = pair_ok & (yj[None, :] > yk[:, None])  # k is the lower of the pair: + exp(t_k - t_j - L)
        as_higher = pair_ok & (yj[None, :] < yk[:, None])  # k is the higher: - exp(t_j - t_k - L)
        diff = tj[None, :] - tk[:, None]
        up = tl.exp(tl.where(as_lower, -diff - loss, float("-inf")))
        down = tl.exp(tl.where(as_higher, diff - loss, float("-inf")))
        acc += tl.sum(up - down, axis=1)
    tl.store(dt_ptr + k, acc, mask=k_ok)
