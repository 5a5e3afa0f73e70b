"""embedloss_kernels: fused, exact, memory-lean contrastive losses for embedding models.

Drop-in sentence-transformers losses in :mod:`embedloss_kernels.losses`, a functional API in
:mod:`embedloss_kernels.functional`, and backend selection (``EMBEDLOSS_BACKEND``) shared by every op.
"""

from ._backends import BackendUnavailableError, available_backends, current_backend
from .functional import (
    angle_loss,
    cosent_loss,
    infonce_loss,
    matryoshka_mnrl_loss,
    multiple_negatives_ranking_loss,
)
from .losses import (
    AnglELoss,
    CoSENTLoss,
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)
from .patching import patch_sentence_transformers, unpatch_sentence_transformers

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss", "MatryoshkaLoss",
                "Matryoshka2dLoss"):
        from . import losses

        return getattr(losses, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnglELoss",
    "BackendUnavailableError",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "CoSENTLoss",
    "Matryoshka2dLoss",
    "MatryoshkaLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "angle_loss",
    "available_backends",
    "cosent_loss",
    "current_backend",
    "infonce_loss",
    "matryoshka_mnrl_loss",
    "multiple_negatives_ranking_loss",
    "patch_sentence_transformers",
    "unpatch_sentence_transformers",
]
