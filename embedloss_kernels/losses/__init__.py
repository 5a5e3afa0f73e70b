"""Drop-in replacements for sentence-transformers' losses: same class names, arguments, defaults and numbers."""

from .cosent import AnglELoss, CoSENTLoss
from .multiple_negatives_ranking import MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss

_CACHED = ("CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss")
_MATRYOSHKA = ("MatryoshkaLoss", "Matryoshka2dLoss")

__all__ = [
    "AnglELoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "CoSENTLoss",
    "Matryoshka2dLoss",
    "MatryoshkaLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]


def __getattr__(name: str):
    # The cached losses build on sentence-transformers' gradient-cache machinery: import it only when asked for.
    if name in _CACHED:
        from . import cached_multiple_negatives_ranking

        return getattr(cached_multiple_negatives_ranking, name)
    if name in _MATRYOSHKA:  # derive from sentence-transformers' classes: imported only when asked for
        from . import matryoshka

        return getattr(matryoshka, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
