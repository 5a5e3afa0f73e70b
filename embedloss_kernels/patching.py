"""Run unmodified sentence-transformers scripts on the fused losses: :func:`patch_sentence_transformers` puts this
package's classes in place of sentence-transformers' in its ``losses`` namespace (``sentence_transformers.losses`` is
the same module as ``sentence_transformers.sentence_transformer.losses``), so a script or a config that names
``losses.MultipleNegativesRankingLoss``, ``losses.MatryoshkaLoss``, ... builds ours. sentence-transformers'
``Matryoshka2dLoss`` then wraps our ``MatryoshkaLoss`` as well. :func:`unpatch_sentence_transformers` restores the
originals. Both are idempotent. Objects built before patching keep their classes.
"""

from __future__ import annotations

import importlib

# names swapped in sentence-transformers' losses namespace
PATCHED_LOSSES = (
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "CoSENTLoss",
    "AnglELoss",
    "MatryoshkaLoss",
)
_ST_LOSSES = "sentence_transformers.sentence_transformer.losses"
# module-level references inside sentence-transformers that build one of the patched classes
_ST_REFERENCES = (("sentence_transformers.sentence_transformer.losses.matryoshka_2d", "MatryoshkaLoss"),)

_originals: dict[tuple[str, str], object] = {}


def _targets():
    from . import losses

    for name in PATCHED_LOSSES:
        yield _ST_LOSSES, name, getattr(losses, name)
    for module, name in _ST_REFERENCES:
        yield module, name, getattr(losses, name)


def patch_sentence_transformers() -> None:
    """Swap this package's losses into sentence-transformers' ``losses`` namespace (patching twice is harmless)."""
    for module_name, name, ours in _targets():
        module = importlib.import_module(module_name)
        current = getattr(module, name)
        if current is ours:
            continue
        _originals.setdefault((module_name, name), current)
        setattr(module, name, ours)


def unpatch_sentence_transformers() -> None:
    """Restore sentence-transformers' own classes (a no-op when nothing is patched)."""
    for (module_name, name), original in list(_originals.items()):
        setattr(importlib.import_module(module_name), name, original)
        del _originals[(module_name, name)]


def is_patched() -> bool:
    """Whether sentence-transformers' losses namespace currently holds this package's classes."""
    return bool(_originals)
