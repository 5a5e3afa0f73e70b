"""Drop-in ``CoSENTLoss`` and ``AnglELoss`` on the fused O(B log B) op."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional
from ..core.validate import check_embeddings, check_finite_inputs, check_labels, check_scale
from ._common import (
    PAIRWISE_ANGLE_SIM,
    PAIRWISE_COS_SIM,
    check_similarity_callable,
    embed_columns,
    may_inspect_values,
    similarity_name,
    warn_if_nonfinite,
)

_CITATION_COSENT = """
@article{10531646,
    author={Huang, Xiang and Peng, Hao and Zou, Dongcheng and Liu, Zhiwei and Li, Jianxin and Liu, Kay and Wu, Jia and Su, Jianlin and Yu, Philip S.},
    journal={IEEE/ACM Transactions on Audio, Speech, and Language Processing},
    title={CoSENT: Consistent Sentence Embedding via Similarity Ranking},
    year={2024},
    doi={10.1109/TASLP.2024.3402087}
}
"""  # noqa: E501
_CITATION_ANGLE = """
@inproceedings{li-li-2024-aoe,
    title = "{A}o{E}: Angle-optimized Embeddings for Semantic Textual Similarity",
    author = "Li, Xianming and Li, Jing",
    year = "2024",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2024.acl-long.101/",
    doi = "10.18653/v1/2024.acl-long.101"
}
"""


class CoSENTLoss(nn.Module):
    def __init__(
        self,
        model=None,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = PAIRWISE_COS_SIM,
    ) -> None:
        """CoSENT: ``log(1 + sum exp(scale * (s(k, l) - s(i, j))))`` over pairs of pairs whose label of ``(i, j)``
        is higher than that of ``(k, l)``; computed by sorting on the label, O(B log B), no B x B tensor.

        A drop-in for ``sentence_transformers.losses.CoSENTLoss`` (6.2). NaN or Inf embeddings give a NaN/Inf
        loss and one warning; NaN labels give what sentence-transformers gives (``EMBEDLOSS_CHECK_FINITE=1``
        raises on either instead).

        Args:
            model: a SentenceTransformer, or ``None`` for :meth:`compute_loss_from_embeddings` only.
            scale: inverse temperature, finite and > 0.
            similarity_fct: pairwise similarity; cosine (default: ``util.pairwise_cos_sim`` itself), dot
                (``util.pairwise_dot_score``) and AnglE (``util.pairwise_angle_sim``) are fused, any other
                callable runs the plain computation.

        Requirements:
            Sentence pairs with a float similarity label each.

        Inputs:
            +--------------------------------+------------------------+
            | Texts                          | Labels                 |
            +================================+========================+
            | (sentence_A, sentence_B) pairs | float similarity score |
            +--------------------------------+------------------------+

        Relations:
            - :class:`AnglELoss` is CoSENT with the AnglE similarity.

        Example:
            ::

                from embedloss_kernels.losses import CoSENTLoss

                loss = CoSENTLoss(model)
        """
        super().__init__()
        self.model = model
        check_scale(scale, positive=False, finite=False)
        self.scale = scale  # kept as given (an nn.Parameter gets its gradient), as sentence-transformers does
        self.similarity_fct = similarity_fct  # any value, as sentence-transformers; called (checked) in forward

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        embeddings = list(embeddings)
        strict = check_finite_inputs(strict=False)
        check_embeddings(embeddings[:2], ["embeddings[0]", "embeddings[1]"], strict=strict)
        labels = check_labels(labels, embeddings[0].shape[0], type(self).__name__, strict=strict)
        return self._pairs_loss(embeddings[0], embeddings[1], labels)

    def _pairs_loss(self, x: Tensor, y: Tensor, labels: Tensor) -> Tensor:
        check_similarity_callable(self.similarity_fct)
        similarity = self.similarity_fct
        if labels.is_floating_point() and may_inspect_values() and not bool(torch.isfinite(labels).all()):
            # NaN / Inf labels (one host sync on the labels; not looked for under torch.compile, torch.func or
            # EMBEDLOSS_CHECK_FINITE=0): the plain sorted computation with autograd orders and groups them as
            # sentence-transformers does (NaN sorts last), so loss and gradients are its own
            similarity = functional.unfused(similarity)
        loss = functional.cosent_from_pairs(x, y, labels, scale=self.scale, similarity=similarity)
        return warn_if_nonfinite(self, loss)

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "similarity_fct": similarity_name(self.similarity_fct)}

    @property
    def citation(self) -> str:
        return _CITATION_COSENT


class AnglELoss(CoSENTLoss):
    def __init__(self, model=None, scale: float = 20.0) -> None:
        """AnglE: CoSENT with the angle similarity ``|cos + sin|`` (dims ``i`` and ``i + D/2`` paired).

        A drop-in for ``sentence_transformers.losses.AnglELoss``.

        Args:
            model: a SentenceTransformer, or ``None`` for :meth:`compute_loss_from_embeddings` only.
            scale: as :class:`CoSENTLoss` (any real number or a one-element tensor; a Parameter is learned).

        Requirements:
            Sentence pairs with float labels, or (anchor, positive, negative_1, ..., negative_n) tuples: those
            become (anchor, positive) pairs labelled ``labels`` (default 1) and (anchor, negative) pairs labelled
            ``1 - labels``.
        """
        super().__init__(model, scale, similarity_fct=PAIRWISE_ANGLE_SIM)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        embeddings = list(embeddings)
        names = [f"embeddings[{i}]" for i in range(len(embeddings))]
        strict = check_finite_inputs(strict=False)
        check_embeddings(embeddings, names, strict=strict)
        x, y, pair_labels = functional.angle_pairs(embeddings, labels, type(self).__name__, strict=strict)
        return self._pairs_loss(x, y, pair_labels)

    @property
    def citation(self) -> str:
        return _CITATION_ANGLE
