"""SigLIP's elementwise row pass: one row block of raw products ``S = X_b Y^T`` (fp32, float64 for float64 inputs)
becomes ``z = scale * S + bias``, the per-row sums of the loss terms ``softplus(-t z)`` and of
``G = sigmoid(z) - P``, and ``G`` itself, written in the input dtype over ``S`` (16-bit ``G`` in the first half of
each fp32 row: a row's stores only reach the bytes of columns it has already read). ``scale`` and ``bias`` are read
from device memory (no host sync). Softplus and sigmoid use ``e = exp(-|z|)`` only, so no ``z`` overflows, and
``log1p(e)`` is exact for tiny ``e`` (``log(u) * e / (u - 1)`` with ``u = 1 + e``)."""

import triton
import triton.language as tl


@triton.jit
def siglip_row_kernel(s_ptr, g_ptr, scale_ptr, bias_ptr, loss_ptr, gsum_ptr, diag, n, n_cols, stride_s, stride_g,
                      HAS_POS: tl.constexpr, GRAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      ACC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < n
    scale = tl.load(scale_ptr).to(ACC)
    bias = tl.load(bias_ptr).to(ACC)
    loss_acc = tl.zeros([BM], dtype=ACC)
    g_acc = tl.zeros([BM], dtype=ACC)
    for c0 in range(0, n_cols, BN):
        cols = c0 + tl.arange(0, BN)
        ok = row_ok[:, None] & (cols < n_cols)[None, :]
        sv = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=ok, other=0.0).to(ACC)
        z = sv * scale + bias
        if HAS_POS:
            pos = cols[None, :] == (rows[:, None] + diag)
            z = tl.where(pos, -z, z)  # every term becomes softplus(z'), z' = -t z
        e = tl.exp(-tl.abs(z))
        u = 1.0 + e
        log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        term = tl.maximum(z, 0.0) + log1p_e
        loss_acc += tl.sum(tl.where(ok, term, 0.0), axis=1)
        if GRAD:
            sig = tl.where(z >= 0, 1.0 / u, e / u)  # sigmoid(z')
            if HAS_POS:
                sig = tl.where(pos, -sig, sig)  # sigmoid(z) - 1 = -sigmoid(-z) on the positive
            g_acc += tl.sum(tl.where(ok, sig, 0.0), axis=1)
            tl.store(g_ptr + rows[:, None] * stride_g + cols[None, :], sig.to(g_ptr.dtype.element_ty), mask=ok)
    tl.store(loss_ptr + rows, loss_acc, mask=row_ok)
    tl.store(gsum_ptr + rows, g_acc, mask=row_ok)
