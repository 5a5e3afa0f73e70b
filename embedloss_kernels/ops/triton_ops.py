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
    SIM_ANGLE,
    SIM_COSINE,
)
from .torch_ops import (
    _swap_halves,
    backward_scaled_grads,
    block_budget_bytes,
    cosent_forward,
    normalize_rows,
    normalize_rows_backward,
    register_fakes,
    setup_saved_grads,
    work_dtype,
)

SUPPORTED_TRITON = ((3, 6), (3, 9))
_PEN_MODE = {HARDNESS_NONE: 0, HARDNESS_IN_BATCH: 1, HARDNESS_HARD: 2, HARDNESS_ALL: 3}
MASK_NONE, MASK_SELF, MASK_OWN_DOCS = 0, 1, 2

try:
    import triton
    import triton.language as tl

    from ..triton.cosent_kernels import pair_grad_kernel, pair_lse_kernel
    from ..triton.infonce_kernels import flash_dx_kernel, flash_dy_kernel, row_lse_kernel, softmax_grad_kernel

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
        if _interpreted():
            return None
        return "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    return f"the triton backend runs on cuda (or cpu through the interpreter), not {device.type}"


def tile_config(n_dim: int, dtype: torch.dtype, interpreted: bool | None = None) -> dict:
    """Tile shape of the LSE / workspace kernels; D is walked in BK chunks (tl.dot needs >= 16).

    Sized by ``python -m embedloss_kernels.compile_check`` (registers and spills per target): 16-bit inputs take
    64x64 tiles, BK up to 64, 8 warps; fp32 / fp64 (tf32 or plain FMA dots, twice the register bytes per element)
    take 16x32 tiles with BK up to 32 and 4 warps, fp64 16x16 with BK 16 (larger ones spilled on sm_80 or sm_90).
    """
    half = dtype in (torch.float16, torch.bfloat16)
    bk = 16 if (n_dim <= 16 or dtype == torch.float64) else 32 if (n_dim <= 32 or not half) else 64
    if interpreted if interpreted is not None else _interpreted():
        return {"BM": 16, "BN": 16, "BK": bk}  # small tiles: the interpreter is slow, odd shapes cross tiles
    if half:
        return {"BM": 64, "BN": 64, "BK": bk, "num_warps": 8}
    return {"BM": 16, "BN": 16 if dtype == torch.float64 else 32, "BK": bk, "num_warps": 4}


FLASH_MAX_DIM = 64
COSENT_TILED_MAX_BATCH = 2048


def _forced(var: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(var, "auto").strip().lower() or "auto"
    if value not in ("auto",) + choices:
        raise ValueError(f"{var} must be one of {('auto',) + choices}, got {value!r}")
    return value


def infonce_strategy(n_dim: int, dtype: torch.dtype) -> str:
    """``"flash"`` or ``"workspace"`` for the gradient pass (``EMBEDLOSS_TRITON_STRATEGY`` forces one).

    Flash recomputes each logit tile twice more (row-parallel dX, column-parallel dY) but writes nothing B x N;
    the workspace recomputes it once and moves ``rows x N`` fp32 through HBM three times (store G, read it in
    ``G Y`` and ``G^T X``). A logit costs 2 D flops against 12 bytes of workspace traffic, so at small D the
    recompute is the cheaper side (an H100 does ~60 fp32-tensor-core flops per HBM byte); and the (BM, D) fp32
    accumulator of a row block must fit in registers: compile_check shows D = 128 spilling on sm_80, D <= 64
    clean. Past that, cuBLAS on the workspace wins.
    """
    forced = _forced("EMBEDLOSS_TRITON_STRATEGY", ("flash", "workspace"))
    if forced != "auto":
        return forced
    return "flash" if n_dim <= flash_max_dim(dtype) else "workspace"


def flash_max_dim(dtype: torch.dtype) -> int:
    """Largest D the flash kernels take: 64 on tensor cores (16-bit, tf32); plain fp32 / fp64 FMA dots hold twice
    the registers per element and spill past 32 (compile_check)."""
    if dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and _precision(dtype) == "tf32"):
        return FLASH_MAX_DIM
    return 32


def flash_config(n_dim: int, dtype: torch.dtype, interpreted: bool | None = None,
                 precision: str | None = None) -> dict:
    """Flash tiles: BK spans all of D (the dX / dY accumulators hold whole rows): 64x64 tiles with 8 warps for
    16-bit inputs, 16x32 with 4 warps for tf32, 16x16 for plain-FMA fp32 ("ieee") and fp64 (16x32 spilled in the
    column-parallel dY kernel on sm_90 once the own-docs test was in the tile; compile_check)."""
    bk = max(16, triton.next_power_of_2(n_dim))
    if interpreted if interpreted is not None else _interpreted():
        return {"BM": 16, "BN": 16, "BK": bk}
    if dtype in (torch.float16, torch.bfloat16):
        return {"BM": 64, "BN": 64, "BK": bk, "num_warps": 8}
    fma = dtype == torch.float64 or (precision or _precision(dtype)) == "ieee"
    return {"BM": 16, "BN": 16 if fma else 32, "BK": bk, "num_warps": 4}


def cosent_strategy(batch: int) -> str:
    """``"tiled"`` (two pairwise kernels, O(B^2) work in 2 launches) or ``"sorted"`` (torch sort + logcumsumexp,
    O(B log B) in ~15 launches); ``EMBEDLOSS_TRITON_COSENT`` forces one. A pair costs a handful of flops, so the
    tiled kernels clear B = 2048 (4M pairs) in a few microseconds, below the sorted path's launch overhead;
    beyond that the quadratic work takes over and the sorted path is the faster one."""
    forced = _forced("EMBEDLOSS_TRITON_COSENT", ("tiled", "sorted"))
    if forced != "auto":
        return forced
    return "tiled" if batch <= COSENT_TILED_MAX_BATCH else "sorted"


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and _interpreted():
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_lse(x, y, row_start, row_count, owner, scale, boost, pen, mask, cfg, acc, prec, wd):
    m = torch.empty(row_count, dtype=wd, device=x.device)
    s = torch.empty_like(m)
    p = torch.empty_like(m)
    grid = (triton.cdiv(row_count, cfg["BM"]),)
    row_lse_kernel[grid](x, y, m, s, p, row_start, row_count, y.shape[0], x.shape[1], x.stride(0), y.stride(0),
                         owner, scale, boost, PEN_MODE=pen, MASK_MODE=mask, ACC=acc, PREC=prec, **cfg)
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

    owner = torch.arange(ak.shape[0], device=q.device, dtype=torch.int32) % bq  # column -> its query (int32)
    stats = [_block_lse(xk, yk, row_start, row_count, owner, scale, alpha, pen, mask, cfg, acc, prec, wd)
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
    if infonce_strategy(q.shape[1], q.dtype) == "flash":
        fcfg = flash_config(q.shape[1], q.dtype)
        for (name, xk, yk, xw, yw, pen, mask), lse in zip(blocks, lses):
            n_cols = yk.shape[0]
            dx = torch.empty(row_count, xk.shape[1], dtype=wd, device=q.device)
            dy = torch.empty(n_cols, xk.shape[1], dtype=wd, device=q.device)
            common = (row_start, row_count, n_cols, xk.shape[1], xk.stride(0), yk.stride(0))
            consts = (owner, scale, alpha, weight, scale * inv_rows if name == "qd" else 0.0)
            meta = dict(PEN_MODE=pen, MASK_MODE=mask, ACC=acc, PREC=prec, **fcfg)
            flash_dx_kernel[(triton.cdiv(row_count, fcfg["BM"]),)](xk, yk, lse, dx, *common, dx.stride(0), *consts,
                                                                     **meta)
            flash_dy_kernel[(triton.cdiv(n_cols, fcfg["BN"]),)](xk, yk, lse, dy, *common, dy.stride(0), *consts,
                                                                  **meta)
            grads[id(xw)][row_start : row_start + row_count] += dx
            grads[id(yw)] += dy
    else:
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
                                          yk.stride(0), g.stride(0), owner, scale, alpha, weight,
                                          scale * inv_rows if name == "qd" else 0.0, PEN_MODE=pen, MASK_MODE=mask,
                                          ACC=acc, PREC=prec, **cfg)
                xr = slice(row_start + r0, row_start + r0 + n)
                grads[id(xw)][xr] += g @ yw
                grads[id(yw)] += g.T @ xw[xr]
    if cosine:
        dq = normalize_rows_backward(qw, q_norm, dq)
        da = normalize_rows_backward(aw, a_norm, da)
    return loss, dq.to(out_dtype), da.to(out_dtype)


def _pair_similarity(x: Tensor, y: Tensor, similarity: int):
    """(t-free) pairwise similarity, and a function mapping d loss / d sim back to (d x, d y)."""
    d = x.shape[1]
    if similarity == SIM_ANGLE and d % 2:
        x, y = torch.nn.functional.pad(x, (0, 1)), torch.nn.functional.pad(y, (0, 1))
    if similarity in (SIM_COSINE, SIM_ANGLE):
        x, x_norm = normalize_rows(x)
        y, y_norm = normalize_rows(y)
    if similarity == SIM_ANGLE:
        y_rot = y + _swap_halves(y, -1.0)
        z = (x * y_rot).sum(1)  # cos + sin
        sim = z.abs()
    else:
        sim = (x * y).sum(1)

    def backward(dsim: Tensor) -> tuple[Tensor, Tensor]:
        if similarity == SIM_ANGLE:
            dz = (dsim * z.sign())[:, None]
            dx, dy = dz * y_rot, dz * (x + _swap_halves(x, 1.0))
        else:
            dx, dy = dsim[:, None] * y, dsim[:, None] * x
        if similarity in (SIM_COSINE, SIM_ANGLE):
            dx = normalize_rows_backward(x, x_norm, dx)[:, :d]
            dy = normalize_rows_backward(y, y_norm, dy)[:, :d]
        return dx, dy

    return sim, backward


def pair_block(dtype: torch.dtype) -> int:
    """Pairwise tile edge: 64 (fp32 t), 32 for fp64 (64x64 fp64 tiles spill, compile_check)."""
    return 32 if dtype == torch.float64 else 64


def cosent_tiled(x: Tensor, y: Tensor, labels: Tensor, scale: float, similarity: int, compute_grad: bool):
    """CoSENT through the pairwise kernels: per-row LSE over lower-labelled pairs, then d loss / d t per row."""
    wd = work_dtype(x.dtype)
    sim, backward = _pair_similarity(x.to(wd), y.to(wd), similarity)
    t = (sim * scale).contiguous()
    lab = labels.to(device=x.device, dtype=torch.float64).contiguous()
    n = t.shape[0]
    acc = _acc(x.dtype)
    bm = 16 if _interpreted() else pair_block(x.dtype)
    m = torch.empty_like(t)
    s = torch.empty_like(t)
    pair_lse_kernel[(triton.cdiv(n, bm),)](t, lab, m, s, n, BM=bm, BN=bm, ACC=acc)
    # log(1 + sum_i s_i e^{m_i}): rows without a lower-labelled pair have m = -inf and drop out.
    loss = torch.logsumexp(torch.cat([t.new_zeros(1), m + s.log()]), 0)
    if not compute_grad:
        empty = x.new_empty((0,))
        return loss, empty, empty
    dt = torch.empty_like(t)
    pair_grad_kernel[(triton.cdiv(n, bm),)](t, lab, loss.reshape(1), dt, n, BM=bm, BN=bm, ACC=acc)
    dx, dy = backward(dt * scale)
    return loss, dx.to(x.dtype), dy.to(x.dtype)


def cosent_dispatch(x: Tensor, y: Tensor, labels: Tensor, scale: float, similarity: int, compute_grad: bool):
    if cosent_strategy(x.shape[0]) == "tiled":
        return cosent_tiled(x, y, labels, scale, similarity, compute_grad)
    return cosent_forward(x, y, labels, scale, similarity, compute_grad)


_lib = torch.library.Library("embedloss_triton", "DEF")
_lib.define("infonce" + INFONCE_SCHEMA)
_lib.define("cosent" + COSENT_SCHEMA)
for _key in ("CUDA", "CPU"):  # CPU only runs when why_not allows it (TRITON_INTERPRET=1)
    torch.library.impl("embedloss_triton::infonce", _key, lib=_lib)(infonce_forward)
    torch.library.impl("embedloss_triton::cosent", _key, lib=_lib)(cosent_dispatch)


register_fakes("embedloss_triton", _lib)
torch.library.register_autograd("embedloss_triton::infonce", backward_scaled_grads, setup_context=setup_saved_grads,
                                lib=_lib)
torch.library.register_autograd("embedloss_triton::cosent", backward_scaled_grads, setup_context=setup_saved_grads,
                                lib=_lib)

infonce = torch.ops.embedloss_triton.infonce
cosent = torch.ops.embedloss_triton.cosent
