"""Functional API on raw tensors: one module per loss, each reading validate -> resolve -> schedule -> op.

No sentence-transformers import here: these functions serve users with their own training loops. The drop-in modules
(:mod:`embedloss_kernels.losses`) call the ``*_from_columns`` / ``*_across_devices`` entries on inputs they have
validated themselves.
"""

from .common import resolve_pair_similarity, resolve_similarity, unfused
from .cosent import angle_loss, angle_pairs, cosent_from_pairs, cosent_loss
from .gist import gist_across_devices, gist_from_columns, gist_loss
from .infonce import infonce_across_devices, infonce_from_columns, infonce_loss, multiple_negatives_ranking_loss
from .matryoshka import matryoshka_from_columns, matryoshka_mnrl_loss, sorted_dims
from .siglip import clip_loss, siglip_across_devices, siglip_from_columns, siglip_loss

__all__ = [
    "angle_loss",
    "angle_pairs",
    "cosent_from_pairs",
    "clip_loss",
    "cosent_loss",
    "gist_across_devices",
    "gist_from_columns",
    "gist_loss",
    "infonce_across_devices",
    "infonce_from_columns",
    "infonce_loss",
    "matryoshka_from_columns",
    "matryoshka_mnrl_loss",
    "multiple_negatives_ranking_loss",
    "resolve_pair_similarity",
    "resolve_similarity",
    "siglip_across_devices",
    "siglip_from_columns",
    "siglip_loss",
    "sorted_dims",
    "unfused",
]
