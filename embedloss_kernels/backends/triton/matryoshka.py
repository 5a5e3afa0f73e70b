"""The ``triton`` backend's ``matryoshka``: the prefix products and the gradient products are matmuls (cuBLAS on
CUDA) on column slices, shared with the torch backend's block loop
(:func:`embedloss_kernels.backends.torch.matryoshka.matryoshka_forward`); each dim's row pass (logits, exact LSE,
``G = softmax - onehot``, ``G * cos`` for the radial sums) runs in the Triton row kernels of
:mod:`embedloss_kernels.kernels.matryoshka`: two reads of the block's cosines and two writes per dim.

Scalars reach the kernels in a tensor of the work dtype (float64 inputs stay float64 in the kernels). On CPU tensors
the kernels run through the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...core.contract import HARDNESS_ALL, HARDNESS_HARD, HARDNESS_IN_BATCH, HARDNESS_NONE
from ...heuristics.triton import matryoshka_tile
from ..torch.matryoshka import matryoshka_forward as matryoshka_block_loop
from . import triton

if triton is not None:
    from ...kernels.matryoshka import matryoshka_row_grad_kernel, matryoshka_row_stats_kernel

_PEN_MODE = {HARDNESS_NONE: 0, HARDNESS_IN_BATCH: 1, HARDNESS_HARD: 2, HARDNESS_ALL: 3}
_MASK_MODE = {"qd": 0, "qq": 1, "dq": 0, "dd": 2}


def triton_row_pass(
    cos: dict[str, Tensor],
    tmp: dict[str, Tensor],
    own: Tensor,
    row0: int,
    n_cols: int,
    scale: float,
    weight: float,
    inv_rows: float,
    joint: bool,
    hardness_mode: int,
    alpha: float,
    compute_grad: bool,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """The torch backend's ``torch_row_pass`` contract, in Triton row kernels."""
    first = cos["qd"]
    n, wd, device = first.shape[0], first.dtype, first.device
    bq = first.shape[1] // n_cols
    owners = {}
    stats = {}
    params = torch.tensor([scale, alpha, 0.0, 0.0], dtype=wd, device=device)
    for key, c in cos.items():
        pen = _PEN_MODE[hardness_mode] if key == "qd" and alpha > 0 else 0
        mask = _MASK_MODE[key]
        owner = (torch.arange(c.shape[1], device=device, dtype=torch.int32) % bq) if (pen or mask == 2) else own
        owners[key] = (owner, pen, mask)
        mx, sm = torch.empty(n, dtype=wd, device=device), torch.empty(n, dtype=wd, device=device)
        matryoshka_row_stats_kernel[(n,)](c, owner, params, mx, sm, row0, c.shape[1], c.stride(0), PEN_MODE=pen,
                                          MASK_MODE=mask, BN=matryoshka_tile(c.shape[1], wd))
        stats[key] = (mx, sm)
    ar = torch.arange(n, device=device)
    positive = first[ar, own] * scale
    if joint:
        row_max = torch.stack([mx for mx, _ in stats.values()]).amax(0)
        total = sum(sm * torch.exp(mx - row_max) for mx, sm in stats.values())
        lse_joint = row_max + total.log()
        lses = dict.fromkeys(cos, lse_joint)
        lse_mean = lse_joint
    else:
        lses = {k: mx + sm.log() for k, (mx, sm) in stats.items()}
        lse_mean = sum(lses.values()) / len(lses)
    row_loss = (lse_mean - positive) * weight
    if not compute_grad:
        return row_loss, None
    g_weight = scale * weight * inv_rows / (1 if joint else len(cos))
    onehot = scale * weight * inv_rows
    # per_direction: doc_to_query's column g is query_to_doc's positive pair, so each takes its share of the one-hot
    # (a lone column's G is then exactly 0 in both blocks, not -w and +w cancelling after the products)
    split = not joint and "dq" in cos
    onehots = {"qd": onehot - g_weight, "dq": g_weight} if split else {"qd": onehot}
    for key, c in cos.items():
        owner, pen, mask = owners[key]
        g = tmp[key]
        lse = lses[key].contiguous()
        params = torch.tensor([scale, alpha, g_weight, onehots.get(key, 0.0)], dtype=wd, device=device)
        matryoshka_row_grad_kernel[(n,)](c, g, owner, params, lse, row0, c.shape[1], c.stride(0), g.stride(0),
                                         POSITIVE=key in onehots, PEN_MODE=pen, MASK_MODE=mask,
                                         BN=matryoshka_tile(c.shape[1], wd))
    return row_loss, tmp


def matryoshka_forward(q, a, dims, weights, row_start, row_count, scale, directions, joint, hardness_mode,
                       hardness_strength, compute_grad, block_rows):
    args = (q, a, dims, weights, row_start, row_count, scale, directions, joint, hardness_mode, hardness_strength,
            compute_grad, block_rows)
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            return matryoshka_block_loop(*args, row_pass=triton_row_pass)
    return matryoshka_block_loop(*args, row_pass=triton_row_pass)
