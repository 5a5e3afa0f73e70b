"""embedloss_kernels: fused, exact, memory-lean contrastive losses for embedding models.

Drop-in sentence-transformers losses in :mod:`embedloss_kernels.losses`, a functional API in
:mod:`embedloss_kernels.functional`, and backend selection (``EMBEDLOSS_BACKEND``, :mod:`embedloss_kernels.dispatch`)
shared by every op. The layers, top to bottom, are in docs/DESIGN.md.
"""

import warnings as _warnings

import torch as _torch

from .core.versions import TORCH_MIN as _TORCH_MIN
from .core.versions import as_text as _as_text
from .core.versions import major_minor as _major_minor
from .dispatch import BackendUnavailableError, available_backends, current_backend
from .functional import (
    angle_loss,
    clip_loss,
    cosent_loss,
    gist_loss,
    infonce_loss,
    matryoshka_mnrl_loss,
    multiple_negatives_ranking_loss,
    siglip_loss,
)
from .patching import patch_sentence_transformers, unpatch_sentence_transformers

__version__ = "0.1.0"

if _major_minor(_torch.__version__) < _TORCH_MIN:
    _warnings.warn(
        f"embedloss_kernels supports torch >= {_as_text(_TORCH_MIN)}; found torch {_torch.__version__}.", stacklevel=2
    )

# The drop-in modules import sentence-transformers (for its default similarity functions) when it is installed, which
# takes seconds: they load on first use, so the functional API stays light.
_MODULE_CLASSES = (
    "AnglELoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "CoSENTLoss",
    "Matryoshka2dLoss",
    "MatryoshkaLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "SigLIPLoss",
)


def __getattr__(name: str):
    if name in _MODULE_CLASSES:
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
    "SigLIPLoss",
    "angle_loss",
    "available_backends",
    "clip_loss",
    "cosent_loss",
    "current_backend",
    "gist_loss",
    "infonce_loss",
    "matryoshka_mnrl_loss",
    "multiple_negatives_ranking_loss",
    "patch_sentence_transformers",
    "siglip_loss",
    "unpatch_sentence_transformers",
]
