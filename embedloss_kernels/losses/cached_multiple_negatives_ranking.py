"""Drop-in ``CachedMultipleNegativesRankingLoss`` / ``CachedMultipleNegativesSymmetricRankingLoss``: GradCache with
the loss step done by one fused call.

The three steps of docs/DESIGN.md (embed each mini-batch without grad keeping its RNG state; the loss and the
embedding gradients of the whole batch; re-embed each mini-batch with grad replaying its RNG state and
back-propagate the cached gradients times ``grad_output``) are orchestrated by sentence-transformers'
``CachedLossMixin`` — the same machinery its own cached losses use, so dropout replay, DDP no-sync handling,
``mini_batch_num_tokens``, progress bars and ``MatryoshkaLoss`` (which decorates ``calculate_loss`` of any loss
with ``uses_gradient_cache``) behave identically. What this module replaces is step 2: sentence-transformers runs
an autograd graph over ``mini_batch_size`` x N score chunks; here it is one fused op call on the whole batch whose
backward only scales the gradients computed in its forward pass. Importing this module imports
sentence-transformers (a model is needed anyway).

Length-sorted mini-batches (``sort_by_length=True``, the default): before step 1 each column's rows are ordered by
token count (longest first), so every mini-batch holds sequences of similar length and the mixin's per-mini-batch
trim of trailing padding removes most of it; the embeddings are put back in the caller's row order before the loss
(an index_select whose backward routes the cached gradients to the sorted mini-batches). Each row is embedded on its
own, so the loss and gradients are unchanged (eval mode, up to round-off); in train mode the dropout masks are drawn
per sorted mini-batch and replayed exactly in step 3. On a batch of mixed lengths this skips the padding that
sentence-transformers' cached loss (and plain MNRL, which pads a column to its longest row) computes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import torch
from sentence_transformers.base.losses.gradcache import (
    CachedLossMixin,
    _validate_mini_batch_num_tokens,
    has_static_embedding_input,
)
from torch import Tensor, nn
from typing_extensions import deprecated

from ._common import COS_SIM
from .multiple_negatives_ranking import SYMMETRIC_DEPRECATION, MultipleNegativesRankingLoss

_CITATION_GRADCACHE = """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""

_HYPERPARAMETERS = (
    "scale",
    "similarity_fct",
    "gather_across_devices",
    "directions",
    "partition_mode",
    "hardness_mode",
    "hardness_strength",
)


# Padded text inputs only: every tensor is indexed by row first. Flattened (``cu_seq_lens_q``) and image inputs have
# tensors indexed by token or image, and keep their order.
_UNSORTABLE_KEYS = ("cu_seq_lens_q", "pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")


def length_sorted(feature: dict[str, Any]) -> tuple[dict[str, Any], Tensor | None]:
    """``feature`` with its rows ordered by token count (a new dict; the caller's tensors are not modified) and the
    inverse permutation that restores the caller's order; ``(feature, None)`` when sorting cannot help or apply
    (no 2-D attention mask, left padding, non-row-indexed tensors, rows already in order)."""
    mask = feature.get("attention_mask")
    if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.shape[0] < 2 or mask.shape[1] == 0:
        return feature, None
    if any(key in feature for key in _UNSORTABLE_KEYS):
        return feature, None
    rows = mask.shape[0]
    if any(isinstance(v, Tensor) and (v.ndim == 0 or v.shape[0] != rows) for v in feature.values()):
        return feature, None
    lengths = mask.sum(dim=1)
    if bool((mask[:, -1] != 0).all()) and bool((lengths < mask.shape[1]).any()):
        return feature, None  # left padding: the mixin keeps leading padding, so sorting would save nothing
    # longest first: the first mini-batch allocates the largest activations and every later one fits in what it
    # freed (ascending widths made the allocator's footprint grow with each mini-batch)
    order = torch.sort(lengths, descending=True, stable=True).indices
    if bool((order == torch.arange(rows, device=order.device)).all()):
        return feature, None
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(rows, device=order.device)
    ordered = {key: value.index_select(0, order.to(value.device)) if isinstance(value, Tensor) else value
               for key, value in feature.items()}
    return ordered, inverse


class CachedMultipleNegativesRankingLoss(CachedLossMixin, nn.Module):
    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = COS_SIM,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        *,
        sort_by_length: bool = True,
    ) -> None:
        """MultipleNegativesRankingLoss with a gradient cache, for batches far beyond what the encoder's activations
        allow: only one mini-batch of activations is alive at a time, and the loss step is one fused call.

        A drop-in for ``sentence_transformers.losses.CachedMultipleNegativesRankingLoss``: same arguments, defaults,
        validation and numbers (equal to the plain loss on the same batch, up to round-off, in eval mode).

        Args:
            model: a SentenceTransformer whose inputs can be split into mini-batches (not a StaticEmbedding).
            scale, similarity_fct, gather_across_devices, directions, partition_mode, hardness_mode,
                hardness_strength: as :class:`~embedloss_kernels.losses.MultipleNegativesRankingLoss`.
            mini_batch_size: rows embedded per forward pass: a positive integer (Python or NumPy). Memory, not the
                result, depends on it. As in sentence-transformers, the constructor takes any value and a value
                that is not a positive integer (``0``, ``2.5``) fails in ``forward`` (ValueError / TypeError).
            mini_batch_num_tokens: if set, mini-batches are cut by token count instead (sentence-transformers'
                rule).
            show_progress_bar: tqdm bars for both embedding passes.
            sort_by_length: (keyword only, not in sentence-transformers) form the mini-batches from rows sorted by
                token count, so little padding is embedded; results are unchanged. Applies to padded text inputs
                with right padding; other inputs keep their order. ``False`` forms mini-batches in row order, as
                sentence-transformers does (then train-mode dropout masks match its cached loss draw for draw).

        Requirements:
            (anchor, positive) pairs or (anchor, positive, negative_1, ..., negative_n) tuples; a model whose
            inputs split along the batch axis.

        Relations:
            - Equivalent to :class:`MultipleNegativesRankingLoss`; the cost is one extra encoder forward.

        Example:
            ::

                from embedloss_kernels.losses import CachedMultipleNegativesRankingLoss

                loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=32)
                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
        """
        super().__init__()
        if model is None:
            raise ValueError(f"{type(self).__name__} needs a SentenceTransformer model: it embeds mini-batches itself")
        if has_static_embedding_input(model):
            raise ValueError(
                f"{type(self).__name__} is not compatible with a SentenceTransformer model based on a StaticEmbedding, "
                "whose inputs cannot be split into mini-batches along a batch dimension. "
                "Consider using MultipleNegativesRankingLoss instead."
            )
        _validate_mini_batch_num_tokens(mini_batch_num_tokens)
        if not isinstance(sort_by_length, bool):
            raise TypeError(f"sort_by_length must be a bool, got {type(sort_by_length).__name__}")
        self.model = model
        self.sort_by_length = sort_by_length
        self._row_orders: list[Tensor | None] | None = None
        # The wrapped loss validates and owns the hyperparameters and computes step 2. It holds the model too, as
        # sentence-transformers' inner loss does: the state_dict has the same keys (``model.*`` and ``loss.model.*``,
        # the same tensors), so checkpoints load both ways with strict=True, and parameters() keeps the same order.
        self.loss = MultipleNegativesRankingLoss(
            model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.show_progress_bar = show_progress_bar

    def __getattr__(self, name: str):
        if name in _HYPERPARAMETERS:
            return getattr(self._modules["loss"], name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HYPERPARAMETERS and "loss" in self._modules:
            setattr(self._modules["loss"], name, value)
        else:
            super().__setattr__(name, value)

    def columns_from_reps(self, reps: list[list[Tensor]]) -> list[Tensor]:
        """The cached mini-batch embeddings as whole columns, in the caller's row order."""
        columns = [torch.cat(column) for column in reps]
        if self._row_orders is not None:  # length-sorted mini-batches: back to the caller's row order
            columns = [col if inv is None else col.index_select(0, inv.to(col.device))
                       for col, inv in zip(columns, self._row_orders)]
        return columns

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """Step 2: the loss over the whole batch from the cached mini-batch embeddings, in one fused call; with
        ``with_backward`` the gradients land on ``reps`` (the cache) and the returned loss is detached."""
        loss = self.loss.compute_loss_from_embeddings(self.columns_from_reps(reps), labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def _check_mini_batch_size(self) -> None:
        """What sentence-transformers' ``range(0, batch, mini_batch_size)`` accepts: an integer (``__index__``:
        int, NumPy integer, bool) above 0; otherwise the same exception type, naming the argument."""
        size = self.mini_batch_size
        try:
            value = operator.index(size)
        except TypeError:
            raise TypeError(
                f"mini_batch_size must be a positive integer, got {type(size).__name__} ({size!r})"
            ) from None
        if value <= 0:
            raise ValueError(f"mini_batch_size must be a positive integer, got {size!r}")

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        self._check_mini_batch_size()
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        if not self.sort_by_length:
            return self.forward_cached(sentence_features, labels)
        sorted_features, inverses = zip(*(length_sorted(feature) for feature in sentence_features))
        self._row_orders = list(inverses)
        try:
            return self.forward_cached(list(sorted_features), labels)
        finally:
            self._row_orders = None

    def get_config_dict(self) -> dict[str, Any]:
        config = self.loss.get_config_dict()
        return {
            "scale": config["scale"],
            "similarity_fct": config["similarity_fct"],
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
            **{key: config[key] for key in _HYPERPARAMETERS[2:]},
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return _CITATION_GRADCACHE


@deprecated(SYMMETRIC_DEPRECATION.format(name="CachedMultipleNegativesSymmetricRankingLoss",
                                         base="CachedMultipleNegativesRankingLoss"))
class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = COS_SIM,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        show_progress_bar: bool = False,
        *,
        sort_by_length: bool = True,
    ) -> None:
        """The symmetric loss (query_to_doc and doc_to_query, one softmax each, averaged) with a gradient cache;
        a drop-in for ``sentence_transformers.losses.CachedMultipleNegativesSymmetricRankingLoss``. Deprecated, as
        in sentence-transformers 6.2: constructing one emits a ``DeprecationWarning``.

        Args: as :class:`CachedMultipleNegativesRankingLoss`, without the direction/partition/hardness options.
        """
        super().__init__(
            model=model,
            scale=scale,
            similarity_fct=similarity_fct,
            mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
            show_progress_bar=show_progress_bar,
            sort_by_length=sort_by_length,
        )
