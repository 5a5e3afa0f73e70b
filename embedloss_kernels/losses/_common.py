"""What every drop-in module shares: lazy sentence-transformers column embedding and citation texts."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def embed_columns(model, sentence_features: Iterable[dict[str, Tensor]]) -> list[Tensor]:
    """Embed each input column with the model exactly as sentence-transformers does (imported lazily)."""
    if model is None:
        raise ValueError(
            "This loss was built with model=None, so it can only be used through compute_loss_from_embeddings(); "
            "pass a SentenceTransformer to call it on sentence features."
        )
    from sentence_transformers.base.losses.merged_forward import embed_columns as st_embed_columns

    return st_embed_columns(model, sentence_features)


def similarity_name(fn) -> str:
    """The config-dict name of a similarity callable (sentence-transformers' rendering when it is installed)."""
    try:
        from sentence_transformers.util import similarity_fct_name
    except ImportError:
        return getattr(fn, "__name__", type(fn).__name__)
    return similarity_fct_name(fn)
