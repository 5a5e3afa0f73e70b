"""Drop-in ``GISTEmbedLoss`` and ``CachedGISTEmbedLoss``: sentence-transformers' classes with the loss step done by
one fused ``gist`` op call.

Both subclass sentence-transformers' own classes, so the constructor (tokenizer checks, ``must_retokenize`` when the
guide's vocabulary or max length differs, the StaticEmbedding rules), ``get_config_dict``, ``citation`` and, for the
cached loss, the whole gradient-cache machinery (mini-batches, random-state replay, the backward hook, the guide's
embedding and retokenizing per mini-batch) are theirs. What is replaced is the loss on the embeddings:
sentence-transformers broadcasts a B x N x D tensor per similarity block (three to four for the model and as many
for the guide); here one fused op takes the model's and the guide's embeddings and keeps one row block at a time.
Importing this module imports sentence-transformers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses.cached_gist_embed import (
    CachedGISTEmbedLoss as _STCachedGISTEmbedLoss,
)
from sentence_transformers.sentence_transformer.losses.gist_embed import GISTEmbedLoss as _STGISTEmbedLoss
from sentence_transformers.util import batch_to_device
from torch import Tensor

from .. import functional
from ..core.validate import check_embeddings, check_finite_inputs, check_guide, check_margin, check_temperature
from ._common import warn_if_nonfinite
from .cached_multiple_negatives_ranking import _CITATION_GRADCACHE


def _check_options(loss) -> None:
    # beyond sentence-transformers' checks: a temperature that is not a positive number or a margin that is not a
    # finite number is a clear error here instead of a NaN loss later
    check_temperature(loss.temperature)
    check_margin(loss.margin_strategy, loss.margin)


def _gist_loss(loss, anchor: Tensor, docs: list[Tensor], anchor_guide: Tensor, docs_guide: list[Tensor]) -> Tensor:
    """The fused loss of a GIST module's settings (read at call time, as sentence-transformers does). NaN or Inf
    embeddings give what sentence-transformers gives (a NaN loss for the model's, the guide's compare false and mask
    nothing) and one warning per module; ``EMBEDLOSS_CHECK_FINITE=1`` raises instead."""
    columns = [anchor, *docs]
    names = ["anchor", "positive"] + [f"negatives[{i}]" for i in range(len(docs) - 1)]
    options = dict(
        temperature=check_temperature(loss.temperature), margin_strategy=loss.margin_strategy,
        margin=check_margin(loss.margin_strategy, loss.margin), contrast_anchors=bool(loss.contrast_anchors),
        contrast_positives=bool(loss.contrast_positives),
    )

    strict = check_finite_inputs(strict=False)  # EMBEDLOSS_CHECK_FINITE=1: raise on NaN/Inf, as the functional API

    def check() -> None:
        check_embeddings(columns, names, strict=strict)
        check_guide(columns, [anchor_guide, *docs_guide], names, strict=strict)

    if loss.gather_across_devices:
        result = functional.gist_across_devices(anchor, docs, anchor_guide, docs_guide, check=check, **options)
    else:
        check()
        result = functional.gist_from_columns(anchor, docs, anchor_guide, docs_guide, **options)
    return warn_if_nonfinite(loss, result)


def retokenized_for_guide(loss, sentence_feature: dict[str, Tensor]) -> dict[str, Tensor]:
    """The guide's input for a column the model tokenized: decoded with the model's tokenizer and re-tokenized by
    the guide (sentence-transformers' rule when ``must_retokenize``; flattened inputs are split by
    ``cu_seq_lens_q`` first)."""
    input_ids = sentence_feature["input_ids"]
    if "cu_seq_lens_q" in sentence_feature:
        flat = input_ids[0].tolist()
        bounds = sentence_feature["cu_seq_lens_q"].tolist()
        input_ids = [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
    texts = loss.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    return batch_to_device(loss.guide.preprocess(texts), loss.guide.device)


class GISTEmbedLoss(_STGISTEmbedLoss):
    def __init__(
        self,
        model,
        guide,
        temperature: float = 0.01,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        """GISTEmbed loss: in-batch-negative InfoNCE where a guide model removes likely false negatives, computed
        by a fused op that never forms a B x N matrix.

        A drop-in for ``sentence_transformers.losses.GISTEmbedLoss`` (6.x): same arguments, defaults, validation
        and numbers. For each anchor, the guide's cosine similarity to its positive sets a threshold; every other
        candidate (other positives, other anchors, other positives' rows, negatives) whose guide similarity to the
        row's query exceeds it (minus the margin) is left out of the softmax.

        Args:
            model: the SentenceTransformer being trained (with a transformers tokenizer).
            guide: the SentenceTransformer that judges which in-batch candidates are false negatives; it is run
                without gradient, on the model's tokens or, when the tokenizers or max lengths differ, on the
                texts decoded and re-tokenized for it.
            temperature: the cosine similarities are divided by it (the inverse of MNRL's ``scale``); > 0.
            margin_strategy: ``"absolute"`` (mask where guide sim > ``t - margin``) or ``"relative"`` (where guide
                sim > ``t - |t| * margin``), ``t`` the guide's anchor-positive similarity.
            margin: the margin of that rule; 0 removes candidates the guide finds closer than the positive.
            contrast_anchors: add the anchor-anchor block (GISTEmbed's default).
            contrast_positives: add the positive-positive block (GISTEmbed's default).
            gather_across_devices: score this rank's anchors against the candidates of every torch.distributed
                rank (and their guide embeddings); gradients reach the candidates' owners.

        Requirements:
            (anchor, positive) pairs or (anchor, positive, negative) triplets; model and guide with transformers
            tokenizers.

        Inputs:
            +---------------------------------------+--------+
            | Texts                                 | Labels |
            +=======================================+========+
            | (anchor, positive, negative) triplets | none   |
            | (anchor, positive) pairs              | none   |
            +---------------------------------------+--------+

        Relations:
            - :class:`MultipleNegativesRankingLoss` with ``directions=("query_to_doc", "query_to_query",
              "doc_to_doc")`` is the same loss without the guide's masks (and with dedicated self masks).
            - :class:`CachedGISTEmbedLoss` computes it with a gradient cache.

        Example:
            ::

                from embedloss_kernels.losses import GISTEmbedLoss  # was: sentence_transformers.losses

                loss = GISTEmbedLoss(model, guide)
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()
        """
        super().__init__(
            model, guide, temperature=temperature, margin_strategy=margin_strategy, margin=margin,
            contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
            gather_across_devices=gather_across_devices,
        )
        _check_options(self)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        # shallow copies for the guide: a model writes its outputs into the features it is given
        guide_features = [dict(feature) for feature in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = [retokenized_for_guide(self, feature) for feature in sentence_features]
            guide_embeddings = embed_columns(self.guide, guide_features)
        return self.compute_loss_from_embeddings(embeddings, guide_embeddings)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], guide_embeddings: list[Tensor]) -> Tensor:
        """The loss of the model's column embeddings ``[anchor, positive(, negative)]`` and the guide's."""
        embeddings, guide_embeddings = list(embeddings), list(guide_embeddings)
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        if len(guide_embeddings) != len(embeddings):
            raise ValueError(f"Expected one guide embedding per column ({len(embeddings)}), "
                             f"got {len(guide_embeddings)}")
        return _gist_loss(self, embeddings[0], embeddings[1:], guide_embeddings[0], guide_embeddings[1:])


class CachedGISTEmbedLoss(_STCachedGISTEmbedLoss):
    def __init__(
        self,
        model,
        guide,
        temperature: float = 0.01,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        margin_strategy: str = "absolute",
        margin: float = 0.0,
        contrast_anchors: bool = True,
        contrast_positives: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        """:class:`GISTEmbedLoss` with a gradient cache (GradCache), for batches beyond what the encoder's
        activations allow: a drop-in for ``sentence_transformers.losses.CachedGISTEmbedLoss`` (6.x).

        The model and the guide embed mini-batches without gradient (the model's random states kept), the loss
        and its gradients with respect to every embedding are computed by one fused op call on the whole batch,
        and a second pass re-embeds each mini-batch with gradient and back-propagates the cached gradients, all
        through sentence-transformers' own gradient-cache code. Same numbers as its cached loss.

        Args:
            model, guide, temperature, margin_strategy, margin, contrast_anchors, contrast_positives,
                gather_across_devices: as :class:`GISTEmbedLoss` (any number of negative columns here).
            mini_batch_size: rows embedded per forward pass; memory, not the result, depends on it.
            mini_batch_num_tokens: if set, mini-batches are cut by token count instead.
            show_progress_bar: tqdm bars for the embedding passes.

        Requirements:
            (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples; a model whose
            inputs split along the batch axis (not a StaticEmbedding).

        Example:
            ::

                from embedloss_kernels.losses import CachedGISTEmbedLoss

                loss = CachedGISTEmbedLoss(model, guide, mini_batch_size=32)
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
        """
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int):
            raise TypeError(f"mini_batch_size must be an int, got {type(mini_batch_size).__name__}")
        if mini_batch_size <= 0:
            raise ValueError(f"mini_batch_size must be a positive integer, got {mini_batch_size}")
        super().__init__(
            model, guide, temperature=temperature, mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens, show_progress_bar=show_progress_bar,
            margin_strategy=margin_strategy, margin=margin, contrast_anchors=contrast_anchors,
            contrast_positives=contrast_positives, gather_across_devices=gather_across_devices,
        )
        _check_options(self)

    def calculate_loss(
        self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        """Step 2 of the gradient cache: the loss of the whole batch from the cached mini-batch embeddings, one
        fused call; with ``with_backward`` the gradients land on ``reps`` and the returned loss is detached."""
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        if len(reps) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(reps)}")
        columns = [torch.cat(column) for column in reps]
        guide_columns = [torch.cat(column) for column in reps_guided]
        loss = _gist_loss(self, columns[0], columns[1:], guide_columns[0], guide_columns[1:])
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    @property
    def citation(self) -> str:
        """GISTEmbed's and GradCache's references (sentence-transformers' cached GIST defines none)."""
        return _STGISTEmbedLoss.citation.fget(self) + _CITATION_GRADCACHE
