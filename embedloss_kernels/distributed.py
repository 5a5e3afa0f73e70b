"""gather_across_devices: this rank's rows against every rank's columns over torch.distributed.

Two schedules compute the same loss and gradients: ``"gather"`` (the default) and ``"ring"``. Pick one with
``infonce_across_devices(..., schedule="ring")``; the drop-in losses (``MultipleNegativesRankingLoss``, the symmetric
and the cached ones), which keep sentence-transformers' constructor signature, read the environment variable
``EMBEDLOSS_DISTRIBUTED_SCHEDULE`` (``gather`` by default, or ``ring``; any other value raises a ``ValueError``).
Every rank must use the same schedule (checked with the shapes, so a mismatch raises on every rank).

**gather.** Each rank all-gathers its ``C = 1 + K`` local columns (queries, positives, negatives) straight into the op's
layout (every rank's queries, and the candidate pool ``[P; N_1; ...]``), one collective per column, and runs the
fused op on its own anchor rows (``row_start`` = the number of rows on lower ranks) against every gathered column.
The op returns the gradients of the gathered tensors; the gather's backward sums them back onto their owning
ranks with a reduce-scatter per column (all_reduce + slice where the process group has none). Memory per rank:
the gathered columns (``W * B * C * D``) and their gradients, plus the op's row block; never a world x world
matrix.

Ranks may hold different local batch sizes: columns are padded to the largest one for the collective and the
padding rows are dropped before the op, so they are never scored.

**ring** (``embedloss_kernels.ring``): no rank ever holds the world's columns. Each rank's column block travels round
the ring while the current one is computed on: a forward pass of per-row log-sum-exp statistics, then, in backward,
a second circle carrying each block's column-gradient accumulator back to its owner. Memory per rank: a few local
blocks instead of ``2 W`` of them; communication ``(3W - 2)`` block hops instead of ``2 (W - 1)``, posted to
overlap compute (not measured yet: only gloo on one host has run). It uses the ``torch`` backend's maths whatever
``backend`` says, and covers cosine and dot similarity; any other ``similarity_fct`` runs the gather schedule (with
a warning).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional, ring
from ._validate import scale_value

_META_FIELDS = 5  # rows, dim, columns, dtype code, schedule: gathered before the embeddings, every rank checks them
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
SCHEDULES = ("gather", "ring")
SCHEDULE_ENV = "EMBEDLOSS_DISTRIBUTED_SCHEDULE"


def schedule_from_env() -> str:
    """The schedule named by ``EMBEDLOSS_DISTRIBUTED_SCHEDULE`` (``"gather"`` when unset or empty)."""
    raw = os.environ.get(SCHEDULE_ENV, "")
    value = raw.strip().lower() or "gather"
    if value not in SCHEDULES:
        raise ValueError(f"{SCHEDULE_ENV} must be one of {', '.join(map(repr, SCHEDULES))} (or unset for 'gather'); "
                         f"got {raw!r}")
    return value


def resolve_schedule(schedule: str | None) -> str:
    """``schedule`` checked, or the environment's when ``None``."""
    if schedule is None:
        return schedule_from_env()
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}")
    return schedule


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


def gather_metadata(columns: Sequence[Tensor], group=None, schedule: str = "gather") -> list[tuple[int, ...]]:
    """(rows, dim, columns, dtype code, schedule code) of every rank, after one small all-gather; raises the same
    ValueError on every rank when the ranks disagree on dim, column count, dtype or schedule (so no rank waits on a
    collective forever)."""
    first = columns[0]
    meta = torch.tensor([first.shape[0], first.shape[1], len(columns), _DTYPE_CODES.get(first.dtype, 0),
                         SCHEDULES.index(schedule)], dtype=torch.int64, device=first.device)
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
    if len({r[4] for r in rows}) > 1:
        raise ValueError(
            f"gather_across_devices: every rank must use the same schedule ({SCHEDULE_ENV} / schedule=); got "
            + ", ".join(f"rank {i}: {SCHEDULES[r[4]]!r}" for i, r in enumerate(rows))
        )
    if any(r[0] == 0 for r in rows):
        raise ValueError(
            "gather_across_devices: every rank must hold at least one row; got local batch sizes "
            + str([r[0] for r in rows])
        )
    return rows


class _GatherColumns(torch.autograd.Function):
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
                _all_gather_flat(target.view(-1), col.contiguous().view(-1), group)
        else:
            local = torch.stack([col.contiguous() for col in columns], dim=0)
            if b < bmax:
                local = torch.cat([local, local.new_zeros(c, bmax - b, d)], dim=1)
            buf = local.new_empty(world, c, bmax, d)
            _all_gather_flat(buf.view(-1), local.view(-1), group)
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
                _reduce_scatter_flat(o.view(-1), g.view(-1), group)
            return None, None, *out
        buf = ref.new_zeros(len(sizes), c, bmax, d)
        start = 0
        for r, rows in enumerate(sizes):
            for i, g in enumerate(grads):
                buf[r, i, :rows] = g[start : start + rows]
            start += rows
        out = ref.new_empty(c, bmax, d)
        _reduce_scatter_flat(out.view(-1), buf.view(-1), group)
        return None, None, *out[:, :b].unbind(0)


def gather_columns(columns: Sequence[Tensor], group=None) -> tuple[Tensor, Tensor, int, int]:
    """All-gather the columns (autograd-aware). Returns every rank's queries (N, D), the candidate pool
    (K * N, D), this rank's first row and its local row count."""
    meta = gather_metadata(columns, group)
    sizes = tuple(r[0] for r in meta)
    rank = dist.get_rank(group)
    q_all, a_all = _GatherColumns.apply(sizes, group, *columns)
    return q_all, a_all, sum(sizes[:rank]), sizes[rank]


def _agree_on_validation(check: Callable[[], None], device: torch.device, group) -> None:
    """Run ``check`` on every rank and fail on every rank if it failed on any: a rank that raised alone would
    leave the others waiting in the next collective until the process group times out."""
    error = None
    try:
        check()
    except (ValueError, TypeError) as exc:
        error = exc
    failed = torch.tensor([0 if error is None else 1 << dist.get_rank(group)], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.SUM, group=group)
    if error is not None:
        raise error
    if int(failed.item()):
        ranks = [r for r in range(dist.get_world_size(group)) if int(failed.item()) >> r & 1]
        raise ValueError(f"gather_across_devices: the input of rank(s) {ranks} failed validation (see the error "
                         "raised there); every rank stops here instead of waiting on a collective")


def infonce_across_devices(
    queries: Tensor,
    docs: Sequence[Tensor],
    *,
    group=None,
    check: Callable[[], None] | None = None,
    schedule: str | None = "gather",
    matryoshka: tuple[Sequence[int], Sequence[float]] | None = None,
    **options,
) -> Tensor:
    """MNRL of this rank's rows against all ranks' columns; a no-op (with a warning) when not distributed.

    The returned loss is the mean over this rank's rows; its gradients reach every rank's embeddings (as with
    sentence-transformers' ``all_gather_with_grad``), so DDP's gradient averaging yields the world-batch loss.
    ``check`` validates this rank's input; under a process group every rank learns whether any rank failed.
    ``schedule``: ``"gather"`` (all-gather the columns, reduce-scatter their gradients), ``"ring"`` (pass column
    blocks round the ring, :mod:`embedloss_kernels.ring`; cosine and dot similarity, any other similarity runs
    the gather schedule), or ``None``: ``EMBEDLOSS_DISTRIBUTED_SCHEDULE`` (how the drop-in losses choose). A bad
    value raises ``ValueError`` (on every rank when ``check`` is given, as part of the agreed validation).
    ``matryoshka``: ``(dims, weights)`` for the fused Matryoshka loss (gather schedule only: under ``"ring"`` it runs
    the gather schedule, with a warning).
    """
    chosen: list[str] = []

    def validate() -> None:
        chosen.append(resolve_schedule(schedule))
        if check is not None:
            check()

    if is_distributed() and check is not None:
        device = queries.device if isinstance(queries, Tensor) else torch.device("cpu")
        _agree_on_validation(validate, device, group)
    else:
        validate()
    if not is_distributed():
        functional.warn_once(
            "gather-not-distributed",
            "gather_across_devices=True but torch.distributed is not initialized: using the local batch only. "
            "This is expected on one device; set gather_across_devices=False to remove this warning.",
        )
        if matryoshka is not None:
            return functional.matryoshka_from_columns(queries, docs, *matryoshka, **options)
        return functional.infonce_from_columns(queries, docs, **options)
    kind = functional.resolve_similarity(options.get("similarity", "cosine"))
    scale = scale_value(options.get("scale", 20.0))
    # the ring needs a fused similarity and a finite, non-zero scale (the gather schedule's op handles the rest)
    use_ring = (chosen[0] == "ring" and kind is not None and matryoshka is None and scale != 0
                and -math.inf < scale < math.inf)
    if chosen[0] == "ring" and matryoshka is not None:
        functional.warn_once(
            "ring-matryoshka", "the ring schedule does not cover the Matryoshka loss; it runs the gather schedule."
        )
    elif chosen[0] == "ring" and kind is None:
        functional.warn_once(
            "ring-unfused-similarity",
            "the ring schedule covers cosine and dot similarity only; this similarity_fct runs the gather schedule.",
        )
    columns = [queries, *docs]
    meta = gather_metadata(columns, group, "ring" if use_ring else "gather")
    sizes = tuple(r[0] for r in meta)
    if use_ring:
        opts = {k: v for k, v in options.items() if k not in ("similarity", "backend")}
        return ring.infonce_ring(columns, sizes, group, cosine=kind == "cosine", **opts)
    rank = dist.get_rank(group)
    q_all, a_all = _GatherColumns.apply(sizes, group, *columns)
    row_start, row_count = sum(sizes[:rank]), sizes[rank]
    if kind is not None:
        # the fused op takes the candidate pool [P; N_1; ...] as one (K * rows, D) tensor, as gathered
        doc_columns = [a_all]
    else:
        doc_columns = list(a_all.view(-1, q_all.shape[0], q_all.shape[1]).unbind(0))
    if matryoshka is not None:
        return functional.matryoshka_from_columns(q_all, doc_columns, *matryoshka, row_start=row_start,
                                                  row_count=row_count, **options)
    return functional.infonce_from_columns(q_all, doc_columns, row_start=row_start, row_count=row_count, **options)
