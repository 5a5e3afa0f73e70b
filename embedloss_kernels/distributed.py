"""gather_across_devices: this rank's rows against every rank's columns over torch.distributed.

Each rank stacks its ``C = 1 + K`` local columns (queries, positives, negatives), all-gathers them in one
collective, and runs the fused op on its own anchor rows (``row_start`` = the number of rows on lower ranks)
against every gathered column. The op returns the gradients of the gathered tensors; the gather's backward sums
them back onto their owning ranks with one reduce-scatter. Memory per rank: the gathered columns
(``W * B * C * D``) and their gradients, plus the op's row block; never a world x world matrix.

Ranks may hold different local batch sizes: columns are padded to the largest one for the collective and the
padding rows are dropped before the op, so they are never scored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional

_META_FIELDS = 4  # rows, dim, columns, dtype code: gathered before the embeddings so every rank checks the same
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather_flat(out: Tensor, inp: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _reduce_scatter_flat(out: Tensor, inp: Tensor, group) -> None:
    """Sum ``inp`` (W * n elements) over ranks and keep this rank's n; all_reduce + slice where the process group
    has no reduce-scatter (older gloo)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    try:
        scatter(out, inp, op=dist.ReduceOp.SUM, group=group)
    except (RuntimeError, NotImplementedError) as exc:
        if "support" not in str(exc).lower() and "implement" not in str(exc).lower():
            raise
        full = inp.clone()
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
        rank = dist.get_rank(group)
        out.copy_(full.view(-1, *out.shape)[rank])


def gather_metadata(columns: Sequence[Tensor], group=None) -> list[tuple[int, int, int, int]]:
    """(rows, dim, columns, dtype code) of every rank, after one small all-gather; raises the same ValueError on
    every rank when the ranks disagree on dim, column count or dtype (so no rank waits on a collective forever)."""
    first = columns[0]
    meta = torch.tensor([first.shape[0], first.shape[1], len(columns), _DTYPE_CODES.get(first.dtype, 0)],
                        dtype=torch.int64, device=first.device)
    world = dist.get_world_size(group)
    out = torch.empty(world * _META_FIELDS, dtype=torch.int64, device=first.device)
    _all_gather_flat(out, meta, group)
    rows = [tuple(int(v) for v in r) for r in out.view(world, _META_FIELDS).tolist()]
    for field, name in ((1, "embedding dim"), (2, "number of columns"), (3, "dtype")):
        values = [r[field] for r in rows]
        if len(set(values)) > 1:
            raise ValueError(
                f"gather_across_devices: every rank must pass embeddings with the same {name}; got "
                + ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
            )
    if any(r[0] == 0 for r in rows):
        raise ValueError(
            "gather_across_devices: every rank must hold at least one row; got local batch sizes "
            + str([r[0] for r in rows])
        )
    return rows


class _GatherColumns(torch.autograd.Function):
    """C columns (B_local, D) -> (C, sum_r B_r, D): forward all-gather, backward reduce-scatter of the gradients."""

    @staticmethod
    def forward(ctx, sizes: tuple[int, ...], group, *columns: Tensor) -> Tensor:
        c, (b, d) = len(columns), columns[0].shape
        world, bmax = len(sizes), max(sizes)
        ctx.sizes, ctx.group, ctx.local_rows = sizes, group, b
        if min(sizes) == bmax:
            # equal batches: each column gathers straight into its slice of the output (no staging copy)
            out = columns[0].new_empty(c, world * b, d)
            for i, col in enumerate(columns):
                _all_gather_flat(out[i].view(-1), col.contiguous().view(-1), group)
            return out
        local = torch.stack([col.contiguous() for col in columns], dim=0)
        if b < bmax:
            local = torch.cat([local, local.new_zeros(c, bmax - b, d)], dim=1)
        buf = local.new_empty(world, c, bmax, d)
        _all_gather_flat(buf.view(-1), local.contiguous().view(-1), group)
        # world-major -> column-major, dropping each rank's padding rows
        return torch.cat([buf[r, :, : sizes[r]] for r in range(world)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        sizes, group = ctx.sizes, ctx.group
        grad = grad.contiguous()
        c, _, d = grad.shape
        world, bmax = len(sizes), max(sizes)
        if min(sizes) == bmax:
            out = grad.new_empty(c, bmax, d)
            for i in range(c):
                _reduce_scatter_flat(out[i].view(-1), grad[i].view(-1), group)
            return None, None, *out.unbind(0)
        buf = grad.new_zeros(world, c, bmax, d)
        start = 0
        for r, n in enumerate(sizes):
            buf[r, :, :n] = grad[:, start : start + n]
            start += n
        out = grad.new_empty(c, bmax, d)
        _reduce_scatter_flat(out.view(-1), buf.view(-1), group)
        return None, None, *out[:, : ctx.local_rows].unbind(0)


def gather_columns(columns: Sequence[Tensor], group=None) -> tuple[Tensor, int, int]:
    """All-gather the columns (autograd-aware). Returns the gathered (C, world_rows, D) tensor, this rank's first
    row in it, and its local row count."""
    meta = gather_metadata(columns, group)
    sizes = tuple(r[0] for r in meta)
    rank = dist.get_rank(group)
    gathered = _GatherColumns.apply(sizes, group, *columns)
    return gathered, sum(sizes[:rank]), sizes[rank]


def infonce_across_devices(queries: Tensor, docs: Sequence[Tensor], *, group=None, **options) -> Tensor:
    """MNRL of this rank's rows against all gathered columns; a no-op (with a warning) when not distributed.

    The returned loss is the mean over this rank's rows; its gradients reach every rank's embeddings (as with
    sentence-transformers' ``all_gather_with_grad``), so DDP's gradient averaging yields the world-batch loss.
    """
    if not is_distributed():
        functional.warn_once(
            "gather-not-distributed",
            "gather_across_devices=True but torch.distributed is not initialized: using the local batch only. "
            "This is expected on one device; set gather_across_devices=False to remove this warning.",
        )
        return functional.infonce_from_columns(queries, docs, **options)
    gathered, row_start, row_count = gather_columns([queries, *docs], group)
    q_all = gathered[0]
    if functional.resolve_similarity(options.get("similarity", "cosine")) is not None:
        # the fused op takes the candidate pool [P; N_1; ...] as one (K * rows, D) tensor: a view, no copy
        doc_columns = [gathered[1:].reshape(-1, gathered.shape[-1])]
    else:
        doc_columns = list(gathered[1:].unbind(0))
    return functional.infonce_from_columns(q_all, doc_columns, row_start=row_start, row_count=row_count, **options)
