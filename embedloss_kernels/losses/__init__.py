"""Drop-in replacements for sentence-transformers' losses: same class names, arguments, defaults and numbers."""

from .cosent import AnglELoss, CoSENTLoss
from .multiple_negatives_ranking import MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss

__all__ = [
    "AnglELoss",
    "CoSENTLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]
