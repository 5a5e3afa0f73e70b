"""What every functional entry shares: which similarities the fused ops compute, the scale as the ops take it, and
the MNRL family's op inputs. No sentence-transformers import (its functions are recognised by module and name)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import reference
from ..core.contract import DIRECTION_BITS, HARDNESS_CODES, SIM_ANGLE, SIM_COSINE, SIM_DOT
from ..core.log import warn_once
from ..core.validate import scale_value
from ..heuristics.blocks import block_budget_bytes

_MATRIX_SIMS = {"cosine": "cosine", "cos": "cosine", "cos_sim": "cosine", "dot": "dot", "dot_score": "dot"}
_ST_MATRIX_NAMES = {"cos_sim": "cosine", "pytorch_cos_sim": "cosine", "dot_score": "dot"}
_PAIR_SIMS = {"cosine": SIM_COSINE, "cos": SIM_COSINE, "dot": SIM_DOT, "angle": SIM_ANGLE}
_ST_PAIR_NAMES = {"pairwise_cos_sim": SIM_COSINE, "pairwise_dot_score": SIM_DOT, "pairwise_angle_sim": SIM_ANGLE}


class unfused:  # noqa: N801 - used like a function: ``unfused(similarity)``
    """A similarity wrapped so that the plain materialized path computes it, without the "not fused" warning (the
    modules use it where the fused kernels do not apply, e.g. an infinite hardness penalty)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        return self.fn(a, b)


def _is_st_function(fn) -> bool:
    return getattr(fn, "__module__", "").startswith("sentence_transformers")


def resolve_similarity(similarity) -> str | None:
    """``"cosine"`` / ``"dot"`` for a similarity the fused op computes, ``None`` for any other callable."""
    if isinstance(similarity, str):
        if similarity.lower() not in _MATRIX_SIMS:
            raise ValueError(f"similarity must be 'cosine', 'dot' or a callable, got {similarity!r}")
        return _MATRIX_SIMS[similarity.lower()]
    if not callable(similarity):
        raise TypeError(f"similarity_fct must be callable or 'cosine'/'dot', got {type(similarity).__name__}")
    if isinstance(similarity, unfused):
        return None
    if similarity is reference.cos_sim:
        return "cosine"
    if similarity is reference.dot_score:
        return "dot"
    if _is_st_function(similarity) and getattr(similarity, "__name__", "") in _ST_MATRIX_NAMES:
        return _ST_MATRIX_NAMES[similarity.__name__]
    return None


def resolve_pair_similarity(similarity) -> int | None:
    """The op's similarity code for a pairwise similarity it computes, ``None`` for any other callable."""
    if isinstance(similarity, str):
        if similarity.lower() not in _PAIR_SIMS:
            raise ValueError(f"similarity must be 'cosine', 'dot', 'angle' or a callable, got {similarity!r}")
        return _PAIR_SIMS[similarity.lower()]
    if not callable(similarity):
        raise TypeError(f"similarity_fct must be callable or a name, got {type(similarity).__name__}")
    if isinstance(similarity, unfused):
        return None
    ours = {reference.pairwise_cos_sim: SIM_COSINE, reference.pairwise_dot_score: SIM_DOT,
            reference.pairwise_angle_sim: SIM_ANGLE}
    if similarity in ours:
        return ours[similarity]
    if _is_st_function(similarity) and getattr(similarity, "__name__", "") in _ST_PAIR_NAMES:
        return _ST_PAIR_NAMES[similarity.__name__]
    return None


def similarity_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def fused_scale(scale) -> tuple[float | None, Tensor | None]:
    """The scale's value for a fused op and the tensor that gets its gradient (``None`` for a number); value
    ``None`` when the fused op must not run: an infinite scale (every logit is infinite: the loss is NaN, as
    sentence-transformers', which the plain computation reproduces) or a learnable scale at 0 (its gradient
    identity divides by the scale)."""
    value = scale_value(scale)
    param = scale if isinstance(scale, Tensor) else None
    if not -math.inf < value < math.inf:
        warn_once("infinite-scale", f"scale={value}: every logit is infinite, so the loss and its gradients are NaN "
                  "(as sentence-transformers'); running the plain PyTorch computation.")
        return None, param
    if param is not None and value == 0:
        return None, param
    return value, param


def check_block_rows(block_rows) -> int:
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 0:
        raise ValueError(f"block_rows must be a non-negative int (0 = automatic), got {block_rows!r}")
    return block_rows


def check_block_budget(block_rows: int) -> None:
    """The automatic block size (``block_rows=0``) reads ``EMBEDLOSS_BLOCK_MIB``: a bad value fails here, clearly."""
    if block_rows == 0:
        block_budget_bytes()


def op_inputs(queries: Tensor, docs: Sequence[Tensor], directions: Sequence[str], hardness_mode: str | None,
               hardness_strength: float, block_rows: int) -> tuple[Tensor, Tensor, int, int]:
    """What the MNRL-family ops take: contiguous queries, the candidate columns stacked (K*Bq, D), the direction
    bits and the hardness code."""
    check_block_budget(block_rows)
    bits = 0
    for name in directions:
        bits |= DIRECTION_BITS[name]
    hardness = HARDNESS_CODES[hardness_mode] if hardness_strength > 0 else HARDNESS_CODES[None]
    candidates = torch.cat([d.contiguous() for d in docs], dim=0) if len(docs) > 1 else docs[0].contiguous()
    return queries.contiguous(), candidates, bits, hardness
