"""Fused Matryoshka MNRL on the ``torch`` backend: every prefix dimension's loss from one pass over D.

sentence-transformers' ``MatryoshkaLoss`` truncates each embedding to its first ``d`` coordinates, L2-normalizes it
and runs the inner MNRL once per dim: ``L = sum_k w_k L_{d_k}``. Here, with the dims sorted ``d_1 < ... < d_m``
and coordinate segments ``seg_k = [d_{k-1}, d_k)`` (``d_0 = 0``), for a block of anchor rows::

    P_k = P_{k-1} + R[:, seg_k] C[:, seg_k]^T          raw prefix products, one pass over D      (n, cols)
    cos_k = P_k / (|r_{:d_k}| |c_{:d_k}|)              per-dim cosine (norms of the prefixes, clamped at EPS)
    S_k = s cos_k (+ alpha sg(cos_k) on penalized query_to_doc columns), masks as in plain MNRL
    loss += w_k (LSE(S_k) - S_k[positive]) / rows      each dim its own exact LSE (joint or per direction)
    G_k = d loss / d cos_k = s w_k (softmax(S_k) - onehot) / rows      (per-direction weights as in MNRL)

Back through the per-prefix normalization (``d cos / d r = c / (|r||c|) - cos r / |r|^2`` on the prefix), segment
``k`` collects every dim ``d_j >= d_k``::

    Gh_k = G_k / (|r_{:d_k}| |c_{:d_k}|)               (n, cols), the gradient w.r.t. the raw product P_k
    C_k = sum_{j >= k} Gh_j                            a suffix sum over dims, built from the largest dim down
    dR[:, seg_k] += C_k C[:, seg_k];  dC[:, seg_k] += C_k^T R[:, seg_k]
    dR[:, seg_k] -= R[:, seg_k] * rho_k,  rho_k = sum_{j >= k} (sum_cols G_j * cos_j) / |r_{:d_j}|^2   (per row)
    (and the same column-wise for dC)
    d loss / d s = sum_k sum(G_k * cos_k) / s          the penalty is stop-gradient; the radial sums' total, over s

The products cost ``6 B N D`` flops, one MNRL at full D: every coordinate takes part in one forward product and
two gradient products. On top: one elementwise pass per dim over the block. The radial terms ``rho`` are per-row
scalars accumulated over all row blocks and applied once at the end.

:func:`matryoshka_forward` takes the per-dim row pass (logits -> LSE -> G -> radial sums) as a parameter so that the
Triton backend reuses the block loop and the products with its own row kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ...core.contract import (
    DOC_TO_DOC,
    DOC_TO_QUERY,
    EPS,
    HARDNESS_ALL,
    HARDNESS_HARD,
    HARDNESS_IN_BATCH,
    HARDNESS_NONE,
    QUERY_TO_QUERY,
)
from ...heuristics.blocks import budget_rows
from ..common import no_grads, work_dtype
from .infonce import row_block_lse


def prefix_norms(x: Tensor, dims: Sequence[int]) -> Tensor:
    """(m, rows): ``max(||x[:, :d]||, EPS)`` for every dim (sums of squares per segment, cumulated)."""
    lo = 0
    parts = []
    for d in dims:
        parts.append(x[:, lo:d].square().sum(1))
        lo = d
    return torch.stack(parts).cumsum_(0).sqrt_().clamp_min_(EPS)


def torch_row_pass(
    cos: dict[str, Tensor],
    tmp: dict[str, Tensor],
    own: Tensor,
    row0: int,
    n_cols: int,
    scale: float,
    weight: float,
    inv_rows: float,
    joint: bool,
    hardness_mode: int,
    alpha: float,
    compute_grad: bool,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """One dim's row pass on a block. ``cos``: the cosine blocks ``{"qd", "qq", "dq", "dd"}`` (n, cols) of the
    selected directions; ``tmp``: same-shaped scratch buffers; ``own`` (n,): each anchor's own query column
    (``row0 .. row0 + n - 1``);
    ``n_cols``: K (docs per query). Returns the rows' loss terms ``w (LSE - positive)`` (n,) and, with
    ``compute_grad``, leaves ``G = d loss / d cos`` in ``tmp`` and ``G * cos`` in ``cos`` (the caller takes the
    radial sums from it)."""
    n = own.shape[0]
    ar = torch.arange(n, device=own.device)
    m = cos["qd"].shape[1] // n_cols
    own_docs = own[:, None] + m * torch.arange(n_cols, device=own.device)  # (n, K)
    logits = {}
    for key, c in cos.items():
        logits[key] = torch.mul(c, scale, out=tmp[key])
    qd = logits["qd"]
    positive = qd[ar, own].clone()
    if alpha > 0 and hardness_mode != HARDNESS_NONE:
        if hardness_mode == HARDNESS_HARD:
            sel = own_docs[:, 1:]
            qd[ar[:, None], sel] += alpha * cos["qd"][ar[:, None], sel]
        else:
            keep = own_docs if hardness_mode == HARDNESS_IN_BATCH else own_docs[:, :1]
            assert hardness_mode in (HARDNESS_IN_BATCH, HARDNESS_ALL)
            kept = qd[ar[:, None], keep].clone()
            qd.add_(cos["qd"], alpha=alpha)
            qd[ar[:, None], keep] = kept
    if "qq" in logits:
        logits["qq"][ar, own] = float("-inf")
    if "dd" in logits:
        logits["dd"][ar[:, None], own_docs] = float("-inf")

    n_blocks = len(logits)
    sums, lse_mean = row_block_lse(logits, joint)
    row_loss = (lse_mean - positive) * weight
    if not compute_grad:
        return row_loss, None
    g_weight = scale * weight * inv_rows / (1 if joint else n_blocks)
    for key, blk in logits.items():
        blk.mul_((g_weight / sums[key])[:, None])
    logits["qd"][ar, own] -= scale * weight * inv_rows
    for key, g in logits.items():
        cos[key].mul_(g)
    return row_loss, logits


RowPass = Callable[..., tuple[Tensor, "dict[str, Tensor] | None"]]


def matryoshka_forward(
    q: Tensor,
    a: Tensor,
    dims: Sequence[int],
    weights: Sequence[float],
    row_start: int,
    row_count: int,
    scale: float,
    directions: int,
    joint: bool,
    hardness_mode: int,
    hardness_strength: float,
    compute_grad: bool,
    block_rows: int,
    row_pass: RowPass = torch_row_pass,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``sum_k w_k MNRL(shrink(q, d_k), shrink(a, d_k))`` and (with ``compute_grad``) its gradients w.r.t. the raw
    ``q`` and ``a`` and the scale, one block of anchor rows at a time (see the module docstring for the maths)."""
    out_dtype = q.dtype
    wd = work_dtype(q.dtype)
    bq = q.shape[0]
    n_cols = a.shape[0] // bq
    qf, af = q.to(wd), a.to(wd)
    dims = list(dims)
    m = len(dims)
    segs = list(zip([0] + dims[:-1], dims))
    qn, an = prefix_norms(qf, dims), prefix_norms(af, dims)  # (m, Bq), (m, K*Bq)
    use_qq = bool(directions & QUERY_TO_QUERY)
    use_dq = bool(directions & DOC_TO_QUERY)
    use_dd = bool(directions & DOC_TO_DOC)
    alpha = hardness_strength if hardness_mode != HARDNESS_NONE else 0.0

    width = a.shape[0] * (1 + use_dd) + bq * (use_qq + use_dq)
    # m prefix-product buffers per column set, one rotating temporary, plus matmul temporaries
    rows_per_block = block_rows if block_rows > 0 else budget_rows(width, torch.finfo(wd).bits // 8, m + 3)
    dq = torch.zeros_like(qf) if compute_grad else None
    da = torch.zeros_like(af) if compute_grad else None
    rad_q = qf.new_zeros(m, bq) if compute_grad else None  # sum_cols G cos / |q_{:d}|^2 per dim
    rad_a = af.new_zeros(m, a.shape[0]) if compute_grad else None
    gcos_sum = torch.zeros((), dtype=wd, device=q.device)  # sum of G * cos over every dim and logit: s dL/ds
    loss_sum = torch.zeros((), dtype=wd, device=q.device)
    inv_rows = 1.0 / row_count

    for r0 in range(row_start, row_start + row_count, rows_per_block):
        r1 = min(r0 + rows_per_block, row_start + row_count)
        n = r1 - r0
        own = torch.arange(r0, r1, device=q.device)
        q_blk = qf[r0:r1]
        p_blk = af[r0:r1]
        # (rows, cols, row norms, col norms, row rad, col rad) per direction
        spec = {"qd": (q_blk, af, qn[:, r0:r1], an, "q", "a")}
        if use_qq:
            spec["qq"] = (q_blk, qf, qn[:, r0:r1], qn, "q", "q")
        if use_dq:
            spec["dq"] = (p_blk, qf, an[:, r0:r1], qn, "a", "q")
        if use_dd:
            spec["dd"] = (p_blk, af, an[:, r0:r1], an, "a", "a")

        # -- raw prefix products, one pass over D: prods[key][k] = R[:, :d_k] C[:, :d_k]^T --
        prods = {}
        for key, (rows, cols, _, _, _, _) in spec.items():
            buf = rows.new_empty(m, n, cols.shape[0])
            for k, (lo, hi) in enumerate(segs):
                if k == 0:
                    torch.mm(rows[:, lo:hi], cols[:, lo:hi].T, out=buf[0])
                else:
                    torch.addmm(buf[k - 1], rows[:, lo:hi], cols[:, lo:hi].T, out=buf[k])
            prods[key] = buf
        tmp = {key: torch.empty_like(buf[0]) for key, buf in prods.items()}

        # -- per dim: cosine, exact LSE, G; the block's Gh_k land back in prods[key][k] --
        for k in range(m):
            cos = {}
            for key, (_, _, rn, cn, _, _) in spec.items():
                cos[key] = prods[key][k].div_(rn[k][:, None]).div_(cn[k][None, :])
            row_loss, g = row_pass(cos, tmp, own, r0, n_cols, scale, float(weights[k]), inv_rows, joint, hardness_mode,
                                   alpha, compute_grad)
            loss_sum += row_loss.sum()
            if not compute_grad:
                continue
            for key, (_, _, rn, cn, rr, cr) in spec.items():
                gc = cos[key]  # G * cos: the radial sums, and the scale's gradient
                row_sums = gc.sum(1)
                gcos_sum += row_sums.sum()
                row_rad = row_sums / rn[k].square()
                col_rad = gc.sum(0) / cn[k].square()
                (rad_q if rr == "q" else rad_a)[k, r0:r1] += row_rad
                (rad_q if cr == "q" else rad_a)[k] += col_rad
                gh = g[key].div_(rn[k][:, None]).div_(cn[k][None, :])
                # swap: prods[key][k] (now free) takes Gh_k, the old storage becomes the next scratch buffer
                prods[key][k].copy_(gh)
        if not compute_grad:
            continue

        # -- back through the segments, largest dim first: C_k = sum_{j >= k} Gh_j --
        for k in range(m - 1, -1, -1):
            lo, hi = segs[k]
            if k < m - 1:
                for key in spec:
                    prods[key][k] += prods[key][k + 1]
            for key, (rows, cols, _, _, rr, cr) in spec.items():
                c_k = prods[key][k]
                d_rows = (dq if rr == "q" else da)[r0:r1, lo:hi]
                d_cols = (dq if cr == "q" else da)[:, lo:hi]
                d_rows += c_k @ cols[:, lo:hi]
                d_cols += c_k.T @ rows[:, lo:hi]

    loss = loss_sum * inv_rows
    if not compute_grad:
        return no_grads(loss, q)
    # radial terms: segment k takes rho_k = sum_{j >= k} rad_j (rows clamped at EPS have none, as F.normalize)
    for x, grad, rad, norms in ((qf, dq, rad_q, qn), (af, da, rad_a, an)):
        rad.masked_fill_(norms <= EPS, 0.0)
        rho = rad.flip(0).cumsum(0).flip(0)
        for k, (lo, hi) in enumerate(segs):
            grad[:, lo:hi].addcmul_(x[:, lo:hi], rho[k][:, None], value=-1.0)
    # every logit is s cos_k (+ a stop-gradient penalty) and G_k = d loss / d cos_k = s d loss / d S_k, so
    # d loss / d s = sum_k sum(d loss / d S_k * cos_k) = sum(G * cos) / s (not finite at s = 0: the functional layer
    # runs a learnable scale of 0 through the plain reference)
    grad_scale = gcos_sum / scale
    return loss, dq.to(out_dtype), da.to(out_dtype), grad_scale
