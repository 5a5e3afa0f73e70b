"""The collectives under both schedules: every rank's shapes agreed before the embeddings move, validation that fails
on every rank together, the flat all-gather and reduce-scatter, and the schedule's name
(``EMBEDLOSS_DISTRIBUTED_SCHEDULE``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.log import warn_once

_META_FIELDS = 6  # rows, dim, columns, dtype, schedule, ring blocked: gathered before the embeddings, every rank checks
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_DTYPE_NAMES = {code: str(dtype) for dtype, code in _DTYPE_CODES.items()}
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


def validate_everywhere(check: Callable[[], None], device: torch.device, group=None) -> None:
    """``check()`` here, and under a process group on every rank with :func:`agree_on_validation`."""
    if is_distributed():
        agree_on_validation(check, device, group)
    else:
        check()


def warn_not_distributed() -> None:
    warn_once(
        "gather-not-distributed",
        "gather_across_devices=True but torch.distributed is not initialized: using the local batch only. "
        "This is expected on one device; set gather_across_devices=False to remove this warning.",
    )


def all_gather_flat(out: Tensor, inp: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def reduce_scatter_flat(out: Tensor, inp: Tensor, group) -> None:
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


def gather_metadata(columns: Sequence[Tensor], group=None, schedule: str = "gather",
                    ring_blocker: str | None = None) -> list[tuple[int, ...]]:
    """(rows, dim, columns, dtype code, schedule code, ring blocked) of every rank, after one small all-gather; raises
    a ValueError on every rank when the ranks disagree on dim, column count, dtype or schedule (so no rank waits on a
    collective forever). ``ring_blocker``: why this rank runs the gather schedule although the ring was asked for; a
    schedule mismatch then names it."""
    first = columns[0]
    meta = torch.tensor([first.shape[0], first.shape[1], len(columns), _DTYPE_CODES.get(first.dtype, 0),
                         SCHEDULES.index(schedule), ring_blocker is not None], dtype=torch.int64,
                        device=first.device)
    world = dist.get_world_size(group)
    out = torch.empty(world * _META_FIELDS, dtype=torch.int64, device=first.device)
    all_gather_flat(out, meta, group)
    rows = [tuple(int(v) for v in r) for r in out.view(world, _META_FIELDS).tolist()]
    for field, name in ((1, "embedding dim"), (2, "number of columns"), (3, "dtype")):
        values = [_DTYPE_NAMES.get(r[field], "another dtype") if field == 3 else r[field] for r in rows]
        if len(set(values)) > 1:
            raise ValueError(
                f"gather_across_devices: every rank must pass embeddings with the same {name}; got "
                + ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
            )
    if len({r[4] for r in rows}) > 1 and any(r[5] for r in rows):
        # every rank sees the same rows, so every rank comes here and gathers the blocked ranks' reasons: the error
        # names the cause on every rank, not only where it arose
        reasons = gather_text(ring_blocker or "", first.device, group)
        why = "; ".join(f"rank {i}: {reasons[i]}" for i, r in enumerate(rows) if r[5])
        raise ValueError(
            f"gather_across_devices: {SCHEDULE_ENV}=ring, but not every rank can run the ring schedule ({why}), so "
            "those ranks run the gather schedule and the ranks would not meet. Pass the same similarity_fct (cosine "
            f"or dot) and a finite, non-zero scale on every rank, or set {SCHEDULE_ENV}=gather"
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


def gather_text(text: str, device: torch.device, group) -> list[str]:
    """Every rank's ``text`` (UTF-8 bytes, padded to the longest), after two small all-gathers."""
    data = torch.tensor(list(text.encode()), dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    lengths = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_flat(lengths, torch.tensor([data.numel()], dtype=torch.int64, device=device), group)
    width = max(1, *(int(n) for n in lengths.tolist()))
    padded = torch.zeros(width, dtype=torch.int64, device=device)
    padded[:data.numel()] = data
    out = torch.empty(world * width, dtype=torch.int64, device=device)
    all_gather_flat(out, padded, group)
    return [bytes(row[:n]).decode(errors="replace")
            for row, n in zip(out.view(world, width).tolist(), lengths.tolist())]


def agree_on_validation(check: Callable[[], None], device: torch.device, group) -> None:
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
