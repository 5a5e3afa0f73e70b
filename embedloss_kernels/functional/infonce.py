"""MNRL / InfoNCE on raw tensors: validate -> resolve the similarity and scale -> schedule (local, gather or ring) ->
the backend's ``infonce`` op (:mod:`embedloss_kernels.dispatch`) under the saved-gradients rule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import dispatch, reference
from ..core.log import warn_once, warn_once_per_callable
from ..core.validate import check_directions, check_embeddings, check_hardness, check_scale, scale_value
from ..distributed import collectives, ring
from ..distributed.gather import gather_columns
from ..ops.autograd import loss_from_op, needs_grad
from .common import check_block_rows, fused_scale, op_inputs, resolve_similarity, similarity_name, unfused
from .matryoshka import matryoshka_from_columns


def infonce_from_columns(
    queries: Tensor,
    docs: Sequence[Tensor],
    *,
    scale: float,
    similarity: str | Callable,
    directions: Sequence[str],
    partition_mode: str,
    hardness_mode: str | None,
    hardness_strength: float,
    row_start: int = 0,
    row_count: int | None = None,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """MNRL on already-validated columns: ``queries`` and each of ``docs`` (Bq, D) hold the whole (world) batch,
    and the loss averages over anchor rows ``row_start .. row_start + row_count - 1``."""
    row_count = queries.shape[0] - row_start if row_count is None else row_count
    kind = resolve_similarity(similarity)
    value, param = fused_scale(scale)
    if kind is None:
        if not isinstance(similarity, unfused):
            warn_once_per_callable(
                "infonce",
                similarity,
                f"similarity_fct {similarity_name(similarity)} is not fused (only cosine and dot product are); "
                "running the plain materialized PyTorch computation.",
            )
    if kind is None or value is None:
        plain = similarity if kind is None else {"cosine": reference.cos_sim, "dot": reference.dot_score}[kind]
        if len(docs) == 1 and docs[0].shape[0] != queries.shape[0]:  # a candidate pool [P; N_1; ...] in one tensor
            docs = list(docs[0].view(-1, *queries.shape).unbind(0))
        return reference.infonce_reference(
            queries, docs, scale, plain, directions, partition_mode, hardness_mode, hardness_strength,
            row_start, row_count,
        )
    q, candidates, bits, hardness = op_inputs(queries, docs, directions, hardness_mode, hardness_strength, block_rows)
    op = dispatch.get_op("infonce", q.device, backend)
    return loss_from_op(
        op, q, candidates, row_start, row_count, value, kind == "cosine", bits, partition_mode == "joint", hardness,
        hardness_strength, needs_grad(q, candidates, *(() if param is None else (param,))), block_rows, scale=param,
    )


def multiple_negatives_ranking_loss(
    queries: Tensor,
    positives: Tensor,
    *negatives: Tensor,
    scale: float = 20.0,
    similarity: str | Callable = "cosine",
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """MultipleNegativesRankingLoss / InfoNCE with in-batch negatives, fused (no B x N matrix is kept).

    Args:
        queries: (B, D) anchors.
        positives: (B, D) the positive document of each query.
        *negatives: any number of (B, D) hard-negative columns.
        scale: inverse temperature, finite and > 0: a number, or a one-element tensor (an ``nn.Parameter`` gets
            its gradient ``d loss / d scale``, computed in the same fused pass; reading its value costs one host sync).
        similarity: ``"cosine"``, ``"dot"``, or a callable ``(a, b) -> (n, m)`` (not fused: plain PyTorch).
        directions, partition_mode, hardness_mode, hardness_strength: as sentence-transformers'
            ``MultipleNegativesRankingLoss``.
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``None`` (``EMBEDLOSS_BACKEND`` / auto).
        block_rows: anchor rows per block (0: chosen from the ``EMBEDLOSS_BLOCK_MIB`` budget).

    Returns:
        The mean loss, a 0-dim float32 tensor (float64 for float64 inputs).
    """
    columns = [queries, positives, *negatives]
    names = ["queries", "positives"] + [f"negatives[{i}]" for i in range(len(negatives))]
    check_embeddings(columns, names)
    scale = check_scale(scale, positive=True, finite=True)
    directions = check_directions(directions, partition_mode)
    hardness_strength = check_hardness(hardness_mode, hardness_strength)
    block_rows = check_block_rows(block_rows)
    return infonce_from_columns(
        queries, [positives, *negatives], scale=scale, similarity=similarity, directions=directions,
        partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
        backend=backend, block_rows=block_rows,
    )


infonce_loss = multiple_negatives_ranking_loss


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
    blocks round the ring, :mod:`embedloss_kernels.distributed.ring`; cosine and dot similarity with a finite,
    non-zero scale), or ``None``: ``EMBEDLOSS_DISTRIBUTED_SCHEDULE`` (how the drop-in losses choose). A bad value
    raises ``ValueError`` (on every rank when ``check`` is given, as part of the agreed validation).
    ``matryoshka``: ``(dims, weights)`` for the fused Matryoshka loss (gather schedule only).
    """
    chosen: list[str] = []

    def validate() -> None:
        chosen.append(collectives.resolve_schedule(schedule))
        if check is not None:
            check()

    device = queries.device if isinstance(queries, Tensor) else torch.device("cpu")
    if check is not None:
        collectives.validate_everywhere(validate, device, group)
    else:
        validate()
    local = (dict(matryoshka=matryoshka) if matryoshka is not None else {})
    if not collectives.is_distributed():
        collectives.warn_not_distributed()
        return _local_step(queries, docs, 0, None, **local, **options)
    similarity = options.get("similarity", "cosine")
    kind = resolve_similarity(similarity)
    scale = scale_value(options.get("scale", 20.0))
    blocker = None  # why this rank cannot take the ring: the gather schedule's op handles every case
    if matryoshka is not None:
        blocker = "the Matryoshka loss runs on the gather schedule only"
    elif kind is None:
        blocker = (f"its similarity_fct {similarity_name(getattr(similarity, 'fn', similarity))} is not fused "
                   "(the ring covers cosine and dot similarity only)")
    elif not (scale != 0 and -math.inf < scale < math.inf):
        blocker = f"its scale {scale} is not finite and non-zero"
    use_ring = chosen[0] == "ring" and blocker is None
    if chosen[0] == "ring" and blocker is not None:
        warn_once(f"ring-blocked:{blocker}", f"the ring schedule cannot run here ({blocker}); running the gather "
                  "schedule.")
    columns = [queries, *docs]
    if use_ring:
        sizes = tuple(r[0] for r in collectives.gather_metadata(columns, group, "ring"))
        opts = {k: v for k, v in options.items() if k not in ("similarity", "backend")}
        return ring.infonce_ring(columns, sizes, group, cosine=kind == "cosine", **opts)
    q_all, a_all, row_start, row_count = gather_columns(columns, group, "gather", blocker)
    # the fused op takes the candidate pool [P; N_1; ...] as one (K * rows, D) tensor, as gathered
    doc_columns = [a_all] if kind is not None else list(a_all.view(-1, *q_all.shape).unbind(0))
    return _local_step(q_all, doc_columns, row_start, row_count, **local, **options)


def _local_step(queries, docs, row_start, row_count, matryoshka=None, **options) -> Tensor:
    if matryoshka is not None:
        return matryoshka_from_columns(queries, docs, *matryoshka, row_start=row_start, row_count=row_count,
                                       **options)
    return infonce_from_columns(queries, docs, row_start=row_start, row_count=row_count, **options)
