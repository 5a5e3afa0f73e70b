"""What every drop-in module shares: sentence-transformers' default similarity objects (when it is importable),
lazy column embedding, the modules' lenient checks and the one-time warning for a non-finite loss."""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from .. import reference
from ..core.validate import finite_check_setting
from ..core.versions import SENTENCE_TRANSFORMERS_SERIES, as_text, major_minor

logger = logging.getLogger("embedloss_kernels")

try:  # the modules mirror sentence-transformers, whose util functions are their defaults; the package runs without it
    import sentence_transformers as _st
    from sentence_transformers import util as _st_util
except Exception:  # noqa: BLE001 - not installed, or installed but broken: fall back to our own similarity functions
    _st = _st_util = None

if _st is not None and major_minor(getattr(_st, "__version__", "0.0")) != SENTENCE_TRANSFORMERS_SERIES:
    warnings.warn(
        f"embedloss_kernels' drop-in losses mirror sentence-transformers {as_text(SENTENCE_TRANSFORMERS_SERIES)}.x "
        f"and use its internals; found sentence-transformers {_st.__version__}.",
        stacklevel=2,
    )

# Defaults of the constructors: sentence-transformers' own function objects when it is importable (so
# ``loss.similarity_fct is util.cos_sim`` holds, as it does for its losses), else ours (same maths and names).
COS_SIM = _st_util.cos_sim if _st_util is not None else reference.cos_sim
PAIRWISE_COS_SIM = _st_util.pairwise_cos_sim if _st_util is not None else reference.pairwise_cos_sim
PAIRWISE_ANGLE_SIM = _st_util.pairwise_angle_sim if _st_util is not None else reference.pairwise_angle_sim


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
    if _st_util is None:
        return getattr(fn, "__name__", type(fn).__name__)
    return _st_util.similarity_fct_name(fn)


def check_similarity_callable(fn) -> None:
    """At call time, as sentence-transformers (which calls it): a similarity_fct that is not callable is a
    TypeError. The constructors accept any value, as sentence-transformers' do."""
    if not callable(fn):
        raise TypeError(f"similarity_fct must be callable, got {type(fn).__name__} ({fn!r})")


def module_hardness_strength(hardness_strength) -> float:
    """sentence-transformers' rule for ``hardness_strength`` (a real number, not negative; ``inf`` and NaN pass),
    returned as the float the loss uses: NaN applies no penalty, as ``nan > 0`` is false there."""
    if not isinstance(hardness_strength, numbers.Real):
        raise TypeError(
            f"hardness_strength must be a real number, got {type(hardness_strength).__name__} ({hardness_strength!r})"
        )
    if hardness_strength < 0.0:
        raise ValueError(f"hardness_strength must be non-negative. Got hardness_strength={hardness_strength!r}.")
    value = float(hardness_strength)
    return value if value > 0.0 else 0.0


def may_inspect_values() -> bool:
    """Whether the modules may look at tensor values on the host (a sync): not while torch.compile traces (a
    data-dependent branch breaks the graph), not under torch.func transforms (vmap has no single value to look at),
    not with ``EMBEDLOSS_CHECK_FINITE=0``."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return finite_check_setting() is not False


def warn_if_nonfinite(module, loss: Tensor) -> Tensor:
    """Log once per module when its loss is NaN or Inf (NaN/Inf embeddings or labels, as sentence-transformers
    returns them: GradScaler and the Trainer's NaN filter can then skip the step). One host sync on the 0-dim loss
    per call until it has warned; none with ``EMBEDLOSS_CHECK_FINITE=0``, while torch.compile traces or under
    torch.func transforms."""
    if getattr(module, "_warned_nonfinite", False) or not may_inspect_values():
        return loss
    if not bool(torch.isfinite(loss.detach())):
        object.__setattr__(module, "_warned_nonfinite", True)
        logger.warning(
            f"{type(module).__name__}: the loss is {loss.item()} (NaN or Inf embeddings or labels in this batch). "
            "Returned as sentence-transformers does; set EMBEDLOSS_CHECK_FINITE=1 to raise a ValueError instead. "
            "This warning is shown once per loss object."
        )
    return loss
