"""The gather schedule: every rank's columns all-gathered straight into the op's layout (the first column, and the
candidate pool ``[P; N_1; ...]``), their gradients reduce-scattered back to their owners in backward. MNRL,
Matryoshka and GIST all run on it (GIST gathers its doc columns and, without gradients, their guide embeddings).

Ranks may hold different local batch sizes: columns are padded to the largest one for the collective and the
padding rows are dropped before the op, so they are never scored. Memory per rank: the gathered columns
(``W * B * C * D``) and their gradients, plus the op's row block; never a world x world matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import collectives
from .collectives import gather_metadata


class GatherColumns(torch.autograd.Function):
    """Queries and doc columns (B_local, D) -> (queries of every rank (N, D), the candidate pool (K * N, D) laid
    out ``[P; N_1; ...]`` as the op takes it); N = sum of the local batch sizes. Forward all-gathers, backward
    reduce-scatters the gradients onto their owning ranks. Two outputs so that the op's gradients reach the
    backward as they are, without being accumulated into one more world-sized buffer."""

    @staticmethod
    def forward(ctx, sizes: tuple[int, ...], group, *columns: Tensor) -> tuple[Tensor, Tensor]:
        c, (b, d) = len(columns), columns[0].shape
        world, bmax, n = len(sizes), max(sizes), sum(sizes)
        ctx.sizes, ctx.group, ctx.local_rows, ctx.columns = sizes, group, b, c
        q_all = columns[0].new_empty(n, d)
        a_all = columns[0].new_empty(c - 1, n, d)
        targets = [q_all, *a_all.unbind(0)]
        if min(sizes) == bmax:
            # equal batches: each column gathers straight into its place in the output (no staging copy)
            for col, target in zip(columns, targets):
                collectives.all_gather_flat(target.view(-1), col.contiguous().view(-1), group)
        else:
            local = torch.stack([col.contiguous() for col in columns], dim=0)
            if b < bmax:
                local = torch.cat([local, local.new_zeros(c, bmax - b, d)], dim=1)
            buf = local.new_empty(world, c, bmax, d)
            collectives.all_gather_flat(buf.view(-1), local.view(-1), group)
            for i, target in enumerate(targets):
                # rank-major -> column-major, dropping each rank's padding rows
                torch.cat([buf[r, i, : sizes[r]] for r in range(world)], dim=0, out=target)
        return q_all, a_all.view((c - 1) * n, d)

    @staticmethod
    def backward(ctx, grad_q: Tensor | None, grad_a: Tensor | None):
        sizes, group, b, c = ctx.sizes, ctx.group, ctx.local_rows, ctx.columns
        n, bmax = sum(sizes), max(sizes)
        ref = grad_q if grad_q is not None else grad_a
        d = ref.shape[-1]
        grad_q = grad_q.contiguous() if grad_q is not None else ref.new_zeros(n, d)
        grad_a = grad_a.contiguous() if grad_a is not None else ref.new_zeros((c - 1) * n, d)
        grads = [grad_q, *grad_a.view(c - 1, n, d).unbind(0)]
        if min(sizes) == bmax:
            out = [g.new_empty(b, d) for g in grads]
            for g, o in zip(grads, out):
                collectives.reduce_scatter_flat(o.view(-1), g.view(-1), group)
            return None, None, *out
        buf = ref.new_zeros(len(sizes), c, bmax, d)
        start = 0
        for r, rows in enumerate(sizes):
            for i, g in enumerate(grads):
                buf[r, i, :rows] = g[start : start + rows]
            start += rows
        out = ref.new_empty(c, bmax, d)
        collectives.reduce_scatter_flat(out.view(-1), buf.view(-1), group)
        return None, None, *out[:, :b].unbind(0)


def gather_columns(columns: Sequence[Tensor], group=None, schedule: str = "gather",
                   ring_blocker: str | None = None) -> tuple[Tensor, Tensor, int, int]:
    """All-gather the columns (autograd-aware; under ``torch.no_grad`` for columns without gradients). Returns every
    rank's first column (N, D), the pool of the others (K * N, D), this rank's first row and its local row count.
    ``schedule`` and ``ring_blocker`` are checked against the other ranks' (:func:`gather_metadata`)."""
    meta = gather_metadata(columns, group, schedule, ring_blocker)
    sizes = tuple(r[0] for r in meta)
    rank = dist.get_rank(group)
    q_all, a_all = GatherColumns.apply(sizes, group, *columns)
    return q_all, a_all, sum(sizes[:rank]), sizes[rank]
