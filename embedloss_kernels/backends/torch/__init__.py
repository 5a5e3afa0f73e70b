"""The ``torch`` backend: plain PyTorch, on any device; the default where no other backend can run."""

from __future__ import annotations

import torch


def why_not(device: torch.device) -> str | None:
    return None  # plain PyTorch runs wherever torch does
