"""Drop-in ``MultipleNegativesRankingLoss`` and ``MultipleNegativesSymmetricRankingLoss`` on the fused op."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from typing_extensions import deprecated

from .. import functional
from ..core.validate import VALID_HARDNESS_MODES, check_directions, check_embeddings, check_finite_inputs, check_scale
from ._common import (
    COS_SIM,
    check_similarity_callable,
    embed_columns,
    module_hardness_strength,
    similarity_name,
    warn_if_nonfinite,
)

logger = logging.getLogger("embedloss_kernels")

_CITATION_GTE = """
@misc{li2023generaltextembeddingsmultistage,
      title={Towards General Text Embeddings with Multi-stage Contrastive Learning},
      author={Zehan Li and Xin Zhang and Yanzhao Zhang and Dingkun Long and Pengjun Xie and Meishan Zhang},
      year={2023},
      eprint={2308.03281},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2308.03281},
}
"""
_CITATION_JINA = """
@misc{günther2024jinaembeddings28192token,
      title={Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
      author={Michael Günther and Jackmin Ong and Isabelle Mohr and Alaeddine Abdessalem and Tanguy Abel and Mohammad Kalim Akram and Susana Guzman and Georgios Mastrapas and Saba Sturua and Bo Wang and Maximilian Werk and Nan Wang and Han Xiao},
      year={2024},
      eprint={2310.19923},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2310.19923},
}
"""  # noqa: E501
_CITATION_CPC = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""


def mnrl_citation(directions, partition_mode) -> str:
    all_directions = {"query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"}
    if set(directions) == all_directions and partition_mode == "joint":
        return _CITATION_GTE
    if set(directions) == {"query_to_doc", "doc_to_query"} and partition_mode == "per_direction":
        return _CITATION_JINA
    return _CITATION_CPC


class MultipleNegativesRankingLoss(nn.Module):
    def __init__(
        self,
        model=None,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = COS_SIM,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> None:
        """InfoNCE with in-batch negatives, computed by a fused op that never keeps a B x N matrix.

        A drop-in for ``sentence_transformers.losses.MultipleNegativesRankingLoss`` (6.2): same arguments,
        defaults, validation errors and numbers (the deliberate differences are listed in the README). Each query
        should score its own positive above every other document in the batch (and, with more directions, above the
        other queries / documents). NaN or Inf embeddings give a NaN/Inf loss and one warning, as
        sentence-transformers returns them (``EMBEDLOSS_CHECK_FINITE=1`` raises instead).

        Args:
            model: a SentenceTransformer, or ``None`` when only :meth:`compute_loss_from_embeddings` is used.
            scale: inverse temperature (``scale = 1 / temperature``); finite and > 0.
            similarity_fct: cosine (default: ``sentence_transformers.util.cos_sim`` itself when it is importable)
                or dot product (``util.dot_score``) run fused; any other callable runs the plain computation, with
                a warning.
            gather_across_devices: gather embeddings over torch.distributed ranks: each rank scores its own
                rows against every rank's columns (a no-op, with a warning, when not distributed). The schedule
                comes from ``EMBEDLOSS_DISTRIBUTED_SCHEDULE`` (``gather``, the default, or ``ring``; see
                :mod:`embedloss_kernels.distributed`).
            directions: any of ``"query_to_doc"`` (required), ``"query_to_query"``, ``"doc_to_query"``,
                ``"doc_to_doc"``.
            partition_mode: ``"joint"`` (one softmax over all directions) or ``"per_direction"`` (one per
                direction, averaged; only with query_to_doc / doc_to_query).
            hardness_mode: ``None``, ``"in_batch_negatives"``, ``"hard_negatives"`` or ``"all_negatives"``:
                which query_to_doc logits get ``hardness_strength * stop_grad(sim)`` added.
            hardness_strength: the ``alpha`` of the hardness penalty, >= 0 (``inf`` is accepted, as
                sentence-transformers does, and computed by the plain materialized path).

        Requirements:
            (anchor, positive) pairs, or (anchor, positive, negative_1, ..., negative_n) tuples.

        Inputs:
            +-------------------------------------------------+--------+
            | Texts                                           | Labels |
            +=================================================+========+
            | (anchor, positive) pairs                        | none   |
            | (anchor, positive, negative_1, ..., negative_n) | none   |
            +-------------------------------------------------+--------+

        Relations:
            - ``CachedMultipleNegativesRankingLoss`` computes the same loss with a gradient cache.
            - ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"`` is the symmetric
              loss (:class:`MultipleNegativesSymmetricRankingLoss`).

        Example:
            ::

                from embedloss_kernels.losses import MultipleNegativesRankingLoss  # was: sentence_transformers

                loss = MultipleNegativesRankingLoss(model, scale=20.0)
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        super().__init__()
        self.model = model
        check_scale(scale, positive=True, finite=False)
        self.scale = scale  # kept as given (an nn.Parameter gets its gradient), as sentence-transformers does
        self.similarity_fct = similarity_fct  # any value, as sentence-transformers; called (checked) in forward
        self.gather_across_devices = bool(gather_across_devices)
        self.directions = check_directions(directions, partition_mode)
        self.partition_mode = partition_mode
        if hardness_mode not in VALID_HARDNESS_MODES:
            raise ValueError(f"hardness_mode must be one of {set(VALID_HARDNESS_MODES)}, got {hardness_mode!r}")
        self.hardness_mode = hardness_mode
        module_hardness_strength(hardness_strength)
        self.hardness_strength = hardness_strength  # as given, as sentence-transformers (get_config_dict shows it)
        if hardness_mode is not None and hardness_strength == 0.0:
            logger.warning(
                f"hardness_mode={hardness_mode!r} is set but hardness_strength=0.0, so hardness weighting has no "
                "effect. Set hardness_strength to a positive value to enable hardness weighting."
            )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.compute_loss_from_embeddings(embed_columns(self.model, sentence_features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        """The loss of already-embedded columns (anchors, positives, negatives...); ``labels`` is unused, as in
        sentence-transformers."""
        embeddings = list(embeddings)
        names = ["embeddings[0] (queries)"] + [f"embeddings[{i}]" for i in range(1, len(embeddings))]
        check_similarity_callable(self.similarity_fct)
        strength = module_hardness_strength(self.hardness_strength)
        similarity = self.similarity_fct
        if math.isinf(strength) and self.hardness_mode is not None:
            # an infinite penalty turns logits into +-inf (NaN where sim = 0): the plain path gives exactly what
            # sentence-transformers gives; the fused kernels are written for finite logits
            similarity = functional.unfused(similarity)
        options = dict(
            scale=self.scale, similarity=similarity, directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode, hardness_strength=strength,
        )
        strict = check_finite_inputs(strict=False)  # EMBEDLOSS_CHECK_FINITE=1: raise on NaN/Inf, as the functional API

        def check() -> None:
            check_embeddings(embeddings, names, strict=strict)

        if self.gather_across_devices:
            # Validated inside, so that a bad input on one rank stops every rank instead of hanging the others;
            # schedule=None: EMBEDLOSS_DISTRIBUTED_SCHEDULE ("gather" or "ring"), read on every call.
            loss = functional.infonce_across_devices(
                embeddings[0], embeddings[1:], check=check, schedule=None, **options
            )
        else:
            check()
            loss = functional.infonce_from_columns(embeddings[0], embeddings[1:], **options)
        return warn_if_nonfinite(self, loss)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": similarity_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return mnrl_citation(self.directions, self.partition_mode)


SYMMETRIC_DEPRECATION = (
    "{name} is deprecated in sentence-transformers 6.2, and so here: use {base}(model, directions=('query_to_doc', "
    "'doc_to_query'), partition_mode='per_direction'), which computes the same loss."
)


@deprecated(SYMMETRIC_DEPRECATION.format(name="MultipleNegativesSymmetricRankingLoss",
                                         base="MultipleNegativesRankingLoss"))
class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    def __init__(
        self,
        model=None,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = COS_SIM,
        gather_across_devices: bool = False,
    ) -> None:
        """Symmetric InfoNCE: :class:`MultipleNegativesRankingLoss` with ``directions=("query_to_doc",
        "doc_to_query")`` and ``partition_mode="per_direction"`` (each direction's loss, averaged).

        Deprecated, as in sentence-transformers 6.2: constructing one emits a ``DeprecationWarning``.

        Args:
            model: a SentenceTransformer, or ``None`` for :meth:`compute_loss_from_embeddings` only.
            scale: inverse temperature, > 0; a number or a one-element tensor (a Parameter is learned).
            similarity_fct: cosine (default) or dot product are fused; other callables run plain PyTorch.
            gather_across_devices: gather embeddings over torch.distributed ranks.

        Requirements:
            (anchor, positive) pairs.
        """
        super().__init__(
            model=model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        )
