"""GIST on raw tensors: validation, the backend's ``gist`` op, and ``gather_across_devices``.

``gist_loss`` is exported by :mod:`embedloss_kernels.functional`; the drop-in ``GISTEmbedLoss`` /
``CachedGISTEmbedLoss`` call :func:`gist_from_columns` / :func:`gist_across_devices`. No sentence-transformers
import here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import _backends
from ._validate import check_embeddings
from .ops import GIST_MARGIN_STRATEGIES
from .ops.autograd import loss_from_op, needs_grad
from .ops.torch_ops import block_budget_bytes


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


def check_guide(columns: Sequence[Tensor], guide, names: Sequence[str]) -> list[Tensor]:
    """The guide's embeddings: one (B, D') tensor per model column, same rows and device as the model's columns
    (their own dtype and dim), finite."""
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
    check_embeddings(guide, guide_names)
    if guide[0].device != columns[0].device:
        raise ValueError(f"guide embeddings are on {guide[0].device} but {names[0]} is on {columns[0].device}; "
                         "expected one device")
    if guide[0].shape[0] != columns[0].shape[0]:
        raise ValueError(f"guide embeddings have batch size {guide[0].shape[0]} but {names[0]} has "
                         f"{columns[0].shape[0]}; expected one guide row per row")
    return guide


_loaded: dict[str, object] = {}


def _import_gist(name: str):
    # Plain import statements (as _backends does): torch.compile traces them, not importlib.import_module.
    if name == "torch":
        from .ops import gist_torch as module
    elif name == "cpp":
        from .ops import gist_cpp as module
    else:
        from .ops import gist_triton as module
    return module


def _gist_module(name: str):
    """The module holding backend ``name``'s gist op (kept apart from its other ops), or a string saying why it could
    not be imported."""
    if name not in _loaded:
        try:
            _loaded[name] = _import_gist(name)
        except Exception as exc:  # noqa: BLE001 - any import failure makes the op unavailable on this backend
            _loaded[name] = f"{type(exc).__name__}: {exc}"
    return _loaded[name]


def _gist_op(device: torch.device, backend: str | None):
    """The ``gist`` op of the backend that runs on ``device`` (see ``_backends.current_backend``); when that
    backend has no gist op, an error if it was asked for by name, else the torch backend's op with a warning."""
    name = _backends.current_backend(device, backend)
    module = _gist_module(name)
    reason = module if isinstance(module, str) else module.why_not(device)
    if reason is None:
        return module.gist
    forced = backend if backend is not None else _backends.requested_backend()
    if forced != "auto":
        raise _backends.BackendUnavailableError(f"the {name} backend has no gist op here: {reason}")
    from .functional import warn_once

    warn_once(f"gist-fallback:{name}", f"the {name} backend has no gist op here ({reason}); using the torch backend")
    return _gist_module("torch").gist


def gist_from_columns(
    anchor: Tensor,
    docs: Sequence[Tensor],
    anchor_guide: Tensor,
    docs_guide: Sequence[Tensor],
    *,
    temperature: float,
    margin_strategy: str,
    margin: float,
    contrast_anchors: bool,
    contrast_positives: bool,
    row_start: int = 0,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """GIST on already-validated columns: ``anchor`` (B, D) this rank's anchors, each of ``docs`` (Bw, D) a column
    of the (world) batch whose row ``row_start + i`` belongs to anchor ``i``; the guide's embeddings alike."""
    if block_rows == 0:
        block_budget_bytes()  # a bad EMBEDLOSS_BLOCK_MIB fails here, clearly
    candidates = torch.cat([d.contiguous() for d in docs], dim=0) if len(docs) > 1 else docs[0].contiguous()
    with torch.no_grad():  # the guide never gets a gradient
        candidates_guide = (torch.cat([d.detach() for d in docs_guide], dim=0) if len(docs_guide) > 1
                            else docs_guide[0].detach().contiguous())
        anchor_guide = anchor_guide.detach().contiguous()
    a = anchor.contiguous()
    op = _gist_op(a.device, backend)
    return loss_from_op(
        op, a, candidates, anchor_guide, candidates_guide, len(docs), row_start, 1.0 / temperature,
        GIST_MARGIN_STRATEGIES[margin_strategy], margin, bool(contrast_anchors), bool(contrast_positives),
        needs_grad(a, candidates), block_rows,
    )


def gist_loss(
    anchor: Tensor,
    positive: Tensor,
    *negatives: Tensor,
    guide: Sequence[Tensor],
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    backend: str | None = None,
    block_rows: int = 0,
) -> Tensor:
    """GISTEmbedLoss (GIST: guided in-sample selection of negatives), fused: no B x N matrix is kept.

    InfoNCE over cosine similarities divided by ``temperature``, where a guide model's similarities remove likely
    false negatives: with ``t_i`` the guide's similarity of anchor ``i`` and its positive, every candidate whose
    guide similarity to the row's query exceeds ``t_i - margin`` ("absolute") or ``t_i - |t_i| * margin``
    ("relative") is left out of the softmax (never the positive itself).

    Args:
        anchor: (B, D) the model's anchor embeddings.
        positive: (B, D) the positive of each anchor.
        *negatives: any number of (B, D) hard-negative columns (anchor-negative blocks).
        guide: the guide model's embeddings ``(anchor_g, positive_g, *negatives_g)``, (B, D') each (any float
            dtype, same device); they get no gradient.
        temperature: divides the similarities; finite and > 0.
        margin_strategy, margin: the false-negative rule above.
        contrast_anchors: add the anchor-anchor block (each anchor against every anchor, masked by the same rule).
        contrast_positives: add the positive-positive block.
        backend: ``"torch"``, ``"cpp"``, ``"triton"`` or ``None`` (``EMBEDLOSS_BACKEND`` / auto).
        block_rows: anchor rows per block (0: from the ``EMBEDLOSS_BLOCK_MIB`` budget).

    Returns:
        The mean loss over the anchors, a 0-dim float32 tensor (float64 for float64 inputs).
    """
    columns = [anchor, positive, *negatives]
    names = ["anchor", "positive"] + [f"negatives[{i}]" for i in range(len(negatives))]
    check_embeddings(columns, names)
    guide = check_guide(columns, guide, names)
    temperature = check_temperature(temperature)
    margin = check_margin(margin_strategy, margin)
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 0:
        raise ValueError(f"block_rows must be a non-negative int (0 = automatic), got {block_rows!r}")
    return gist_from_columns(
        anchor, columns[1:], guide[0], guide[1:], temperature=temperature, margin_strategy=margin_strategy,
        margin=margin, contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, backend=backend,
        block_rows=block_rows,
    )


def gist_across_devices(
    anchor: Tensor,
    docs: Sequence[Tensor],
    anchor_guide: Tensor,
    docs_guide: Sequence[Tensor],
    *,
    group=None,
    check=None,
    **options,
) -> Tensor:
    """GIST of this rank's anchors against the candidates (and their guide embeddings) of every rank, as
    sentence-transformers' ``gather_across_devices``: anchors are not gathered (the anchor-anchor block stays
    local), this rank's positives start at row ``sum of the lower ranks' batch sizes`` (``rank * B``); the
    candidates' gradients are reduce-scattered back to their owners. A no-op, with a warning, when
    torch.distributed is not initialized."""
    from . import distributed, functional

    if distributed.is_distributed() and check is not None:
        distributed._agree_on_validation(check, anchor.device, group)
    elif check is not None:
        check()
    if not distributed.is_distributed():
        functional.warn_once(
            "gather-not-distributed",
            "gather_across_devices=True but torch.distributed is not initialized: using the local batch only. "
            "This is expected on one device; set gather_across_devices=False to remove this warning.",
        )
        return gist_from_columns(anchor, docs, anchor_guide, docs_guide, **options)
    sizes = tuple(r[0] for r in distributed.gather_metadata(list(docs), group))
    distributed.gather_metadata(list(docs_guide), group)  # the guide's dims and dtypes agree too
    rank = dist.get_rank(group)
    p_all, n_all = distributed._GatherColumns.apply(sizes, group, *docs)
    with torch.no_grad():
        pg_all, ng_all = distributed._GatherColumns.apply(sizes, group, *[d.detach() for d in docs_guide])
    world_docs = [p_all, *n_all.view(-1, *p_all.shape).unbind(0)]
    world_guide = [pg_all, *ng_all.view(-1, *pg_all.shape).unbind(0)]
    return gist_from_columns(anchor, world_docs, anchor_guide, world_guide, row_start=sum(sizes[:rank]), **options)
