"""Functional API on raw tensors: validation, backend choice, then one fused op call.

No sentence-transformers import here: these functions serve users with their own training loops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _backends, reference
from ._validate import (
    check_directions,
    check_embeddings,
    check_hardness,
    check_labels,
    check_matryoshka_dims,
    check_scale,
    scale_value,
)
from .ops import DIRECTION_BITS, HARDNESS_CODES, SIM_ANGLE, SIM_COSINE, SIM_DOT
from .ops.autograd import loss_from_op, needs_grad
from .ops.torch_ops import block_budget_bytes

logger = logging.getLogger("embedloss_kernels")
_warned: set[str] = set()

_MATRIX_SIMS = {"cosine": "cosine", "cos": "cosine", "cos_sim": "cosine", "dot": "dot", "dot_score": "dot"}
_ST_MATRIX_NAMES = {"cos_sim": "cosine", "pytorch_cos_sim": "cosine", "dot_score": "dot"}
_PAIR_SIMS = {"cosine": SIM_COSINE, "cos": SIM_COSINE, "dot": SIM_DOT, "angle": SIM_ANGLE}
_ST_PAIR_NAMES = {"pairwise_cos_sim": SIM_COSINE, "pairwise_dot_score": SIM_DOT, "pairwise_angle_sim": SIM_ANGLE}


_warned_callables: dict[tuple, tuple] = {}


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def warn_once_per_callable(kind: str, fn: Callable, message: str) -> None:
    """Log ``message`` the first time ``fn`` is used for ``kind`` ("infonce" / "cosent"). Keyed by the callable's
    identity (a bound method by its function and instance), not its name: two lambdas are two callables. The
    callable is kept alive, so its id cannot be reused by a later one."""
    owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    key = (kind, id(owner), id(func)) if owner is not None and func is not None else (kind, id(fn))
    if key not in _warned_callables:
        _warned_callables[key] = (fn, owner)
        logger.warning(message)


class unfused:  # noqa: N801 - used like a function: ``unfused(similarity)``
    """A similarity wrapped so that the plain materialized path computes it, without the "not fused" warning (the
    modules use it where the fused kernels do not apply, e.g. an infinite hardness penalty)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        return self.fn(a, b)


def _is_st_function(fn) -> bool:
    return getattr(fn, "__module__", "").startswith("sentence_transformers")


def resolve_similarity(similarity) -> str | None:
    """``"cosine"`` / ``"dot"`` for a similarity the fused op computes, ``None`` for any other callable."""
    if isinstance(similarity, str):
        if similarity.lower() not in _MATRIX_SIMS:
            raise ValueError(f"similarity must be 'cosine', 'dot' or a callable, got {similarity!r}")
        return _MATRIX_SIMS[similarity.lower()]
    if not callable(similarity):
        raise TypeError(f"similarity_fct must be callable or 'cosine'/'dot', got {type(similarity).__name__}")
    if isinstance(similarity, unfused):
        return None
    if similarity is reference.cos_sim:
        return "cosine"
    if similarity is reference.dot_score:
        return "dot"
    if _is_st_function(similarity) and getattr(similarity, "__name__", "") in _ST_MATRIX_NAMES:
        return _ST_MATRIX_NAMES[similarity.__name__]
    return None


def resolve_pair_similarity(similarity) -> int | None:
    """The op's similarity code for a pairwise similarity it computes, ``None`` for any other callable."""
    if isinstance(similarity, str):
        if similarity.lower() not in _PAIR_SIMS:
            raise ValueError(f"similarity must be 'cosine', 'dot', 'angle' or a callable, got {similarity!r}")
        return _PAIR_SIMS[similarity.lower()]
    if not callable(similarity):
        raise TypeError(f"similarity_fct must be callable or a name, got {type(similarity).__name__}")
    if isinstance(similarity, unfused):
        return None
    ours = {reference.pairwise_cos_sim: SIM_COSINE, reference.pairwise_dot_score: SIM_DOT,
            reference.pairwise_angle_sim: SIM_ANGLE}
    if similarity in ours:
        return ours[similarity]
    if _is_st_function(similarity) and getattr(similarity, "__name__", "") in _ST_PAIR_NAMES:
        return _ST_PAIR_NAMES[similarity.__name__]
    return None


def _similarity_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _fused_scale(scale) -> tuple[float | None, Tensor | None]:
    """The scale's value for a fused op and the tensor that gets its gradient (``None`` for a number); value
    ``None`` when the fused op must not run: an infinite scale (every logit is infinite: the loss is NaN, as
    sentence-transformers', which the plain computation reproduces) or a learnable scale at 0 (its gradient
    identity divides by the scale)."""
    value = scale_value(scale)
    param = scale if isinstance(scale, Tensor) else None
    if not -math.inf < value < math.inf:
        warn_once("infinite-scale", f"scale={value}: every logit is infinite, so the loss and its gradients are NaN "
                  "(as sentence-transformers'); running the plain PyTorch computation.")
        return None, param
    if param is not None and value == 0:
        return None, param
    return value, param


# ----------------------------------------------------------------------------------------------------------------
# MNRL / InfoNCE
# ----------------------------------------------------------------------------------------------------------------
def _op_inputs(queries: Tensor, docs: Sequence[Tensor], directions: Sequence[str], hardness_mode: str | None,
               hardness_strength: float, block_rows: int) -> tuple[Tensor, Tensor, int, int]:
    """What the MNRL-family ops take: contiguous queries, the candidate columns stacked (K*Bq, D), the direction
    bits and the hardness code."""
    if block_rows == 0:
        block_budget_bytes()  # the automatic block size reads EMBEDLOSS_BLOCK_MIB: a bad value fails here, clearly
    bits = 0
    for name in directions:
        bits |= DIRECTION_BITS[name]
    hardness = HARDNESS_CODES[hardness_mode] if hardness_strength > 0 else HARDNESS_CODES[None]
    candidates = torch.cat([d.contiguous() for d in docs], dim=0) if len(docs) > 1 else docs[0].contiguous()
    return queries.contiguous(), candidates, bits, hardness


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
    value, param = _fused_scale(scale)
    if kind is None:
        if not isinstance(similarity, unfused):
            warn_once_per_callable(
                "infonce",
                similarity,
                f"similarity_fct {_similarity_name(similarity)} is not fused (only cosine and dot product are); "
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
    q, candidates, bits, hardness = _op_inputs(queries, docs, directions, hardness_mode, hardness_strength, block_rows)
    op = _backends.get_backend(q.device, backend).infonce
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
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 0:
        raise ValueError(f"block_rows must be a non-negative int (0 = automatic), got {block_rows!r}")
    return infonce_from_columns(
        queries, [positives, *negatives], scale=scale, similarity=similarity, directions=directions,
        partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
        backend=backend, block_rows=block_rows,
    )


infonce_loss = multiple_negatives_ranking_loss


# ----------------------------------------------------------------------------------------------------------------
# Matryoshka MNRL
# ----------------------------------------------------------------------------------------------------------------
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
    if kind is None:
        warn_once(
            f"unfused:{_similarity_name(similarity)}",
            f"similarity_fct {_similarity_name(similarity)} is not fused (only cosine and dot product are); "
            "running the plain materialized PyTorch computation once per Matryoshka dim.",
        )
        return reference.matryoshka_reference(
            queries, docs, dims, weights, similarity, scale=scale, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
            row_start=row_start, row_count=row_count,
        )
    if isinstance(scale, Tensor) and scale.requires_grad:
        raise NotImplementedError(
            "embedloss_kernels: the fused Matryoshka loss has no gradient for a learnable (requires_grad) scale yet; "
            "pass a number, or a tensor that does not require grad"
        )
    scale = scale_value(scale)
    q, candidates, bits, hardness = _op_inputs(queries, docs, directions, hardness_mode, hardness_strength, block_rows)
    op = _backends.get_matryoshka_op(q.device, backend)
    return loss_from_op(
        op, q, candidates, dims, weights, row_start, row_count, scale, bits, partition_mode == "joint", hardness,
        hardness_strength, needs_grad(q, candidates), block_rows,
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
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 0:
        raise ValueError(f"block_rows must be a non-negative int (0 = automatic), got {block_rows!r}")
    return matryoshka_from_columns(
        queries, [positives, *negatives], dims, weights, scale=scale, similarity=similarity, directions=directions,
        partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
        backend=backend, block_rows=block_rows,
    )


# ----------------------------------------------------------------------------------------------------------------
# CoSENT / AnglE
# ----------------------------------------------------------------------------------------------------------------
def cosent_from_pairs(
    x: Tensor, y: Tensor, labels: Tensor, *, scale: float, similarity, backend: str | None = None
) -> Tensor:
    """CoSENT on already-validated pairs and flat labels."""
    code = resolve_pair_similarity(similarity)
    value = scale_value(scale)
    param = scale if isinstance(scale, Tensor) else None
    if code is None:
        if not isinstance(similarity, unfused):
            warn_once_per_callable(
                "cosent",
                similarity,
                f"similarity_fct {_similarity_name(similarity)} is not fused (only pairwise cosine, dot and angle "
                "are); running the plain PyTorch computation.",
            )
        return reference.cosent_pairs_reference(x, y, labels, scale, similarity)
    if not -math.inf < value < math.inf:
        _fused_scale(scale)  # says why the plain computation runs
        plain = {SIM_COSINE: reference.pairwise_cos_sim, SIM_DOT: reference.pairwise_dot_score,
                 SIM_ANGLE: reference.pairwise_angle_sim}[code]
        return reference.cosent_pairs_reference(x, y, labels, scale, plain)
    if labels.dtype == torch.bool:
        labels = labels.int()
    labels = labels.to(device=x.device, dtype=torch.float64)
    x, y = x.contiguous(), y.contiguous()
    op = _backends.get_backend(x.device, backend).cosent
    tensors = (x, y) if param is None else (x, y, param)
    return loss_from_op(op, x, y, labels, value, code, needs_grad(*tensors), scale=param)


def cosent_loss(
    x: Tensor,
    y: Tensor,
    labels: Tensor,
    *,
    scale: float = 20.0,
    similarity: str | Callable = "cosine",
    backend: str | None = None,
) -> Tensor:
    """CoSENT loss ``log(1 + sum_{y_i > y_j} exp(t_j - t_i))``, ``t = scale * sim(x, y)``, in O(B log B).

    Args:
        x, y: (B, D) the two sides of each pair.
        labels: (B,) similarity labels (float, int or bool); ties never form a pair.
        scale: a finite number (0 and negative values allowed, as sentence-transformers'), or a one-element tensor
            (an ``nn.Parameter`` gets its gradient).
        similarity: ``"cosine"``, ``"dot"``, ``"angle"`` or a pairwise callable ``(a, b) -> (n,)``.
    """
    check_embeddings([x, y], ["x", "y"])
    labels = check_labels(labels, x.shape[0], "cosent_loss")
    scale = check_scale(scale, positive=False, finite=True)
    return cosent_from_pairs(x, y, labels, scale=scale, similarity=similarity, backend=backend)


def angle_pairs(
    embeddings: Sequence[Tensor], labels: Tensor | None, owner: str, strict: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """AnglE's input forms as pairs: (anchor, positive, negative...) tuples become (anchor, doc) pairs labelled
    ``labels`` (or 1) for the positive and ``1 - labels`` for each negative; plain pairs need labels. ``strict``:
    NaN/Inf labels raise (see ``_validate.check_finite_inputs``)."""
    if len(embeddings) > 2:
        anchor = embeddings[0]
        batch = anchor.shape[0]
        if labels is None:
            labels = torch.ones(batch, device=anchor.device)
        labels = check_labels(labels, batch, owner, strict)
        n_neg = len(embeddings) - 2
        pair_labels = torch.cat([labels, (1 - labels).repeat(n_neg)])
        return anchor.repeat(len(embeddings) - 1, 1), torch.cat(list(embeddings[1:]), dim=0), pair_labels
    if labels is None:
        raise ValueError("AnglELoss requires labels for datasets with pairs.")
    return embeddings[0], embeddings[1], check_labels(labels, embeddings[0].shape[0], owner, strict)


def angle_loss(
    anchor: Tensor,
    positive: Tensor,
    *negatives: Tensor,
    labels: Tensor | None = None,
    scale: float = 20.0,
    backend: str | None = None,
) -> Tensor:
    """AnglE loss: CoSENT with the AnglE similarity ``|cos + sin|``.

    Pairs ``(anchor, positive)`` need ``labels``; with negatives, (anchor, positive, negative...) tuples become
    pairs labelled ``labels`` (default 1) and ``1 - labels`` for the negatives.
    """
    columns = [anchor, positive, *negatives]
    check_embeddings(columns, ["anchor", "positive"] + [f"negatives[{i}]" for i in range(len(negatives))])
    x, y, pair_labels = angle_pairs(columns, labels, "angle_loss")
    scale = check_scale(scale, positive=False, finite=True)
    return cosent_from_pairs(x, y, pair_labels, scale=scale, similarity="angle", backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# GIST (guided in-batch negatives): embedloss_kernels/gist.py
# ----------------------------------------------------------------------------------------------------------------
from .gist import gist_loss  # noqa: E402, F401 - the public name
