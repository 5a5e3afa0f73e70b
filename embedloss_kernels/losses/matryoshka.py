"""Drop-in ``MatryoshkaLoss`` and ``Matryoshka2dLoss``: every Matryoshka dim of an MNRL loss in one fused call.

sentence-transformers' ``MatryoshkaLoss`` runs its inner loss once per dim on embeddings truncated to ``d``
coordinates and L2-normalized, and sums ``w_d * L_d``. When the inner loss is one of ours (MNRL, symmetric MNRL, or
their cached variants), this class embeds once and makes one fused call that takes the full embeddings and every
(drawn) dim with its weight: the prefix products nest, so all dims cost about one MNRL at full dimension (maths in
:mod:`embedloss_kernels.backends.torch.matryoshka`). With any other inner loss it is sentence-transformers' class, run
as it is (this class derives from it: same signature, defaults, validation, ``get_config_dict`` and citation).

``n_dims_per_step`` draws its dims with the same ``random`` calls as sentence-transformers (``random.sample``, then
sorted outside the cached losses), so a seed gives the same dims and the same loss. A learnable inner ``scale`` (an
``nn.Parameter``) gets ``d loss / d scale`` from the same fused call, with ``gather_across_devices`` and the gradient
cache too. Under the cache this is the gradient of the loss returned, ``sum_d w_d dL_d/ds``: sentence-transformers'
``CachedLossDecorator`` weights the embeddings' gradients by ``w_d`` but leaves the scale's unweighted. Importing this
module imports sentence-transformers.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterable, Sequence

from sentence_transformers.sentence_transformer.losses.adaptive_layer import AdaptiveLayerLoss
from sentence_transformers.sentence_transformer.losses.matryoshka import MatryoshkaLoss as _STMatryoshkaLoss
from sentence_transformers.sentence_transformer.losses.matryoshka_2d import Matryoshka2dLoss as _STMatryoshka2dLoss
from torch import Tensor, nn

from .. import functional
from ..core.validate import check_embeddings, check_finite_inputs
from ._common import embed_columns, warn_if_nonfinite
from .cached_multiple_negatives_ranking import CachedMultipleNegativesRankingLoss
from .multiple_negatives_ranking import MultipleNegativesRankingLoss


def is_fusable(loss: nn.Module) -> bool:
    """Whether ``loss`` is our MNRL (or symmetric MNRL) computing the loss the fused Matryoshka op computes."""
    kind = type(loss)
    return (
        isinstance(loss, MultipleNegativesRankingLoss)
        and kind.forward is MultipleNegativesRankingLoss.forward
        and kind.compute_loss_from_embeddings is MultipleNegativesRankingLoss.compute_loss_from_embeddings
    )


def is_fusable_cached(loss: nn.Module) -> bool:
    """Whether ``loss`` is our cached MNRL (or symmetric) with its own loss step."""
    kind = type(loss)
    return (
        isinstance(loss, CachedMultipleNegativesRankingLoss)
        and kind.calculate_loss is CachedMultipleNegativesRankingLoss.calculate_loss
        and is_fusable(loss.loss)
    )


def fused_matryoshka_loss(
    mnrl: MultipleNegativesRankingLoss, embeddings: Sequence[Tensor], dims: Sequence[int], weights: Sequence[float],
    owner: nn.Module,
) -> Tensor:
    """``sum_k weights[k] * mnrl(shrink(embeddings, dims[k]))`` in one fused call (``gather_across_devices`` too).
    NaN or Inf embeddings give a NaN/Inf loss, as sentence-transformers' per-dim loop does, and ``owner`` (the
    Matryoshka module) warns once; ``EMBEDLOSS_CHECK_FINITE=1`` raises instead."""
    embeddings = list(embeddings)
    names = ["embeddings[0] (queries)"] + [f"embeddings[{i}]" for i in range(1, len(embeddings))]
    options = dict(
        scale=mnrl.scale, similarity=mnrl.similarity_fct, directions=mnrl.directions,
        partition_mode=mnrl.partition_mode, hardness_mode=mnrl.hardness_mode,
        hardness_strength=mnrl.hardness_strength,
    )

    strict = check_finite_inputs(strict=False)  # EMBEDLOSS_CHECK_FINITE=1: raise on NaN/Inf, as the functional API

    def check() -> None:
        check_embeddings(embeddings, names, strict=strict)
        for d in dims:  # sentence-transformers slices with each dim: what cannot end a slice is its TypeError
            try:
                operator.index(d)
            except TypeError:
                raise TypeError(f"matryoshka_dims must hold ints (each is a slice end), got {type(d).__name__} "
                                f"({d!r}) in {list(dims)!r}") from None
        width = embeddings[0].shape[1]
        if max(dims) > width:
            raise ValueError(
                f"Dimension {max(dims)} in matryoshka_dims cannot be greater than the model's embedding dimension: "
                f"{width}"
            )

    if mnrl.gather_across_devices:
        loss = functional.infonce_across_devices(
            embeddings[0], embeddings[1:], check=check, schedule=None, matryoshka=(list(dims), list(weights)),
            **options,
        )
    else:
        check()
        loss = functional.matryoshka_from_columns(embeddings[0], embeddings[1:], dims, weights, **options)
    return warn_if_nonfinite(owner, loss)


def draw_dim_indices(n_dims: int, n_dims_per_step: int, sort: bool) -> list[int]:
    """The dims of one step, drawn with sentence-transformers' ``random`` calls."""
    indices = range(n_dims)
    if 0 < n_dims_per_step < n_dims:
        indices = random.sample(indices, n_dims_per_step)
        if sort:
            indices.sort()
    return list(indices)


class FusedCachedMatryoshkaStep:
    """The loss step (``calculate_loss``) of our cached MNRL inside :class:`MatryoshkaLoss`: where
    sentence-transformers' ``CachedLossDecorator`` calls the inner loss step once per dim on shrunk copies of the
    cache, this is one fused call on the cached full embeddings with the drawn dims and their weights (same draw,
    same numbers)."""

    def __init__(self, cached_loss: CachedMultipleNegativesRankingLoss, dims, weights, n_dims_per_step: int,
                 owner: nn.Module):
        self.cached_loss = cached_loss
        self.owner = owner  # the MatryoshkaLoss: it warns (once) on a non-finite loss
        self.matryoshka_dims = dims
        self.matryoshka_weights = weights
        self.n_dims_per_step = n_dims_per_step

    def __call__(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False):
        picked = draw_dim_indices(len(self.matryoshka_dims), self.n_dims_per_step, sort=False)
        columns = self.cached_loss.columns_from_reps(reps)
        loss = fused_matryoshka_loss(
            self.cached_loss.loss, columns, [self.matryoshka_dims[i] for i in picked],
            [self.matryoshka_weights[i] for i in picked], self.owner,
        )
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


class MatryoshkaLoss(_STMatryoshkaLoss):
    def __init__(
        self,
        model,
        loss: nn.Module,
        matryoshka_dims: Sequence[int],
        matryoshka_weights: Sequence[float] | Sequence[int] | None = None,
        n_dims_per_step: int = -1,
    ) -> None:
        """The inner loss at several embedding dims (Matryoshka representation learning), with every dim of an MNRL
        loss computed in one fused pass.

        A drop-in for ``sentence_transformers.losses.MatryoshkaLoss`` (6.x), from which it derives: same
        arguments, defaults, validation errors, config and numbers. With ``loss`` one of
        :class:`MultipleNegativesRankingLoss`, :class:`MultipleNegativesSymmetricRankingLoss` or their cached
        variants from :mod:`embedloss_kernels.losses`, each step embeds once and makes one fused call with every
        drawn dim; with any other loss it runs sentence-transformers' implementation unchanged.

        Args:
            model: a SentenceTransformer.
            loss: the inner loss, e.g. :class:`MultipleNegativesRankingLoss`.
            matryoshka_dims: the embedding dims to train, e.g. ``[768, 512, 256, 128, 64]``.
            matryoshka_weights: one weight per dim (default: all 1).
            n_dims_per_step: how many dims (drawn at random) each step trains; -1: all.

        Requirements:
            as the inner loss.

        Inputs:
            +---------------------------------------+--------+
            | Texts                                 | Labels |
            +=======================================+========+
            | any (as the inner loss)               | any    |
            +---------------------------------------+--------+

        Relations:
            - :class:`Matryoshka2dLoss` combines it with sentence-transformers' ``AdaptiveLayerLoss``.
            - :func:`embedloss_kernels.functional.matryoshka_mnrl_loss` is the same loss on raw tensors.

        Example:
            ::

                from embedloss_kernels.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

                loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), [768, 512, 256, 128, 64])
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
        """
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights=matryoshka_weights,
                         n_dims_per_step=n_dims_per_step)
        self.fused = is_fusable(loss) or is_fusable_cached(loss)
        if is_fusable_cached(loss):
            # replaces the per-dim CachedLossDecorator that sentence-transformers' __init__ installed
            loss.calculate_loss = FusedCachedMatryoshkaStep(
                loss, self.matryoshka_dims, self.matryoshka_weights, self.n_dims_per_step, self
            )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        if not self.fused or self.uses_gradient_cache:
            # sentence-transformers' path (the cached loss carries our fused step when it is ours)
            return super().forward(sentence_features, labels)
        picked = draw_dim_indices(len(self.matryoshka_dims), self.n_dims_per_step, sort=True)
        model = self.loss.model if self.loss.model is not None else self.model
        embeddings = embed_columns(model, sentence_features)
        return fused_matryoshka_loss(
            self.loss, embeddings, [self.matryoshka_dims[i] for i in picked],
            [self.matryoshka_weights[i] for i in picked], self,
        )


class Matryoshka2dLoss(_STMatryoshka2dLoss):
    def __init__(
        self,
        model,
        loss: nn.Module,
        matryoshka_dims: list[int],
        matryoshka_weights: list[float | int] | None = None,
        n_layers_per_step: int = 1,
        n_dims_per_step: int = 1,
        last_layer_weight: float = 1.0,
        prior_layers_weight: float = 1.0,
        kl_div_weight: float = 1.0,
        kl_temperature: float = 0.3,
        layer_weighting="uniform",
    ) -> None:
        """2D Matryoshka (layers x dims): sentence-transformers' ``Matryoshka2dLoss`` (same arguments and defaults)
        around this package's :class:`MatryoshkaLoss`, so an MNRL inner loss runs every drawn dim in one fused call
        per layer."""
        AdaptiveLayerLoss.__init__(
            self,
            model,
            MatryoshkaLoss(model, loss, matryoshka_dims, matryoshka_weights=matryoshka_weights,
                           n_dims_per_step=n_dims_per_step),
            n_layers_per_step=n_layers_per_step,
            last_layer_weight=last_layer_weight,
            prior_layers_weight=prior_layers_weight,
            kl_div_weight=kl_div_weight,
            kl_temperature=kl_temperature,
            layer_weighting=layer_weighting,
        )
