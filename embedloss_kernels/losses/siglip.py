"""``SigLIPLoss`` for sentence-transformers: the sigmoid pairwise loss on the fused ``siglip`` op, with a learnable
scale and bias as the SigLIP paper trains them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional
from ..core.validate import check_embeddings, check_finite_inputs
from ..distributed import collectives
from ..functional.common import resolve_similarity
from ._common import COS_SIM, check_similarity_callable, embed_columns, similarity_name, warn_if_nonfinite

_CITATION = """
@inproceedings{zhai2023sigmoid,
    title={Sigmoid Loss for Language Image Pre-Training},
    author={Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
    booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
    pages={11975--11986},
    year={2023},
    url={https://arxiv.org/abs/2303.15343},
}
"""


def _finite_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class SigLIPLoss(nn.Module):
    def __init__(
        self,
        model=None,
        scale: float = 10.0,
        bias: float = -10.0,
        learnable: bool = True,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = COS_SIM,
        gather_across_devices: bool = False,
    ) -> None:
        """The SigLIP sigmoid loss (Zhai et al. 2023) for embedding models, computed by a fused op that never keeps a
        B x N matrix.

        Every (anchor, document) pair of the batch is a binary classification: ``z = scale * sim(a_i, d_j) + bias``
        and the loss is ``-(1/B) sum_ij logsigmoid(t_ij z)``, ``t_ij = +1`` for the anchor's own positive and ``-1``
        for every other document (the other anchors' positives and every hard negative). Unlike InfoNCE there is no
        softmax over the batch: each pair is scored on its own.

        Args:
            model: a SentenceTransformer, or ``None`` when only :meth:`compute_loss_from_embeddings` is used.
            scale: the initial scale ``t`` (the paper's ``t' = log 10``: ``scale=10``), > 0 and finite; stored as
                ``logit_scale = log(scale)`` and used as ``exp(logit_scale)``.
            bias: the initial bias ``b`` (the paper's -10), finite.
            learnable: ``logit_scale`` and ``logit_bias`` are ``nn.Parameter``s that the trainer optimizes (it
                optimizes the loss module's parameters); ``False`` keeps them fixed (buffers).
            similarity_fct: cosine (default, ``sentence_transformers.util.cos_sim``) or dot product
                (``util.dot_score``); both are fused.
            gather_across_devices: score this rank's anchors against every rank's documents (torch.distributed;
                a no-op, with a warning, when not distributed); gradients reach every rank's documents.

        Requirements:
            (anchor, positive) pairs, or (anchor, positive, negative_1, ..., negative_n) tuples.

        Inputs:
            +-------------------------------------------------+--------+
            | Texts                                           | Labels |
            +=================================================+========+
            | (anchor, positive) pairs                        | none   |
            | (anchor, positive, negative_1, ..., negative_n) | none   |
            +-------------------------------------------------+--------+

        Example:
            ::

                from embedloss_kernels.losses import SigLIPLoss

                loss = SigLIPLoss(model)
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        super().__init__()
        self.model = model
        scale = _finite_number(scale, "scale")
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (it is stored as log(scale)), got {scale!r}")
        bias = _finite_number(bias, "bias")
        self.learnable = bool(learnable)
        log_scale, bias_t = torch.tensor(math.log(scale)), torch.tensor(bias)
        if self.learnable:
            self.logit_scale = nn.Parameter(log_scale)
            self.logit_bias = nn.Parameter(bias_t)
        else:
            self.register_buffer("logit_scale", log_scale)
            self.register_buffer("logit_bias", bias_t)
        self.init_scale, self.init_bias = scale, bias
        if callable(similarity_fct) and resolve_similarity(similarity_fct) is None:
            raise ValueError(f"SigLIPLoss fuses cosine and dot-product similarity only, got similarity_fct "
                             f"{similarity_name(similarity_fct)}")
        self.similarity_fct = similarity_fct
        self.gather_across_devices = bool(gather_across_devices)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss of already-embedded columns (anchors, positives, negatives...); ``labels`` is unused."""
        embeddings = list(embeddings)
        names = ["embeddings[0] (anchors)"] + [f"embeddings[{i}]" for i in range(1, len(embeddings))]
        check_similarity_callable(self.similarity_fct)
        strict = check_finite_inputs(strict=False)

        def check() -> None:
            check_embeddings(embeddings, names, strict=strict)

        distributed = self.gather_across_devices and collectives.is_distributed()
        if distributed:
            collectives.validate_everywhere(check, embeddings[0].device)
        else:
            check()
            if self.gather_across_devices:
                collectives.warn_not_distributed()
        if resolve_similarity(self.similarity_fct) == "cosine":
            embeddings = [F.normalize(e, p=2, dim=-1) for e in embeddings]
        anchors, docs = embeddings[0], embeddings[1:]
        pool = docs[0] if len(docs) == 1 else torch.cat(docs, dim=0)  # [P; N_1; ...]: the positives first
        device = anchors.device
        scale, bias = self.logit_scale.to(device).exp(), self.logit_bias.to(device)
        if distributed:
            # EMBEDLOSS_DISTRIBUTED_SCHEDULE: gather (default) or ring, as MultipleNegativesRankingLoss
            loss = functional.siglip_across_devices(anchors, pool, scale, bias, schedule=None)
        else:
            loss = functional.siglip_from_columns(anchors, pool, scale, bias)
        return warn_if_nonfinite(self, loss)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.init_scale,
            "bias": self.init_bias,
            "learnable": self.learnable,
            "similarity_fct": similarity_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
        }

    @property
    def citation(self) -> str:
        return _CITATION
