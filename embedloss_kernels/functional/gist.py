"""GIST (guided in-batch negatives) on raw tensors: validation, the backend's ``gist`` op, and
``gather_across_devices`` on the gather schedule. No sentence-transformers import here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import dispatch
from ..core.contract import GIST_MARGIN_STRATEGIES
from ..core.validate import check_embeddings, check_guide, check_margin, check_temperature
from ..distributed import collectives
from ..distributed.gather import gather_columns
from ..ops.autograd import loss_from_op, needs_grad
from .common import check_block_budget, check_block_rows


def gist_from_columns(
    anchor: Tensor,
    docs: Sequence[Tensor],
    anchor_guide: Tensor,
    docs_guide: Sequence[Tensor],
    *,
    temperature: float,
    margin_strategy: str,
    margin: float,
    contrast_anchors: bool,
    contrast_positives: bool,
    row_start: int = 0,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """GIST on already-validated columns: ``anchor`` (B, D) this rank's anchors, each of ``docs`` (Bw, D) a column
    of the (world) batch whose row ``row_start + i`` belongs to anchor ``i``; the guide's embeddings alike."""
    check_block_budget(block_rows)
    candidates = torch.cat([d.contiguous() for d in docs], dim=0) if len(docs) > 1 else docs[0].contiguous()
    with torch.no_grad():  # the guide never gets a gradient
        candidates_guide = (torch.cat([d.detach() for d in docs_guide], dim=0) if len(docs_guide) > 1
                            else docs_guide[0].detach().contiguous())
        anchor_guide = anchor_guide.detach().contiguous()
    a = anchor.contiguous()
    op = dispatch.get_op("gist", a.device, backend)
    return loss_from_op(
        op, a, candidates, anchor_guide, candidates_guide, len(docs), row_start, 1.0 / temperature,
        GIST_MARGIN_STRATEGIES[margin_strategy], margin, bool(contrast_anchors), bool(contrast_positives),
        needs_grad(a, candidates), block_rows,
    )


def gist_loss(
    anchor: Tensor,
    positive: Tensor,
    *negatives: Tensor,
    guide: Sequence[Tensor],
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """GISTEmbedLoss (GIST: guided in-sample selection of negatives), fused: no B x N matrix is kept.

    InfoNCE over cosine similarities divided by ``temperature``, where a guide model's similarities remove likely
    false negatives: with ``t_i`` the guide's similarity of anchor ``i`` and its positive, every candidate whose
    guide similarity to the row's query exceeds ``t_i - margin`` ("absolute") or ``t_i - |t_i| * margin``
    ("relative") is left out of the softmax (never the positive itself).

    Args:
        anchor: (B, D) the model's anchor embeddings.
        positive: (B, D) the positive of each anchor.
        *negatives: any number of (B, D) hard-negative columns (anchor-negative blocks).
        guide: the guide model's embeddings ``(anchor_g, positive_g, *negatives_g)``, (B, D') each (any float
            dtype, same device); they get no gradient.
        temperature: divides the similarities; finite and > 0.
        margin_strategy, margin: the false-negative rule above.
        contrast_anchors: add the anchor-anchor block (each anchor against every anchor, masked by the same rule).
        contrast_positives: add the positive-positive block.
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``None`` (``EMBEDLOSS_BACKEND`` / auto).
        block_rows: anchor rows per block (0: from the ``EMBEDLOSS_BLOCK_MIB`` budget).

    Returns:
        The mean loss over the anchors, a 0-dim float32 tensor (float64 for float64 inputs).
    """
    columns = [anchor, positive, *negatives]
    names = ["anchor", "positive"] + [f"negatives[{i}]" for i in range(len(negatives))]
    check_embeddings(columns, names)
    guide = check_guide(columns, guide, names)
    temperature = check_temperature(temperature)
    margin = check_margin(margin_strategy, margin)
    block_rows = check_block_rows(block_rows)
    return gist_from_columns(
        anchor, columns[1:], guide[0], guide[1:], temperature=temperature, margin_strategy=margin_strategy,
        margin=margin, contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, backend=backend,
        block_rows=block_rows,
    )


def gist_across_devices(
    anchor: Tensor,
    docs: Sequence[Tensor],
    anchor_guide: Tensor,
    docs_guide: Sequence[Tensor],
    *,
    group=None,
    check=None,
    **options,
) -> Tensor:
    """GIST of this rank's anchors against the candidates (and their guide embeddings) of every rank, as
    sentence-transformers' ``gather_across_devices``: anchors are not gathered (the anchor-anchor block stays
    local), this rank's positives start at row ``sum of the lower ranks' batch sizes`` (``rank * B``); the
    candidates' gradients are reduce-scattered back to their owners (the gather schedule). A no-op, with a warning,
    when torch.distributed is not initialized."""
    if check is not None:
        collectives.validate_everywhere(check, anchor.device, group)
    if not collectives.is_distributed():
        collectives.warn_not_distributed()
        return gist_from_columns(anchor, docs, anchor_guide, docs_guide, **options)
    p_all, n_all, row_start, _ = gather_columns(list(docs), group)
    with torch.no_grad():  # the guide's columns: the same gather, no gradient
        pg_all, ng_all, _, _ = gather_columns([d.detach() for d in docs_guide], group)
    world_docs = [p_all, *n_all.view(-1, *p_all.shape).unbind(0)]
    world_guide = [pg_all, *ng_all.view(-1, *pg_all.shape).unbind(0)]
    return gist_from_columns(anchor, world_docs, anchor_guide, world_guide, row_start=row_start, **options)
