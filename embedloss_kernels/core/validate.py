"""Input checks shared by the functional API and the modules: every bad input is a clear error before any kernel."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from .contract import GIST_MARGIN_STRATEGIES

VALID_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
VALID_PARTITION_MODES = ("joint", "per_direction")
VALID_HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def scale_value(scale) -> float:
    """The value of a scale as the ops take it: a float (a symbolic one under ``torch.compile(dynamic=True)``).

    A tensor scale is read with one host sync (``float(tensor)``): a graph break under ``torch.compile``, an error
    under ``fullgraph=True`` (with ``capture_scalar_outputs`` set too: the value checks are data-dependent guards).
    """
    if isinstance(scale, torch.SymFloat):
        return scale
    if isinstance(scale, torch.SymInt):
        return torch.sym_float(scale)
    if isinstance(scale, Tensor):
        return float(scale.detach().reshape(()))
    return float(scale)


def check_scale(scale, name: str = "scale", *, positive: bool = True, finite: bool = True):
    """``scale`` checked: a real number (bools and numpy scalars included, as sentence-transformers takes them) or a
    one-element real tensor (kept as it is, so that a learnable scale gets its gradient). ``positive``: the value must
    be > 0 (MNRL); else any value but NaN (CoSENT / AnglE, where 0 and negative scales are meaningful). ``finite``:
    reject infinity (the functional API; the drop-in modules accept ``inf`` as sentence-transformers does, and give
    its NaN). Returns ``scale`` (a number as a float)."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1 or scale.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got a tensor of shape "
                            f"{tuple(scale.shape)} and dtype {scale.dtype}")
        value = scale_value(scale)
    elif isinstance(scale, (numbers.Real, torch.SymInt, torch.SymFloat)):
        value = scale = scale_value(scale)
    else:
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__} ({scale!r})")
    # Comparisons, not math.isfinite / math.isnan: torch.compile traces them on a symbolic float.
    if positive and not value > 0:
        raise ValueError(f"Scale must be a positive value. Got {name}={value!r}; expected a number > 0.")
    if not positive and not value == value:
        raise ValueError(f"{name} must not be NaN, got {name}={value!r}")
    if finite and not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {name}={value!r}")
    return scale


def check_hardness(hardness_mode, hardness_strength) -> float:
    if hardness_mode not in VALID_HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {set(VALID_HARDNESS_MODES)}, got {hardness_mode!r}")
    if isinstance(hardness_strength, bool) or not isinstance(hardness_strength, numbers.Real):
        raise TypeError(
            f"hardness_strength must be a real number, got {type(hardness_strength).__name__} ({hardness_strength!r})"
        )
    if not isinstance(hardness_strength, torch.SymFloat):
        hardness_strength = float(hardness_strength)
    if hardness_strength < 0.0:
        raise ValueError(f"hardness_strength must be non-negative. Got hardness_strength={hardness_strength!r}.")
    if not hardness_strength < math.inf:  # not math.isfinite: torch.compile(dynamic=True) traces a comparison
        raise ValueError(f"hardness_strength must be finite, got {hardness_strength!r}")
    return hardness_strength


def check_directions(directions, partition_mode) -> tuple[str, ...]:
    if isinstance(directions, str):
        raise TypeError(f"directions must be a tuple of direction names, got the string {directions!r}")
    if not directions:
        raise ValueError("At least one direction must be specified.")
    directions = tuple(directions)
    unknown = set(directions) - set(VALID_DIRECTIONS)
    if unknown:
        raise ValueError(f"Invalid directions: {unknown}. Valid: {set(VALID_DIRECTIONS)}")
    if "query_to_doc" not in directions:
        raise ValueError("'query_to_doc' direction is required (contains the positive pair).")
    if partition_mode not in VALID_PARTITION_MODES:
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError(
            "partition_mode='per_direction' requires every direction's candidate pool to include the positive pair. "
            "'query_to_query' and 'doc_to_doc' only contain same-type similarities and never include the positive, "
            "making the per-direction loss ill-defined. Use partition_mode='joint' instead."
        )
    return directions


FINITE_ENV = "EMBEDLOSS_CHECK_FINITE"
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def finite_check_setting() -> bool | None:
    """``EMBEDLOSS_CHECK_FINITE`` as a boolean: ``None`` when unset or empty (each caller's default applies), else
    True for 1/true/yes/on and False for 0/false/no/off (any case); any other value raises ``ValueError``."""
    raw = os.environ.get(FINITE_ENV, "")
    value = raw.strip().lower()
    if not value:
        return None
    if value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise ValueError(
        f"{FINITE_ENV} must be one of {'/'.join(_TRUE_WORDS)} (check) or {'/'.join(_FALSE_WORDS)} (do not check), "
        f"or unset; got {raw!r}"
    )


def check_finite_inputs(strict: bool = True) -> bool:
    """Whether to check inputs for NaN/Inf (one host sync per tensor) and raise. ``strict``: the caller's default
    when the variable is unset: True for the functional API, False for the drop-in modules (which, as
    sentence-transformers, return a NaN loss instead). Skipped while torch.compile traces (a data-dependent branch
    would break the graph) and under torch.func transforms (vmap cannot turn one entry's isfinite into a Python
    bool, and a grad/jvp-wrapped input would be checked once per nesting level)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    setting = finite_check_setting()
    return strict if setting is None else setting


def check_embeddings(tensors: Sequence[Tensor], names: Sequence[str], min_count: int = 2, strict: bool = True) -> None:
    """Columns of embeddings: 2-D float tensors of one dtype and device, equal batch sizes and dims, and finite
    (see :func:`check_finite_inputs`; ``strict=False`` for the drop-in modules)."""
    if len(tensors) < min_count:
        raise ValueError(f"Expected at least {min_count} embeddings, got {len(tensors)}")
    for t, name in zip(tensors, names):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    first, first_name = tensors[0], names[0]
    for t, name in zip(tensors[1:], names[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; expected one device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; expected one dtype")
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{name} has dim {t.shape[1]} but {first_name} has dim {first.shape[1]}")
        if t.shape[0] != first.shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} but {first_name} has {first.shape[0]}")
    if first.shape[0] == 0:
        raise ValueError(f"{first_name} is an empty batch (batch size 0); expected at least one row")
    if first.shape[1] == 0:
        raise ValueError(f"{first_name} has embedding dim 0; expected at least 1")
    if check_finite_inputs(strict) and not all_finite(tensors):
        for t, name in zip(tensors, names):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf values; the loss would be NaN")


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one host sync and no tensor-sized temporary: a NaN or
    an Inf makes a sum non-finite, so finite sums prove finite inputs. A non-finite sum may also be an overflow of
    finite values (float16): then the exact elementwise check decides."""
    sums = torch.stack([t.sum() for t in tensors])
    return bool(torch.isfinite(sums).all()) or all(bool(torch.isfinite(t).all()) for t in tensors)


def check_labels(labels, batch_size: int, owner: str, strict: bool = True) -> Tensor:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.numel() != batch_size:
        raise ValueError(
            f"{owner} expects {batch_size} labels (one per example), "
            f"but got {labels.numel()} labels with shape {tuple(labels.shape)}."
        )
    labels = labels.reshape(-1)
    if labels.is_floating_point() and check_finite_inputs(strict) and not bool(torch.isfinite(labels).all()):
        raise ValueError("labels contain NaN or Inf values")
    if labels.is_complex():
        raise TypeError(f"labels must be real numbers, got {labels.dtype}")
    return labels


def check_matryoshka_dims(dims, weights, embedding_dim: int | None = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Matryoshka prefix dims (positive ints, at most the embedding dim) and their weights (finite reals, one per dim;
    ``None``: all 1). Returned in the caller's order."""
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
        raise TypeError(f"dims must be a sequence of ints, got {type(dims).__name__} ({dims!r})")
    if len(dims) == 0:
        raise ValueError("You must provide at least one dimension in dims (got an empty sequence).")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"dims must hold ints, got {type(d).__name__} ({d!r}) in {list(dims)!r}")
        if d <= 0:
            raise ValueError(f"All dimensions passed to a matryoshka loss must be > 0, got {d} in {list(dims)!r}")
        if embedding_dim is not None and d > embedding_dim:
            raise ValueError(
                f"Dimension {d} in dims cannot be greater than the embedding dimension {embedding_dim}; "
                f"got dims={list(dims)!r}"
            )
    if weights is None:
        weights = [1.0] * len(dims)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"weights must be a sequence of numbers or None, got {type(weights).__name__}")
    if len(weights) != len(dims):
        raise ValueError(f"weights must be the same length as dims: got {len(weights)} weights for {len(dims)} dims")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"weights must hold real numbers, got {type(w).__name__} ({w!r})")
        if not math.isfinite(float(w)):
            raise ValueError(f"weights must be finite, got {w!r}")
    return tuple(int(d) for d in dims), tuple(float(w) for w in weights)


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__} ({temperature!r})")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got temperature={temperature!r}")
    return temperature


def check_margin(margin_strategy, margin) -> float:
    if margin_strategy not in GIST_MARGIN_STRATEGIES:
        raise ValueError(f"margin_strategy must be 'absolute' or 'relative', got {margin_strategy!r}")
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number, got {type(margin).__name__} ({margin!r})")
    margin = float(margin)
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got margin={margin!r}")
    return margin


def check_guide(columns: Sequence[Tensor], guide, names: Sequence[str], strict: bool = True) -> list[Tensor]:
    """The guide's embeddings: one (B, D') tensor per model column, same rows and device as the model's columns
    (their own dtype and dim), finite (as :func:`check_embeddings`; ``strict=False`` for the drop-in modules)."""
    if isinstance(guide, Tensor) or not isinstance(guide, Sequence):
        raise TypeError(
            "guide must be a tuple of the guide model's embeddings, one per column "
            f"({', '.join(names)}), got {type(guide).__name__}"
        )
    guide = list(guide)
    if len(guide) != len(columns):
        raise ValueError(
            f"guide must hold one embedding per column ({', '.join(names)}): expected {len(columns)} tensors, "
            f"got {len(guide)}"
        )
    guide_names = [f"guide[{i}] ({name})" for i, name in enumerate(names)]
    check_embeddings(guide, guide_names, strict=strict)
    if guide[0].device != columns[0].device:
        raise ValueError(f"guide embeddings are on {guide[0].device} but {names[0]} is on {columns[0].device}; "
                         "expected one device")
    if guide[0].shape[0] != columns[0].shape[0]:
        raise ValueError(f"guide embeddings have batch size {guide[0].shape[0]} but {names[0]} has "
                         f"{columns[0].shape[0]}; expected one guide row per row")
    return guide
