"""Matryoshka MNRL on raw tensors: every prefix dim's loss from one fused pass (the backend's ``matryoshka`` op)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from .. import dispatch, reference
from ..core.log import warn_once
from ..core.validate import (
    check_directions,
    check_embeddings,
    check_hardness,
    check_matryoshka_dims,
    check_scale,
)
from ..ops.autograd import loss_from_op, needs_grad
from .common import check_block_rows, fused_scale, op_inputs, resolve_similarity, similarity_name


def sorted_dims(dims: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[float]]:
    """The dims increasing with their weights; a dim given twice counts once with the weights summed (the same
    sum of losses)."""
    merged: dict[int, float] = {}
    for d, w in zip(dims, weights):
        merged[int(d)] = merged.get(int(d), 0.0) + float(w)
    order = sorted(merged)
    return order, [merged[d] for d in order]


def matryoshka_from_columns(
    queries: Tensor,
    docs: Sequence[Tensor],
    dims: Sequence[int],
    weights: Sequence[float],
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
    """Matryoshka MNRL on already-validated columns and dims (as :func:`infonce_from_columns`)."""
    row_count = queries.shape[0] - row_start if row_count is None else row_count
    dims, weights = sorted_dims(dims, weights)
    kind = resolve_similarity(similarity)
    value, param = fused_scale(scale)
    if kind is None:
        warn_once(
            f"unfused:{similarity_name(similarity)}",
            f"similarity_fct {similarity_name(similarity)} is not fused (only cosine and dot product are); "
            "running the plain materialized PyTorch computation once per Matryoshka dim.",
        )
    if kind is None or value is None:
        plain = similarity if kind is None else {"cosine": reference.cos_sim, "dot": reference.dot_score}[kind]
        if len(docs) == 1 and docs[0].shape[0] != queries.shape[0]:  # a candidate pool [P; N_1; ...] in one tensor
            docs = list(docs[0].view(-1, *queries.shape).unbind(0))
        return reference.matryoshka_reference(
            queries, docs, dims, weights, plain, scale=scale, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
            row_start=row_start, row_count=row_count,
        )
    q, candidates, bits, hardness = op_inputs(queries, docs, directions, hardness_mode, hardness_strength, block_rows)
    op = dispatch.get_op("matryoshka", q.device, backend)
    return loss_from_op(
        op, q, candidates, dims, weights, row_start, row_count, value, bits, partition_mode == "joint", hardness,
        hardness_strength, needs_grad(q, candidates, *(() if param is None else (param,))), block_rows, scale=param,
    )


def matryoshka_mnrl_loss(
    queries: Tensor,
    positives: Tensor,
    *negatives: Tensor,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    scale: float = 20.0,
    similarity: str | Callable = "cosine",
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """Matryoshka MNRL: ``sum_k weights[k] * MNRL`` on the embeddings truncated to ``dims[k]`` coordinates and
    L2-normalized (as sentence-transformers' ``MatryoshkaLoss`` around ``MultipleNegativesRankingLoss``), every dim
    from one fused pass over the full embeddings.

    Args:
        queries, positives, *negatives: (B, D) full-dimension embeddings, as :func:`multiple_negatives_ranking_loss`.
        dims: the prefix dims, any order, each in ``1..D``.
        weights: one weight per dim (default: all 1).
        scale, similarity, directions, partition_mode, hardness_mode, hardness_strength, backend, block_rows: as
            :func:`multiple_negatives_ranking_loss`. Each prefix is L2-normalized, so ``"cosine"`` and ``"dot"``
            give the same loss; another callable runs the plain PyTorch computation once per dim.

    Returns:
        The weighted sum of the per-dim mean losses, a 0-dim float32 tensor (float64 for float64 inputs).
    """
    columns = [queries, positives, *negatives]
    names = ["queries", "positives"] + [f"negatives[{i}]" for i in range(len(negatives))]
    check_embeddings(columns, names)
    dims, weights = check_matryoshka_dims(dims, weights, queries.shape[1])
    scale = check_scale(scale, positive=True, finite=True)
    directions = check_directions(directions, partition_mode)
    hardness_strength = check_hardness(hardness_mode, hardness_strength)
    block_rows = check_block_rows(block_rows)
    return matryoshka_from_columns(
        queries, [positives, *negatives], dims, weights, scale=scale, similarity=similarity, directions=directions,
        partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
        backend=backend, block_rows=block_rows,
    )
