"""Drop-in replacements for sentence-transformers' losses: same class names, arguments, defaults and numbers."""

from .cosent import AnglELoss, CoSENTLoss
from .multiple_negatives_ranking import MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss
from .siglip import SigLIPLoss

_CACHED = ("CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss")
_MATRYOSHKA = ("MatryoshkaLoss", "Matryoshka2dLoss")
_GIST = ("GISTEmbedLoss", "CachedGISTEmbedLoss")

__all__ = [
    "AnglELoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedGISTEmbedLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "CoSENTLoss",
    "GISTEmbedLoss",
    "Matryoshka2dLoss",
    "MatryoshkaLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "SigLIPLoss",
]


def __getattr__(name: str):
    # The cached losses build on sentence-transformers' gradient-cache machinery: import it only when asked for.
    if name in _CACHED:
        from . import cached_multiple_negatives_ranking

        return getattr(cached_multiple_negatives_ranking, name)
    if name in _MATRYOSHKA:  # derive from sentence-transformers' classes: imported only when asked for
        from . import matryoshka

        return getattr(matryoshka, name)
    if name in _GIST:
        # subclasses of sentence-transformers' GIST losses: imported only when asked for
        from . import gist_embed

        return getattr(gist_embed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
