"""Drop-ins for OpenCLIP 3.3.0's ``open_clip.loss.SigLipLoss`` and ``ClipLoss``: the same constructors, ``forward``
signatures and returns, computed by the fused ops (no B x N logits or labels kept for backward).

* :class:`SigLipLoss`: the ``siglip`` op. With ``world_size > 1`` every ``dist_impl`` (``bidir``, ``shift``,
  ``reduce``, ``gather``) gives the same numbers as OpenCLIP's, through one schedule: by default the ring
  (:mod:`embedloss_kernels.distributed.ring_siglip`: text blocks go round, their gradient accumulators follow them
  back to their owners; ``O(B * D)`` per rank, nothing of OpenCLIP's W blocks of logits kept for backward), or with
  ``EMBEDLOSS_DISTRIBUTED_SCHEDULE=gather`` the gather schedule (all-gather the texts, one op call, ``W * B * D``).
* :class:`ClipLoss`: the ``infonce`` op (query_to_doc + doc_to_query averaged, dot products) with a learnable
  scale; under ``world_size > 1`` the features go through the same gather, with OpenCLIP's gradients for every
  ``local_loss`` x ``gather_with_grad`` combination. A ``logit_bias`` cancels in every softmax: it gets gradient 0.

The features are used as given (OpenCLIP normalizes in the model, not in the loss); ``logit_scale`` is the multiplier
itself (``model.logit_scale.exp()``), a number or a tensor (it and ``logit_bias`` get their gradients). ``chunk_size``
(OpenCLIP main's chunked SigLIP) is accepted and ignored: the fused op needs no chunks. ``cache_labels`` is accepted
(there are no labels to cache). Horovod is not supported. The process group is torch.distributed's default one, whose
rank and size must be the ``rank`` and ``world_size`` given.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .core.validate import check_embeddings, check_scale
from .distributed.collectives import SCHEDULE_ENV
from .distributed.gather import gather_columns
from .functional.infonce import infonce_from_columns
from .functional.siglip import siglip_across_devices, siglip_from_columns, with_zero_bias_grad

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _check_world(owner: str, rank: int, world_size: int) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{owner}: world_size={world_size} but torch.distributed is not initialized; initialize "
                           "the process group first (or pass world_size=1)")
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise ValueError(f"{owner}: rank={rank}, world_size={world_size} were given but the default process group "
                         f"has rank {dist.get_rank()} of {dist.get_world_size()}")


def _check_inputs(owner: str, image_features, text_features, logit_scale, logit_bias, positive_scale: bool):
    check_embeddings([image_features, text_features], ["image_features", "text_features"], strict=False)
    logit_scale = check_scale(logit_scale, "logit_scale", positive=positive_scale, finite=False)
    if logit_bias is not None:
        logit_bias = check_scale(logit_bias, "logit_bias", positive=False, finite=False)
    return logit_scale, logit_bias


class SigLipLoss(nn.Module):
    """Sigmoid loss for language-image pre-training (Zhai et al. 2023), OpenCLIP's ``SigLipLoss``, fused.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)`` returns
    ``-(1/B) sum_ij logsigmoid(t_ij (logit_scale <x_i, y_j> + logit_bias))`` over this rank's B images and every
    rank's texts (``t`` = +1 for the image's own text), or ``{"contrastive_loss": loss}``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 chunk_size: int | None = None):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in DIST_IMPLS:
            raise ValueError(f"SigLipLoss: dist_impl must be one of {DIST_IMPLS} (or None), got {dist_impl!r}")
        self.chunk_size = chunk_size  # accepted for OpenCLIP main's signature; the fused op needs no chunks
        self.prev_num_logits = 0
        self.labels = {}

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        logit_scale, logit_bias = _check_inputs("SigLipLoss", image_features, text_features, logit_scale,
                                                logit_bias, positive_scale=False)
        bias = 0.0 if logit_bias is None else logit_bias
        if self.world_size > 1:
            _check_world("SigLipLoss", self.rank, self.world_size)
            # the ring unless EMBEDLOSS_DISTRIBUTED_SCHEDULE names one (every rank must run the same)
            schedule = None if os.environ.get(SCHEDULE_ENV, "").strip() else "ring"
            loss = siglip_across_devices(image_features, text_features, logit_scale, bias, schedule=schedule)
        else:
            loss = siglip_from_columns(image_features, text_features, logit_scale, bias)
        return {"contrastive_loss": loss} if output_dict else loss


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss, OpenCLIP's ``ClipLoss``, fused.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` returns
    ``(CE(s X Y^T) + CE(s Y X^T)) / 2`` (targets: each row's own pair), or ``{"contrastive_loss": loss}``.
    ``local_loss``: this rank's rows against every rank's columns; else the whole world batch on every rank.
    ``gather_with_grad``: gradients flow back through the gathered features to their ranks; else only through this
    rank's own features (as OpenCLIP's ``gather_features``).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, chunk_size: int | None = None):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss: use_horovod=True is not supported by embedloss_kernels (its exchange runs "
                             "on torch.distributed); use open_clip.loss.ClipLoss for Horovod")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.chunk_size = chunk_size
        self.prev_num_logits = 0
        self.labels = {}

    @staticmethod
    def _infonce(queries, docs, scale, row_start=0, row_count=None, directions=("query_to_doc", "doc_to_query")):
        return infonce_from_columns(
            queries, [docs], scale=scale, similarity="dot", directions=directions, partition_mode="per_direction",
            hardness_mode=None, hardness_strength=0.0, row_start=row_start, row_count=row_count,
        )

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        logit_scale, logit_bias = _check_inputs("ClipLoss", image_features, text_features, logit_scale, logit_bias,
                                                positive_scale=True)
        if self.world_size <= 1:
            loss = self._infonce(image_features, text_features, logit_scale)
        else:
            _check_world("ClipLoss", self.rank, self.world_size)
            loss = self._distributed(image_features, text_features, logit_scale)
        loss = with_zero_bias_grad(loss, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image_features: Tensor, text_features: Tensor, logit_scale) -> Tensor:
        columns = [image_features, text_features]
        if self.gather_with_grad:
            # every rank's features with their gradients (reduce-scattered back to their ranks in backward)
            images, texts, start, count = gather_columns(columns)
            if self.local_loss:
                return self._infonce(images, texts, logit_scale, start, count)
            return self._infonce(images, texts, logit_scale)
        with torch.no_grad():
            images, texts, start, count = gather_columns(columns)
        stop = start + count
        if not self.local_loss:
            # the whole world batch, this rank's own features in their place (the only ones with gradients)
            images = torch.cat([images[:start], image_features, images[stop:]])
            texts = torch.cat([texts[:start], text_features, texts[stop:]])
            return self._infonce(images, texts, logit_scale)
        # local rows against the gathered (gradient-free) columns: the images get theirs from the image-to-text
        # logits only, the texts from the text-to-image logits only
        per_image = self._infonce(torch.cat([images[:start], image_features, images[stop:]]), texts, logit_scale,
                                  start, count, ("query_to_doc",))
        per_text = self._infonce(torch.cat([texts[:start], text_features, texts[stop:]]), images, logit_scale,
                                 start, count, ("query_to_doc",))
        return (per_image + per_text) / 2
