"""Drop-in replacements for sentence-transformers' losses: same class names, arguments, defaults and numbers."""

from .cosent import AnglELoss, CoSENTLoss
from .multiple_negatives_ranking import MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss

_CACHED = ("CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss")

__all__ = [
    "AnglELoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "CoSENTLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]


def __getattr__(name: str):
    # The cached losses build on sentence-transformers' gradient-cache machinery: import it only when asked for.
    if name in _CACHED:
        from . import cached_multiple_negatives_ranking

        return getattr(cached_multiple_negatives_ranking, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
