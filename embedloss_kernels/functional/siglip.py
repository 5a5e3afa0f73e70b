"""SigLIP (sigmoid) and CLIP losses on raw tensors: validate -> the backend's ``siglip`` op (SigLIP) or ``infonce`` op
(CLIP: symmetric InfoNCE on dot products) -> the saved-gradients rule. No B x N tensor is kept; a tensor
``logit_scale`` / ``logit_bias`` gets its gradient from the same pass."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dispatch
from ..backends.common import work_dtype
from ..core.validate import check_embeddings, check_scale
from ..distributed import collectives
from ..distributed.gather import gather_columns
from ..distributed.ring_siglip import siglip_ring
from ..ops.autograd import loss_from_op, needs_grad
from .common import check_block_budget, check_block_rows
from .infonce import infonce_from_columns


def _as_op_scalar(value, like: Tensor) -> Tensor:
    """A number or one-element tensor as the op takes it: a detached 0-dim tensor in the work dtype on ``like``'s
    device (no host read of a tensor)."""
    if isinstance(value, Tensor):
        return value.detach().reshape(()).to(device=like.device, dtype=work_dtype(like.dtype))
    return torch.tensor(float(value), device=like.device, dtype=work_dtype(like.dtype))


def siglip_from_columns(
    x: Tensor,
    y: Tensor,
    logit_scale,
    logit_bias,
    *,
    positive_offset: int = 0,
    has_positives: bool = True,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """SigLIP of validated rows ``x`` (B, D) against columns ``y`` (N, D): row ``i``'s positive is column
    ``positive_offset + i`` (every pair a negative without ``has_positives``), the loss summed over pairs and divided
    by B. ``logit_scale`` (the multiplier itself) and ``logit_bias``: numbers or one-element tensors."""
    check_block_budget(block_rows)
    x, y = x.contiguous(), y.contiguous()
    params = [p for p in (logit_scale, logit_bias) if isinstance(p, Tensor)]
    op = dispatch.get_op("siglip", x.device, backend)
    return loss_from_op(
        op, x, y, _as_op_scalar(logit_scale, x), _as_op_scalar(logit_bias, x), positive_offset, has_positives,
        needs_grad(x, y, *params), block_rows,
        scale=logit_scale if isinstance(logit_scale, Tensor) else None,
        bias=logit_bias if isinstance(logit_bias, Tensor) else None,
    )


def siglip_across_devices(
    x: Tensor,
    y: Tensor,
    logit_scale,
    logit_bias,
    *,
    schedule: str | None = "ring",
    group=None,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """SigLIP of this rank's validated rows ``x`` against every rank's column block (this rank's ``y``, its
    positives first): OpenCLIP's ``SigLipLoss`` with ``world_size > 1``. Each text's gradient sums every rank's loss;
    the scale's and bias's are this rank's own. ``schedule``: ``"ring"`` (``O(B·D)`` per rank,
    :mod:`embedloss_kernels.distributed.ring_siglip`), ``"gather"`` (all-gather the blocks, one op call with the
    positives at this rank's offset), or ``None``: ``EMBEDLOSS_DISTRIBUTED_SCHEDULE``. Not distributed: the local
    loss, with a warning."""
    chosen = collectives.resolve_schedule(schedule)
    if not collectives.is_distributed():
        collectives.warn_not_distributed()
        return siglip_from_columns(x, y, logit_scale, logit_bias, backend=backend, block_rows=block_rows)
    if chosen == "ring":
        check_block_budget(block_rows)
        sizes = tuple(r[0] for r in collectives.gather_metadata([y], group, "ring"))
        op = dispatch.get_op("siglip", x.device, backend)
        return siglip_ring(x, y, logit_scale, logit_bias, op, sizes, dist.get_rank(group), group, block_rows)
    texts, _, start, _ = gather_columns([y], group, "gather")
    return siglip_from_columns(x, texts, logit_scale, logit_bias, positive_offset=start, backend=backend,
                               block_rows=block_rows)


def siglip_loss(
    x: Tensor,
    y: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """The SigLIP sigmoid loss (Zhai et al. 2023; OpenCLIP's ``SigLipLoss`` on one device), fused.

    ``z_ij = logit_scale * <x_i, y_j> + logit_bias``; the loss is ``-(1/B) sum_ij logsigmoid(t_ij z_ij)`` with
    ``t_ij = 1`` for ``i == j`` and ``-1`` otherwise. The features are used as given (OpenCLIP normalizes them in the
    model, not in the loss).

    Args:
        x, y: (B, D) image and text features (or any two paired embeddings), one dtype and device.
        logit_scale: the multiplier itself (OpenCLIP models return ``logit_scale.exp()``): a finite number or a
            one-element tensor (a tensor that requires grad gets ``d loss / d logit_scale``).
        logit_bias: a finite number, a one-element tensor (gets its gradient), or ``None`` (0).
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``None`` (``EMBEDLOSS_BACKEND`` / auto).
        block_rows: rows per block (0: chosen from the ``EMBEDLOSS_BLOCK_MIB`` budget).

    Returns:
        The loss, a 0-dim float32 tensor (float64 for float64 inputs).
    """
    check_embeddings([x, y], ["x", "y"])
    logit_scale = check_scale(logit_scale, "logit_scale", positive=False, finite=True)
    logit_bias = 0.0 if logit_bias is None else check_scale(logit_bias, "logit_bias", positive=False, finite=True)
    block_rows = check_block_rows(block_rows)
    return siglip_from_columns(x, y, logit_scale, logit_bias, backend=backend, block_rows=block_rows)


def clip_loss(
    x: Tensor,
    y: Tensor,
    logit_scale,
    logit_bias=None,
    *,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """The CLIP contrastive loss (OpenCLIP's ``ClipLoss`` on one device), fused:
    ``(CE(s X Y^T, arange) + CE(s Y X^T, arange)) / 2``, i.e. MNRL with the directions query_to_doc and doc_to_query
    averaged (``per_direction``) on dot products. A ``logit_bias`` shifts every logit of a row equally, which leaves
    both cross-entropies unchanged: a tensor bias gets its exact gradient, 0.

    Args:
        x, y: (B, D) image and text features, used as given (no normalization inside the loss, as OpenCLIP).
        logit_scale: the multiplier, finite and > 0: a number or a one-element tensor (gets its gradient).
        logit_bias: ``None``, a finite number or a one-element tensor.
    """
    check_embeddings([x, y], ["x", "y"])
    logit_scale = check_scale(logit_scale, "logit_scale", positive=True, finite=True)
    if logit_bias is not None:
        logit_bias = check_scale(logit_bias, "logit_bias", positive=False, finite=True)
    block_rows = check_block_rows(block_rows)
    loss = infonce_from_columns(
        x, [y], scale=logit_scale, similarity="dot", directions=("query_to_doc", "doc_to_query"),
        partition_mode="per_direction", hardness_mode=None, hardness_strength=0.0, backend=backend,
        block_rows=block_rows,
    )
    return with_zero_bias_grad(loss, logit_bias)


def with_zero_bias_grad(loss: Tensor, logit_bias) -> Tensor:
    """``loss`` tied to a tensor ``logit_bias`` that requires grad, with its exact gradient 0 (CLIP's bias cancels in
    every softmax), so that it gets a ``.grad`` as under OpenCLIP."""
    if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
        return loss + (logit_bias.reshape(()) * 0.0).to(loss.dtype)
    return loss
