"""The ``triton`` backend: InfoNCE logit blocks in fused Triton kernels (``embedloss_kernels/triton``), CoSENT by
the O(B log B) sorted path; ops ``embedloss_triton::infonce`` / ``embedloss_triton::cosent`` for CUDA, and for CPU
tensors through the Triton interpreter when ``TRITON_INTERPRET=1``.

Strategy (row-block workspace, DESIGN.md): pass 1 (:func:`row_lse_kernel`) streams each direction block's column
tiles once and keeps only a per-row running max / sum, so the exact LSE of every row costs O(rows) memory. Pass 2
(:func:`softmax_grad_kernel`) recomputes one row block's tiles and writes ``G = softmax - onehot`` into a workspace
of ``rows_per_block x columns`` (bounded by ``EMBEDLOSS_BLOCK_MIB``), then ``dX += G Y`` and ``dY += G^T X`` are two
plain matmuls on it. Recomputing S costs one extra ``X Y^T`` but never writes B x N logits to HBM.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import (
    COSENT_SCHEMA,
    DOC_TO_DOC,
    DOC_TO_QUERY,
    HARDNESS_ALL,
    HARDNESS_HARD,
    HARDNESS_IN_BATCH,
    HARDNESS_NONE,
    INFONCE_SCHEMA,
    QUERY_TO_QUERY,
)
from .torch_ops import (
    backward_scaled_grads,
    block_budget_bytes,
    cosent_forward,
    normalize_rows,
    normalize_rows_backward,
    setup_saved_grads,
    work_dtype,
)

SUPPORTED_TRITON = ((3, 6), (3, 9))
_PEN_MODE = {HARDNESS_NONE: 0, HARDNESS_IN_BATCH: 1, HARDNESS_HARD: 2, HARDNESS_ALL: 3}
MASK_NONE, MASK_SELF, MASK_OWN_DOCS = 0, 1, 2

try:
    import triton
    import triton.language as tl

    from ..triton.infonce_kernels import row_lse_kernel, softmax_grad_kernel

    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any failure leaves the backend unavailable, with the reason
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not(device: torch.device) -> str | None:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    if not SUPPORTED_TRITON[0] <= version <= SUPPORTED_TRITON[1]:
        return f"triton {triton.__version__} is outside the supported 3.6-3.9"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    if device.type == "cpu":
        return None if _interpreted() else "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    return f"the triton backend runs on cuda (or cpu through the interpreter), not {device.type}"


def tile_config(n_dim: int, dtype: torch.dtype, interpreted: bool | None = None) -> dict:
    """Tile shape for a launch. BK covers D in one chunk up to 64 (tl.dot needs >= 16); 64x64 tiles keep fp32
    accumulators at 32 registers/thread with 4 warps, fp64 halves BN to stay spill-free."""
    bk = 16 if n_dim <= 16 else 32 if n_dim <= 32 else 64
    if interpreted if interpreted is not None else _interpreted():
        return {"BM": 16, "BN": 16, "BK": bk}  # small tiles: the interpreter is slow, odd shapes cross tiles
    return {"BM": 64, "BN": 32 if dtype == torch.float64 else 64, "BK": bk}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and _interpreted():
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_lse(x, y, row_start, row_count, bq, scale, boost, pen, mask, cfg, acc, prec, wd):
    m = torch.empty(row_count, dtype=wd, device=x.device)
    s = torch.empty_like(m)
    p = torch.empty_like(m)
    grid = (triton.cdiv(row_count, cfg["BM"]),)
    row_lse_kernel[grid](x, y, m, s, p, row_start, row_count, y.shape[0], x.shape[1], x.stride(0), y.stride(0), bq,
                         scale, boost, PEN_MODE=pen, MASK_MODE=mask, ACC=acc, PREC=prec, **cfg)
    return m, s, p


def infonce_forward(q: Tensor, a: Tensor, row_start: int, row_count: int, scale: float, cosine: bool,
                    directions: int, joint: bool, hardness_mode: int, hardness_strength: float, compute_grad: bool,
                    block_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    out_dtype = q.dtype
    wd = work_dtype(q.dtype)
    bq = q.shape[0]
    if cosine:
        qw, q_norm = normalize_rows(q.to(wd))
        aw, a_norm = normalize_rows(a.to(wd))
        # Kernel tiles read the input precision (tensor cores); the gradient matmuls use the work precision.
        qk, ak = qw.to(out_dtype).contiguous(), aw.to(out_dtype).contiguous()
    else:
        qk, ak = q.contiguous(), a.contiguous()
        qw, aw = qk.to(wd), ak.to(wd)
    cfg, acc, prec = tile_config(q.shape[1], q.dtype), _acc(q.dtype), _precision(q.dtype)
    alpha = float(hardness_strength) if hardness_mode != HARDNESS_NONE else 0.0
    # (name, X kernel rows, Y kernel, X work, Y work, penalty, mask): X rows are the anchors' queries or positives.
    blocks = [("qd", qk, ak, qw, aw, _PEN_MODE[hardness_mode] if alpha else 0, MASK_NONE)]
    if directions & QUERY_TO_QUERY:
        blocks.append(("qq", qk, qk, qw, qw, 0, MASK_SELF))
    if directions & DOC_TO_QUERY:
        blocks.append(("dq", ak, qk, aw, qw, 0, MASK_NONE))
    if directions & DOC_TO_DOC:
        blocks.append(("dd", ak, ak, aw, aw, 0, MASK_OWN_DOCS))

    stats = [_block_lse(xk, yk, row_start, row_count, bq, scale, alpha, pen, mask, cfg, acc, prec, wd)
             for _, xk, yk, _, _, pen, mask in blocks]
    if joint:
        row_max = torch.stack([m for m, _, _ in stats]).amax(0)
        total = sum(s * (m - row_max).exp() for m, s, _ in stats)
        lse_joint = row_max + total.log()
        lses = [lse_joint] * len(blocks)
        lse_mean = lse_joint
    else:
        lses = [m + s.log() for m, s, _ in stats]
        lse_mean = sum(lses) / len(blocks)
    positive = stats[0][2]  # the query_to_doc block's diagonal logit, always at the plain scale
    loss = (lse_mean - positive).mean()
    if not compute_grad:
        empty = q.new_empty((0,))
        return loss, empty, empty

    dq = torch.zeros_like(qw)
    da = torch.zeros_like(aw)
    grads = {id(qw): dq, id(aw): da}
    inv_rows = 1.0 / row_count
    weight = scale * inv_rows / (1 if joint else len(blocks))
    width = max(yk.shape[0] for _, _, yk, *_ in blocks)
    elem = torch.finfo(wd).bits // 8
    per_block = block_rows if block_rows > 0 else max(1, int(block_budget_bytes() // (elem * width)))
    per_block = min(per_block, row_count)
    workspace = torch.empty(per_block * width, dtype=wd, device=q.device)
    for (name, xk, yk, xw, yw, pen, mask), lse in zip(blocks, lses):
        n_cols = yk.shape[0]
        for r0 in range(0, row_count, per_block):
            n = min(per_block, row_count - r0)
            g = workspace[: n * n_cols].view(n, n_cols)
            grid = (triton.cdiv(n, cfg["BM"]), triton.cdiv(n_cols, cfg["BN"]))
            softmax_grad_kernel[grid](xk, yk, lse[r0:], g, row_start + r0, n, n_cols, xk.shape[1], xk.stride(0),
                                      yk.stride(0), g.stride(0), bq, scale, alpha, weight,
                                      scale * inv_rows if name == "qd" else 0.0, PEN_MODE=pen, MASK_MODE=mask,
                                      ACC=acc, PREC=prec, **cfg)
            xr = slice(row_start + r0, row_start + r0 + n)
            grads[id(xw)][xr] += g @ yw
            grads[id(yw)] += g.T @ xw[xr]
    if cosine:
        dq = normalize_rows_backward(qw, q_norm, dq)
        da = normalize_rows_backward(aw, a_norm, da)
    return loss, dq.to(out_dtype), da.to(out_dtype)


_lib = torch.library.Library("embedloss_triton", "DEF")
_lib.define("infonce" + INFONCE_SCHEMA)
_lib.define("cosent" + COSENT_SCHEMA)
for _key in ("CUDA", "CPU"):  # CPU only runs when why_not allows it (TRITON_INTERPRET=1)
    torch.library.impl("embedloss_triton::infonce", _key, lib=_lib)(infonce_forward)
    torch.library.impl("embedloss_triton::cosent", _key, lib=_lib)(cosent_forward)


def _loss_and_grads_fake(first: Tensor, second: Tensor, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    loss = first.new_empty((), dtype=work_dtype(first.dtype))
    if not compute_grad:
        return loss, first.new_empty((0,)), first.new_empty((0,))
    return loss, torch.empty_like(first), torch.empty_like(second)


@torch.library.register_fake("embedloss_triton::infonce", lib=_lib)
def _infonce_fake(q, a, row_start, row_count, scale, cosine, directions, joint, hardness_mode, hardness_strength,
                  compute_grad, block_rows):
    return _loss_and_grads_fake(q, a, compute_grad)


@torch.library.register_fake("embedloss_triton::cosent", lib=_lib)
def _cosent_fake(x, y, labels, scale, similarity, compute_grad):
    return _loss_and_grads_fake(x, y, compute_grad)


torch.library.register_autograd("embedloss_triton::infonce", backward_scaled_grads, setup_context=setup_saved_grads,
                                lib=_lib)
torch.library.register_autograd("embedloss_triton::cosent", backward_scaled_grads, setup_context=setup_saved_grads,
                                lib=_lib)

infonce = torch.ops.embedloss_triton.infonce
cosent = torch.ops.embedloss_triton.cosent
