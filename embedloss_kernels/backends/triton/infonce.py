"""The ``triton`` backend's ``infonce`` (MNRL): logit blocks in the Triton kernels of
:mod:`embedloss_kernels.kernels.infonce`.

Strategies for the gradient (:func:`infonce_strategy` picks one per shape; ``EMBEDLOSS_TRITON_STRATEGY`` forces one):

* ``fused`` (gradient in the forward pass, docs/DESIGN.md): per row block, ``S = X_g Y^T`` once by cuBLAS (fp32 out),
  one Triton row pass (:func:`row_pass_kernel`: exact LSE, scale, masks, hardness, ``G~`` written in place over S
  in the input dtype), then ``G~ Y`` and ``G~^T X`` on tensor cores: three matmul-equivalents.
* ``workspace``: :func:`row_lse_kernel` streams the column tiles for the row LSE, :func:`softmax_grad_kernel`
  recomputes a row block's tiles into a 16-bit ``G~`` workspace, then the same two products (four).
* ``flash`` (small D): the LSE pass, then :func:`flash_dx_kernel` / :func:`flash_dy_kernel` accumulate the products
  on chip from recomputed tiles; nothing of size rows x columns is stored.

Without gradients only the LSE pass runs. Inputs are read raw; cosine normalization is two inverse-norm vectors
(``_blocked``), gradient products accumulate in fp32 through ``_blocked.BlockGrads``.
"""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext

import torch
from torch import Tensor

from ...core.contract import (
    DOC_TO_DOC,
    DOC_TO_QUERY,
    HARDNESS_ALL,
    HARDNESS_HARD,
    HARDNESS_IN_BATCH,
    HARDNESS_NONE,
    QUERY_TO_QUERY,
)
from ...heuristics.blocks import block_rows as gpu_block_rows
from ...heuristics.triton import (
    GROUP_ROWS,
    device_arch,
    dot_precision,
    flash_config,
    fused_streams,
    infonce_strategy,
    row_pass_config,
    tile_configs,
)
from .. import blocked as _blocked
from ..common import no_grads
from . import acc_type, launch, triton

if triton is not None:
    from ...kernels.infonce import (
        LOG2E,
        flash_dx_kernel,
        flash_dy_kernel,
        row_lse_kernel,
        row_pass_kernel,
        softmax_grad_kernel,
    )

_PEN_MODE = {HARDNESS_NONE: 0, HARDNESS_IN_BATCH: 1, HARDNESS_HARD: 2, HARDNESS_ALL: 3}
MASK_NONE, MASK_SELF, MASK_OWN_DOCS = 0, 1, 2


class _Scalars:
    """The kernels' ``(owner_ptr, params_ptr)`` arguments: the column -> query map, and ``(scale, boost, weight,
    onehot)`` in a tensor of the work dtype (a Python float would reach a kernel as fp32, float64 inputs included),
    made once per (weight, onehot) of a call."""

    def __init__(self, owner: Tensor, scale: float, boost: float, dtype: torch.dtype):
        self.owner, self.scale, self.boost, self.dtype = owner, scale, boost, dtype
        self._made: dict = {}

    def args(self, weight: float = 0.0, onehot: float = 0.0) -> tuple[Tensor, Tensor]:
        key = (weight, onehot)
        if key not in self._made:
            values = [self.scale, self.boost, weight, onehot]
            self._made[key] = torch.tensor(values, dtype=self.dtype).to(self.owner.device, non_blocking=True)
        return self.owner, self._made[key]


def _combine(stats: list[tuple[Tensor, Tensor, Tensor]], joint: bool,
             exp2: bool) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Per-direction (max, sum, positive) of every row -> the (max, sum) each direction's softmax uses, and each
    row's loss ``mean LSE - positive``, all in the kernels' units (base 2 with ``exp2``; the caller converts the
    loss). No LSE is handed on: the gradient kernels form ``exp(L - max) / sum`` from the same logits the max was
    taken over (a lone column: exactly 1), and the loss adds ``log(sum)`` to ``max - positive`` (exact where the
    positive is the max), so neither is rounded at the max's magnitude."""
    exp, log = (torch.exp2, torch.log2) if exp2 else (torch.exp, torch.log)
    pos = stats[0][2]
    if joint:
        row_max = torch.stack([m for m, _, _ in stats]).amax(0)
        total = sum(s * exp(m - row_max) for m, s, _ in stats)
        return [(row_max, total)] * len(stats), (row_max - pos) + log(total)
    return [(m, s) for m, s, _ in stats], sum((m - pos) + log(s) for m, s, _ in stats) / len(stats)


def _onehot(name: str, blocks: list, dir_w: float) -> float:
    """The weight of the one-hot (column ``g``, the positive) in a direction block's ``G~``. Joint: all of it in
    query_to_doc. per_direction: doc_to_query's column ``g`` is the same pair (``a_g . q_g`` at the plain scale) as
    query_to_doc's positive, so each of the two takes its direction's share: a lone column's ``w * softmax - onehot``
    is then exactly 0 in each block, where ``w - 1`` and ``w`` cancelled only after the gradient products (their
    fused accumulation left ~1e-8 * scale). query_to_query and doc_to_doc mask column ``g``. ``dir_w``: each
    direction's weight (1 when joint)."""
    split = dir_w < 1.0 and any(b[0] == "dq" for b in blocks)
    if name == "qd":
        return 1.0 - dir_w if split else 1.0
    return dir_w if split and name == "dq" else 0.0


def infonce_forward(q: Tensor, a: Tensor, row_start: int, row_count: int, scale: float, cosine: bool,
                    directions: int, joint: bool, hardness_mode: int, hardness_strength: float, compute_grad: bool,
                    block_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and gradients; the inputs are read raw (inverse norms as vectors), gradients accumulate through
    :class:`~embedloss_kernels.backends.blocked.BlockGrads` (16-bit ``G~``, fp32 accumulators)."""
    q, a = q.contiguous(), a.contiguous()
    dtype, wd, bq, n_dim = q.dtype, _blocked.acc_dtype(q.dtype), q.shape[0], q.shape[1]
    rq, ra = _blocked.inv_norms(q, cosine), _blocked.inv_norms(a, cosine)
    q, a, rq, ra, cq, ca = _blocked.shorten_long_rows(q, a, rq, ra, cosine)
    acc, prec, arch = acc_type(dtype), dot_precision(dtype), device_arch(q.device)
    exp2 = dtype != torch.float64  # fp64 keeps exp: its scale must not pass through an fp32 log2(e) product
    unit = LOG2E if exp2 else 1.0
    alpha = float(hardness_strength) if hardness_mode != HARDNESS_NONE else 0.0
    # (name, X rows, Y columns, their inverse norms, penalty, mask): X rows are the anchors' queries or positives.
    blocks = [("qd", q, a, rq, ra, _PEN_MODE[hardness_mode] if alpha else 0, MASK_NONE)]
    if directions & QUERY_TO_QUERY:
        blocks.append(("qq", q, q, rq, rq, 0, MASK_SELF))
    if directions & DOC_TO_QUERY:
        blocks.append(("dq", a, q, ra, rq, 0, MASK_NONE))
    if directions & DOC_TO_DOC:
        blocks.append(("dd", a, a, ra, ra, 0, MASK_OWN_DOCS))
    owner = torch.arange(a.shape[0], device=q.device, dtype=torch.int32) % bq  # column -> its query (int32)
    dir_w = 1.0 if joint else 1.0 / len(blocks)
    scalars = _Scalars(owner, scale * unit, alpha * unit, wd)
    strategy = infonce_strategy(n_dim, dtype)
    grads = _blocked.BlockGrads(q, a, rq, ra, directions, cosine, scale / row_count) if compute_grad else None
    if compute_grad and strategy == "fused":
        stats = _fused(blocks, grads, row_start, row_count, scalars, joint, exp2, block_rows)
        softmax, row_loss = _combine(stats, joint, exp2)
    else:
        stats = []
        for _, x, y, rx, ry, pen, mask in blocks:
            m, s, p = (torch.empty(row_count, dtype=wd, device=q.device) for _ in range(3))
            meta = dict(PEN_MODE=pen, MASK_MODE=mask, ACC=acc, PREC=prec, EXP2=exp2)
            args = (x, y, rx, ry, m, s, p, row_start, row_count, y.shape[0], n_dim, x.stride(0), y.stride(0),
                    *scalars.args())
            launch(row_lse_kernel, lambda c: (triton.cdiv(row_count, c["BM"]),), args, meta,
                    tile_configs(n_dim, dtype, arch), ("lse", n_dim, dtype, arch, pen, mask))
            stats.append((m, s, p))
        softmax, row_loss = _combine(stats, joint, exp2)
    # the positive: the query_to_doc block's diagonal logit, always at the plain scale; back to natural units last
    loss = row_loss.mean() / unit
    if not compute_grad:
        return no_grads(loss, q)
    if strategy == "flash":
        _flash(blocks, softmax, grads, row_start, row_count, scalars, dir_w, exp2)
    elif strategy == "workspace":
        _workspace(blocks, softmax, grads, row_start, row_count, scalars, dir_w, exp2, block_rows)
    dq, da = grads.finish()
    return loss, _blocked.unshorten(dq, cq), _blocked.unshorten(da, ca), grads.scale_grad(scale)


def _flash(blocks, softmax, grads, row_start, row_count, scalars, dir_w, exp2) -> None:
    """dX and dY of each direction block accumulated on chip (fp32, already in v units)."""
    q = blocks[0][1]
    cfg = flash_config(q.shape[1], q.dtype)
    meta = dict(ACC=acc_type(q.dtype), PREC=dot_precision(q.dtype), EXP2=exp2, **cfg)
    wd = _blocked.acc_dtype(q.dtype)
    for (name, x, y, rx, ry, pen, mask), (smax, ssum) in zip(blocks, softmax):
        n_cols, n_dim = y.shape
        wsum = dir_w / ssum  # the kernels take weight / sum per row
        dx = torch.empty(row_count, n_dim, dtype=wd, device=q.device)
        dy = torch.empty(n_cols, n_dim, dtype=wd, device=q.device)
        common = (row_start, row_count, n_cols, n_dim, x.stride(0), y.stride(0))
        consts = scalars.args(dir_w, _onehot(name, blocks, dir_w))
        flash_dx_kernel[(triton.cdiv(row_count, cfg["BM"]),)](x, y, rx, ry, smax, wsum, dx, *common, dx.stride(0),
                                                                *consts, PEN_MODE=pen, MASK_MODE=mask, **meta)
        flash_dy_kernel[(triton.cdiv(n_cols, cfg["BN"]),)](x, y, rx, ry, smax, wsum, dy, *common, dy.stride(0),
                                                             *consts, PEN_MODE=pen, MASK_MODE=mask, **meta)
        grads.add_products(name, row_start, row_start + row_count, dx, dy)


def _workspace(blocks, softmax, grads, row_start, row_count, scalars, dir_w, exp2, block_rows) -> None:
    """Two-pass strategy: softmax_grad_kernel recomputes S tile by tile into a 16-bit G~ workspace of one row
    block, then two cuBLAS products."""
    q = blocks[0][1]
    n_dim, dtype, arch = q.shape[1], q.dtype, device_arch(q.device)
    width = max(y.shape[0] for _, _, y, *_ in blocks)
    per_block = block_rows if block_rows > 0 else gpu_block_rows(row_count, width, q.element_size(), q.device)
    per_block = min(per_block, row_count)
    workspace = torch.empty(per_block * width, dtype=dtype, device=q.device)
    meta_common = dict(ACC=acc_type(dtype), PREC=dot_precision(dtype), EXP2=exp2, GROUP=GROUP_ROWS)
    for (name, x, y, rx, ry, pen, mask), (smax, ssum) in zip(blocks, softmax):
        n_cols = y.shape[0]
        wsum = dir_w / ssum  # the kernels take weight / sum per row
        for r0 in range(0, row_count, per_block):
            n = min(per_block, row_count - r0)
            g = workspace[: n * n_cols].view(n, n_cols)
            args = (x, y, rx, ry, smax[r0:], wsum[r0:], g, row_start + r0, n, n_cols, n_dim, x.stride(0), y.stride(0),
                    g.stride(0), *scalars.args(dir_w, _onehot(name, blocks, dir_w)))

            def grid(c, n=n, n_cols=n_cols):
                return (triton.cdiv(n, c["BM"]) * triton.cdiv(n_cols, c["BN"]),)

            launch(softmax_grad_kernel, grid, args, dict(PEN_MODE=pen, MASK_MODE=mask, **meta_common),
                    tile_configs(n_dim, dtype, arch), ("grad", n_dim, dtype, arch, pen, mask))
            grads.add(name, row_start + r0, row_start + r0 + n, g)


def _row_pass(block, view, softmax, stats, mode, row0, n, scalars, dir_w, exp2, cfg, grid, onehot) -> None:
    name, _, _, rx, ry, pen, mask = block
    sv, gv = view
    m, s, p = stats
    row_pass_kernel[grid](sv, gv, rx, ry, *softmax, m, s, p, row0, n, sv.shape[1], sv.stride(0), gv.stride(0),
                          *scalars.args(dir_w, onehot), PEN_MODE=pen, MASK_MODE=mask,
                          MODE=mode, EXP2=exp2, **cfg)


def _fused(blocks, grads, row_start, row_count, scalars, joint, exp2, block_rows) -> list:
    """Gradient in the forward pass: per row block, S of every direction once (cuBLAS, fp32 out), the row pass
    (MODE 0 alone; statistics, joint LSE, then G~ with several directions), G~ in place, then the products.
    Returns each direction's (max, sum, positive) per row for the loss.

    With two streams (:func:`fused_streams`), blocks alternate between two buffers: the side stream fills buffer
    ``k % 2`` once the products of block k - 2 have read it (event ``free``), the current stream runs block k's
    products once its G~ is written (event ``ready``)."""
    q = blocks[0][1]
    dtype, wd = q.dtype, _blocked.acc_dtype(q.dtype)
    widths = [y.shape[0] for _, _, y, *_ in blocks]
    n_streams = fused_streams(q.device)
    per_logit = n_streams * torch.finfo(wd).bits // 8  # G~ overwrites S; one buffer per stream
    per_block = block_rows if block_rows > 0 else gpu_block_rows(row_count, sum(widths), per_logit, q.device)
    per_block = min(per_block, row_count)
    n_bufs = n_streams if per_block < row_count else 1
    bufs = [torch.empty(per_block * sum(widths), dtype=wd, device=q.device) for _ in range(n_bufs)]
    stats = [tuple(torch.empty(row_count, dtype=wd, device=q.device) for _ in range(3)) for _ in blocks]
    unused = torch.empty(row_count, dtype=wd, device=q.device)  # the (max, sum) pointers of MODE 0 and 1
    cfg = row_pass_config(dtype)
    dir_w = 1.0 if joint else 1.0 / len(blocks)
    main = side = None
    if n_bufs > 1:
        main, side = torch.cuda.current_stream(q.device), torch.cuda.Stream(q.device)
        side.wait_stream(main)  # inputs, norms and accumulators were made on the current stream
        ready = [torch.cuda.Event() for _ in range(n_bufs)]
        free = [torch.cuda.Event() for _ in range(n_bufs)]
    for k, r0 in enumerate(range(0, row_count, per_block)):
        n = min(per_block, row_count - r0)
        rows = slice(row_start + r0, row_start + r0 + n)
        buf = bufs[k % n_bufs]
        with torch.cuda.stream(side) if side is not None else _nullcontext():
            if side is not None:
                side.wait_event(free[k % n_bufs])  # the products of block k - 2 have read this buffer
            views, off = [], 0
            for (_, x, y, *_), width in zip(blocks, widths):
                sv = buf[off : off + n * width].view(n, width)
                _blocked.mm_acc(x[rows], y.T, out=sv)
                off += n * width
                views.append((sv, sv.view(dtype)[:, :width] if dtype != wd else sv))
            grid = (triton.cdiv(n, cfg["BM"]),)
            common = (row_start + r0, n, scalars, dir_w, exp2, cfg, grid)
            if len(blocks) == 1:
                _row_pass(blocks[0], views[0], (unused, unused), [t[r0:] for t in stats[0]], 0, *common, 1.0)
            else:
                for block, view, st in zip(blocks, views, stats):
                    _row_pass(block, view, (unused, unused), [t[r0:] for t in st], 1, *common, 0.0)  # statistics
                softmax, _ = _combine([tuple(t[r0 : r0 + n] for t in st) for st in stats], joint, exp2)
                for block, view, st, (smax, ssum) in zip(blocks, views, stats, softmax):
                    _row_pass(block, view, (smax.contiguous(), dir_w / ssum), [t[r0:] for t in st], 2, *common,
                              _onehot(block[0], blocks, dir_w))
            if side is not None:
                ready[k % n_bufs].record(side)
        if side is not None:
            main.wait_event(ready[k % n_bufs])
        for (name, *_), (_, gv) in zip(blocks, views):
            grads.add(name, rows.start, rows.stop, gv)
        if side is not None:
            free[k % n_bufs].record(main)
    if side is not None:
        main.wait_stream(side)  # the statistics of the last block
    return stats
