"""CoSENT and AnglE on raw tensors: the backend's ``cosent`` op, O(B log B), no B x B tensor."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import dispatch, reference
from ..core.contract import SIM_ANGLE, SIM_COSINE, SIM_DOT
from ..core.log import warn_once_per_callable
from ..core.validate import check_embeddings, check_labels, check_scale, scale_value
from ..ops.autograd import loss_from_op, needs_grad
from .common import fused_scale, resolve_pair_similarity, similarity_name, unfused


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
                f"similarity_fct {similarity_name(similarity)} is not fused (only pairwise cosine, dot and angle "
                "are); running the plain PyTorch computation.",
            )
        return reference.cosent_pairs_reference(x, y, labels, scale, similarity)
    if not -math.inf < value < math.inf:
        fused_scale(scale)  # says why the plain computation runs
        plain = {SIM_COSINE: reference.pairwise_cos_sim, SIM_DOT: reference.pairwise_dot_score,
                 SIM_ANGLE: reference.pairwise_angle_sim}[code]
        return reference.cosent_pairs_reference(x, y, labels, scale, plain)
    if labels.dtype == torch.bool:
        labels = labels.int()
    labels = labels.to(device=x.device, dtype=torch.float64)
    x, y = x.contiguous(), y.contiguous()
    op = dispatch.get_op("cosent", x.device, backend)
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
    NaN/Inf labels raise (see ``core.validate.check_finite_inputs``)."""
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
