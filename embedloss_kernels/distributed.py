"""gather_across_devices: this rank's rows against every rank's columns over torch.distributed."""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import Tensor

from . import functional


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def infonce_across_devices(queries: Tensor, docs: Sequence[Tensor], **options) -> Tensor:
    """MNRL of this rank's rows against all gathered columns; a no-op (with a warning) when not distributed."""
    if not is_distributed():
        functional.warn_once(
            "gather-not-distributed",
            "gather_across_devices=True but torch.distributed is not initialized: using the local batch only. "
            "This is expected on one device; set gather_across_devices=False to remove this warning.",
        )
        return functional.infonce_from_columns(queries, docs, **options)
    raise NotImplementedError("gather_across_devices under an initialized process group is not implemented yet")
