"""How many anchor rows a row block holds: the memory budget (``EMBEDLOSS_BLOCK_MIB``) and the GPU's block sizing.

Every backend's automatic block size (``block_rows=0``) comes from here; the C++ kernels read the same variable in
``csrc/cpu/kernels.h`` (``block_budget_mib``).
"""

from __future__ import annotations

import os

import torch

DEFAULT_BLOCK_MIB = 32.0
GIB = 2**30
MAX_BLOCK_BYTES = 3 * GIB // 4  # one row block's logits on a GPU: the 1 GiB beyond gradients and dA, less temporaries
MIN_GEMM_ROWS = 1024  # rows per block below which the dA += G^T X product turns memory-bound (see block_rows)


def block_budget_bytes() -> float:
    """Memory for one row block's logits (``EMBEDLOSS_BLOCK_MIB``, default 32 MiB); a value that is not a positive
    number raises ``ValueError`` naming the variable (every backend's automatic block size reads it)."""
    raw = os.environ.get("EMBEDLOSS_BLOCK_MIB", "").strip()
    if not raw:
        return DEFAULT_BLOCK_MIB * 2**20
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    if not mib > 0 or mib == float("inf"):
        raise ValueError(f"EMBEDLOSS_BLOCK_MIB must be a positive number of MiB, got {raw!r}")
    return mib * 2**20


def budget_rows(width: int, elem: int, buffers: int) -> int:
    """Rows per block when ``buffers`` buffers of a block row's ``width`` logits (``elem`` bytes each) live at once
    within the budget (the plain row-block path: the logits, their exponentials and the matmul temporaries)."""
    return max(1, int(block_budget_bytes() // (buffers * elem * max(width, 1))))


def block_budget(device: torch.device) -> float:
    """Bytes for one row block's logits: ``EMBEDLOSS_BLOCK_MIB`` when set; on a GPU otherwise a quarter of the free
    memory (the caching allocator's idle blocks counted as free), at most :data:`MAX_BLOCK_BYTES`."""
    if os.environ.get("EMBEDLOSS_BLOCK_MIB", "").strip() or device.type != "cuda":
        return block_budget_bytes()
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return float(min(MAX_BLOCK_BYTES, free // 4))


def block_rows(row_count: int, width: int, bytes_per_logit: float, device: torch.device) -> int:
    """Anchor rows per block of the GPU path, given the columns of a block row and the bytes each logit occupies.

    On a GPU, blocks are sized for the products, not only for the budget. A block of ``n`` rows moves the float32
    ``(N, D)`` accumulator through HBM once for ``2 n N D`` flops of ``dA += G^T X`` (``n / 4`` flops per byte):
    under ~1000 rows that product is memory-bound on an H100 (~295 bf16 flops per HBM byte), so blocks get at least
    :data:`MIN_GEMM_ROWS` rows when the budget allows, and more when their logits still fit in L2 (then the row
    pass reads S from L2). Row counts are rounded to a multiple of 128 (whole GEMM tiles).
    """
    rows = max(1, int(block_budget(device) // (bytes_per_logit * max(width, 1))))
    if device.type == "cuda" and not os.environ.get("EMBEDLOSS_BLOCK_MIB", "").strip():
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        l2_rows = int(0.8 * l2 // (bytes_per_logit * max(width, 1)))
        rows = min(rows, max(l2_rows, MIN_GEMM_ROWS))
        if rows > 128:
            rows -= rows % 128
    return max(1, min(rows, row_count))
