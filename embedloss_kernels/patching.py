"""Run unmodified sentence-transformers (or OpenCLIP) scripts on the fused losses.

:func:`patch_sentence_transformers` puts this package's classes in place of sentence-transformers' in its
``losses`` namespace (``sentence_transformers.losses`` is the same module as
``sentence_transformers.sentence_transformer.losses``), so a script or a config that names
``losses.MultipleNegativesRankingLoss``, ``losses.MatryoshkaLoss``, ... builds ours. sentence-transformers'
``Matryoshka2dLoss`` then wraps our ``MatryoshkaLoss`` as well. :func:`unpatch_sentence_transformers` restores the
originals. Both are idempotent. Objects built before patching keep their classes.

:func:`patch_open_clip` does the same for OpenCLIP: ``open_clip.loss.SigLipLoss`` / ``ClipLoss``, the names
``open_clip.factory.create_loss`` builds from, and ``open_clip.ClipLoss`` become :mod:`embedloss_kernels.open_clip`'s;
:func:`unpatch_open_clip` restores them. OpenCLIP's subclasses (``CoCaLoss``, ``DistillClipLoss``) keep their own
base class.
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


# OpenCLIP: (module, name) pairs that name the loss classes create_loss and user code build
_OPEN_CLIP_REFERENCES = (
    ("open_clip.loss", "SigLipLoss"),
    ("open_clip.loss", "ClipLoss"),
    ("open_clip.factory", "SigLipLoss"),
    ("open_clip.factory", "ClipLoss"),
    ("open_clip", "SigLipLoss"),
    ("open_clip", "ClipLoss"),
)
_open_clip_originals: dict[tuple[str, str], object] = {}


def patch_open_clip() -> None:
    """Put :class:`embedloss_kernels.open_clip.SigLipLoss` / ``ClipLoss`` in place of OpenCLIP's wherever OpenCLIP
    names them (``open_clip.loss``, ``open_clip.factory`` for ``create_loss``, the package itself). Imports
    ``open_clip`` (an ``ImportError`` if it cannot be imported); patching twice is harmless."""
    from . import open_clip as ours

    for module_name, name in _OPEN_CLIP_REFERENCES:
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            continue
        replacement = getattr(ours, name)
        current = getattr(module, name)
        if current is replacement:
            continue
        _open_clip_originals.setdefault((module_name, name), current)
        setattr(module, name, replacement)


def unpatch_open_clip() -> None:
    """Restore OpenCLIP's own classes (a no-op when nothing is patched)."""
    for (module_name, name), original in list(_open_clip_originals.items()):
        setattr(importlib.import_module(module_name), name, original)
        del _open_clip_originals[(module_name, name)]
