"""The ``triton`` backend: InfoNCE logit blocks in fused Triton kernels (``embedloss_kernels/triton``), CoSENT by
the O(B log B) sorted path; ops ``embedloss_triton::infonce`` / ``embedloss_triton::cosent`` for CUDA, and for CPU
tensors through the Triton interpreter when ``TRITON_INTERPRET=1``.

Strategies for the gradient (:func:`infonce_strategy` picks one per shape; ``EMBEDLOSS_TRITON_STRATEGY`` forces one):

* ``fused`` (gradient in the forward pass, docs/DESIGN.md): per row block, ``S = X_g Y^T`` once by cuBLAS (fp32 out),
  one Triton row pass (:func:`row_pass_kernel`: exact LSE, scale, masks, hardness, ``G~`` written in place over S
  in the input dtype), then ``G~ Y`` and ``G~^T X`` on tensor cores: three matmul-equivalents.
* ``workspace``: :func:`row_lse_kernel` streams the column tiles for the row LSE, :func:`softmax_grad_kernel`
  recomputes a row block's tiles into a 16-bit ``G~`` workspace, then the same two products (four).
* ``flash`` (small D): the LSE pass, then :func:`flash_dx_kernel` / :func:`flash_dy_kernel` accumulate the products
  on chip from recomputed tiles; nothing of size rows x columns is stored.

Without gradients only the LSE pass runs. Inputs are read raw; cosine normalization is two inverse-norm vectors
(``_blocked``), gradient products accumulate in fp32 through ``_blocked.BlockGrads``.
"""

from __future__ import annotations

import os
from contextlib import nullcontext as _nullcontext

import torch
from torch import Tensor

from .._versions import TRITON_RANGE, as_text, major_minor
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
    _blocked,
)
from .torch_ops import (
    backward_scaled_grads,
    cosent_forward,
    no_grads,
    pair_similarity,
    register_fakes,
    setup_saved_grads,
    work_dtype,
)

SUPPORTED_TRITON = TRITON_RANGE
_PEN_MODE = {HARDNESS_NONE: 0, HARDNESS_IN_BATCH: 1, HARDNESS_HARD: 2, HARDNESS_ALL: 3}
MASK_NONE, MASK_SELF, MASK_OWN_DOCS = 0, 1, 2

try:
    import triton
    import triton.language as tl

    from ..triton.cosent_kernels import pair_grad_kernel, pair_lse_kernel
    from ..triton.infonce_kernels import (
        LOG2E,
        flash_dx_kernel,
        flash_dy_kernel,
        row_lse_kernel,
        row_pass_kernel,
        softmax_grad_kernel,
    )

    _IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - any failure leaves the backend unavailable, with the reason
    triton = None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not(device: torch.device) -> str | None:
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    version = major_minor(triton.__version__)
    if not SUPPORTED_TRITON[0] <= version <= SUPPORTED_TRITON[1]:
        low, high = map(as_text, SUPPORTED_TRITON)
        return f"triton {triton.__version__} is outside the supported {low}-{high}"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    if device.type == "cpu":
        if _interpreted():
            return None
        return "set TRITON_INTERPRET=1 to run the Triton kernels on CPU through the interpreter"
    return f"the triton backend runs on cuda (or cpu through the interpreter), not {device.type}"


# ----------------------------------------------------------------------------------------------------------------
# Tile configurations: a small set per (kernel, D, dtype, arch), autotuned on the GPU at first use
# ----------------------------------------------------------------------------------------------------------------
def _arch(device: torch.device | None) -> int:
    """90 on Hopper and newer, 80 otherwise (the two targets compile_check covers)."""
    if device is None or device.type != "cuda":
        return 90
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _bk(n_dim: int, dtype: torch.dtype) -> int:
    half = dtype in (torch.float16, torch.bfloat16)
    return 16 if (n_dim <= 16 or dtype == torch.float64) else 32 if (n_dim <= 32 or not half) else 64


def tile_configs(n_dim: int, dtype: torch.dtype, arch: int = 90, interpreted: bool | None = None) -> list[dict]:
    """Candidate tiles of the LSE / workspace kernels (D is walked in BK chunks; tl.dot needs >= 16), best guess
    first; every one compiles without spills on its arch (``python -m embedloss_kernels.compile_check``).

    16-bit inputs: 64x64 tiles with BK up to 64, 8 warps, 3 stages of K prefetch; Hopper also tries 128x64 (it
    spilled on sm_80; 128x128 spilled on sm_90: a 128x128 fp32 tile of logits with its masks and exp).
    fp32 / fp64 (tf32 or plain FMA dots, twice the register bytes per element): 16x16 tiles, BK up to 32, 4 warps,
    fp64 without K prefetch (16x32, 32x32 or 3 fp64 stages spilled on sm_80 or sm_90 under one triton or another).
    """
    bk = _bk(n_dim, dtype)
    if interpreted if interpreted is not None else _interpreted():
        return [{"BM": 16, "BN": 16, "BK": bk}]  # small tiles: the interpreter is slow, odd shapes cross tiles
    if dtype in (torch.float16, torch.bfloat16):
        cands = [{"BM": 64, "BN": 64, "BK": bk, "num_warps": 8, "num_stages": 3}]
        if arch >= 90:  # 128x64 spilled on sm_80 (row_lse, BK 64), 128x128 on sm_90 (compile_check)
            cands.append({"BM": 128, "BN": 64, "BK": bk, "num_warps": 8, "num_stages": 3})
        return cands
    # ptxas's spills move with its version: 16x32 fp32 spilled 12 B on sm_90 under triton 3.6 (tf32, BK 32), fp64 with
    # 3 stages 12 B on sm_80 (masked); these are clean under triton 3.6 and 3.9 alike.
    if dtype == torch.float64:
        return [{"BM": 16, "BN": 16, "BK": bk, "num_warps": 4, "num_stages": 1}]
    return [{"BM": 16, "BN": 16, "BK": bk, "num_warps": 4, "num_stages": 3}]


def tile_config(n_dim: int, dtype: torch.dtype, interpreted: bool | None = None) -> dict:
    """The first (untuned) candidate of :func:`tile_configs` on Hopper."""
    return tile_configs(n_dim, dtype, 90, interpreted)[0]


def row_pass_config(dtype: torch.dtype, interpreted: bool | None = None) -> dict:
    """The fused row pass is a stream over S (memory-bound): a few rows per program, wide column tiles (16-byte
    loads per thread), 4 warps; fp64 halves the tile. No autotuning: the pass rewrites S in place."""
    if interpreted if interpreted is not None else _interpreted():
        return {"BM": 2, "BN": 16}
    if dtype == torch.float64:
        return {"BM": 2, "BN": 256, "num_warps": 4}
    return {"BM": 2, "BN": 512, "num_warps": 4}  # 4 x 512 spilled on sm_90 with the hardness masks


FLASH_MAX_DIM = 64
COSENT_TILED_MAX_BATCH = 2048
GROUP_ROWS = 8  # softmax_grad_kernel's grouped launch order: row tiles that sweep the column tiles together


def _forced(var: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(var, "auto").strip().lower() or "auto"
    if value not in ("auto",) + choices:
        raise ValueError(f"{var} must be one of {('auto',) + choices}, got {value!r}")
    return value


STRATEGIES = ("flash", "fused", "workspace")


def infonce_strategy(n_dim: int, dtype: torch.dtype) -> str:
    """The gradient strategy (``EMBEDLOSS_TRITON_STRATEGY`` forces one of :data:`STRATEGIES`).

    Per logit, with an H100's ~800 TFLOP/s (bf16, cuBLAS; assume ~60% of it for our Triton tiles) and ~3 TB/s HBM
    (benchmarks/RESULTS.md has the full arithmetic):

    * ``fused`` (DESIGN.md's gradient in the forward pass): S once per row block by cuBLAS into fp32, one row pass
      (read S twice, write 16-bit G~ in place: ~10 bytes), two cuBLAS products: 6 D flops at cuBLAS speed + ~10-14
      bytes of HBM, ~(7.5e-3 D + 3.3..4.7) ps;
    * ``workspace`` (two Triton passes over S, then the products): 4 D flops in Triton + 2 D in cuBLAS + 6 bytes of
      16-bit G~, ~(1.1e-2 D + 2) ps;
    * ``flash`` (no workspace; S recomputed in the dX and dY kernels): 8 D flops in Triton, no HBM per logit,
      ~1.7e-2 D ps; its (BM, D) fp32 accumulator must stay in registers (D <= 64, compile_check).

    flash wins below D ~ 500 where it compiles (D <= 64); above, fused beats workspace at every D. Estimates, not
    measurements: the GPU check (benchmarks/gpu_check.sh) times all three.
    """
    forced = _forced("EMBEDLOSS_TRITON_STRATEGY", STRATEGIES)
    if forced != "auto":
        return forced
    return "flash" if n_dim <= flash_max_dim(dtype) else "fused"


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
    # fp32 in 2 stages: 3 spilled 24 B in the penalized dX kernel on sm_90 under triton 3.6 (plain FMA), while fp64
    # in 2 stages spilled on sm_80 there (ptxas's spills move with its version; compile_check runs both)
    stages = 2 if dtype == torch.float32 else 3
    return {"BM": 16, "BN": 16 if fma else 32, "BK": bk, "num_warps": 4, "num_stages": stages}


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


_TUNED: dict = {}


def _autotune() -> bool:
    return os.environ.get("EMBEDLOSS_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no", "")


def _launch(kernel, grid, args: tuple, meta: dict, configs: list[dict], key: tuple) -> None:
    """Launch ``kernel`` with the best of ``configs`` for ``key`` = (kernel, D, dtype, arch, modes): timed once per
    key with ``triton.testing.do_bench`` on the GPU (every kernel launched here only writes its outputs, so the
    trial runs are harmless); the first config where there is one, under the interpreter, or with
    ``EMBEDLOSS_TRITON_AUTOTUNE=0``."""
    if len(configs) == 1 or _interpreted() or not _autotune():
        best = configs[0]
    elif key in _TUNED:
        best = _TUNED[key]
    else:
        def run(cfg):
            return lambda: kernel[grid(cfg)](*args, **meta, **cfg)

        times = [triton.testing.do_bench(run(cfg), warmup=5, rep=20) for cfg in configs]
        best = _TUNED[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    kernel[grid(best)](*args, **meta, **best)


def _combine(stats: list[tuple[Tensor, Tensor, Tensor]], joint: bool,
             exp2: bool) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Per-direction (max, sum, positive) of every row -> the (max, sum) each direction's softmax uses, and each
    row's loss ``mean LSE - positive``, all in the kernels' units (base 2 with ``exp2``; the caller converts the
    loss). No LSE is handed on: the gradient kernels form ``exp(L - max) / sum`` from the same logits the max was
    taken over (a lone column: exactly 1), and the loss adds ``log(sum)`` to ``max - positive`` (exact where the
    positive is the max), so neither is rounded at the max's magnitude."""
    exp, log = (torch.exp2, torch.log2) if exp2 else (torch.exp, torch.log)
    pos = stats[0][2]
    if joint:
        row_max = torch.stack([m for m, _, _ in stats]).amax(0)
        total = sum(s * exp(m - row_max) for m, s, _ in stats)
        return [(row_max, total)] * len(stats), (row_max - pos) + log(total)
    return [(m, s) for m, s, _ in stats], sum((m - pos) + log(s) for m, s, _ in stats) / len(stats)


def _onehot(name: str, blocks: list, dir_w: float) -> float:
    """The weight of the one-hot (column ``g``, the positive) in a direction block's ``G~``. Joint: all of it in
    query_to_doc. per_direction: doc_to_query's column ``g`` is the same pair (``a_g . q_g`` at the plain scale) as
    query_to_doc's positive, so each of the two takes its direction's share: a lone column's ``w * softmax - onehot``
    is then exactly 0 in each block, where ``w - 1`` and ``w`` cancelled only after the gradient products (their
    fused accumulation left ~1e-8 * scale). query_to_query and doc_to_doc mask column ``g``. ``dir_w``: each
    direction's weight (1 when joint)."""
    split = dir_w < 1.0 and any(b[0] == "dq" for b in blocks)
    if name == "qd":
        return 1.0 - dir_w if split else 1.0
    return dir_w if split and name == "dq" else 0.0


def _with_float64(scalars: tuple, *more: float) -> tuple:
    """``(owner, floats..., the same floats again)``: the kernels' plain float parameters (fp32 once compiled, used
    by fp32 / 16-bit kernels) and their ``tl.float64`` twins (used by float64 kernels: a Python float alone would
    reach them as fp32)."""
    owner, *floats = (*scalars, *more)
    return (owner, *floats, *floats)


def infonce_forward(q: Tensor, a: Tensor, row_start: int, row_count: int, scale: float, cosine: bool,
                    directions: int, joint: bool, hardness_mode: int, hardness_strength: float, compute_grad: bool,
                    block_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and gradients; the inputs are read raw (inverse norms as vectors), gradients accumulate through
    :class:`~embedloss_kernels.ops._blocked.BlockGrads` (16-bit ``G~``, fp32 accumulators)."""
    q, a = q.contiguous(), a.contiguous()
    dtype, wd, bq, n_dim = q.dtype, _blocked.acc_dtype(q.dtype), q.shape[0], q.shape[1]
    rq, ra = _blocked.inv_norms(q, cosine), _blocked.inv_norms(a, cosine)
    q, a, rq, ra, cq, ca = _blocked.shorten_long_rows(q, a, rq, ra, cosine)
    acc, prec, arch = _acc(dtype), _precision(dtype), _arch(q.device)
    exp2 = dtype != torch.float64  # fp64 keeps exp: its scale must not pass through an fp32 log2(e) product
    unit = LOG2E if exp2 else 1.0
    alpha = float(hardness_strength) if hardness_mode != HARDNESS_NONE else 0.0
    # (name, X rows, Y columns, their inverse norms, penalty, mask): X rows are the anchors' queries or positives.
    blocks = [("qd", q, a, rq, ra, _PEN_MODE[hardness_mode] if alpha else 0, MASK_NONE)]
    if directions & QUERY_TO_QUERY:
        blocks.append(("qq", q, q, rq, rq, 0, MASK_SELF))
    if directions & DOC_TO_QUERY:
        blocks.append(("dq", a, q, ra, rq, 0, MASK_NONE))
    if directions & DOC_TO_DOC:
        blocks.append(("dd", a, a, ra, ra, 0, MASK_OWN_DOCS))
    owner = torch.arange(a.shape[0], device=q.device, dtype=torch.int32) % bq  # column -> its query (int32)
    dir_w = 1.0 if joint else 1.0 / len(blocks)
    scalars = (owner, scale * unit, alpha * unit)
    strategy = infonce_strategy(n_dim, dtype)
    grads = _blocked.BlockGrads(q, a, rq, ra, directions, cosine, scale / row_count) if compute_grad else None
    if compute_grad and strategy == "fused":
        stats = _fused(blocks, grads, row_start, row_count, scalars, joint, exp2, block_rows)
        softmax, row_loss = _combine(stats, joint, exp2)
    else:
        stats = []
        for _, x, y, rx, ry, pen, mask in blocks:
            m, s, p = (torch.empty(row_count, dtype=wd, device=q.device) for _ in range(3))
            meta = dict(PEN_MODE=pen, MASK_MODE=mask, ACC=acc, PREC=prec, EXP2=exp2)
            args = (x, y, rx, ry, m, s, p, row_start, row_count, y.shape[0], n_dim, x.stride(0), y.stride(0),
                    *_with_float64(scalars))
            _launch(row_lse_kernel, lambda c: (triton.cdiv(row_count, c["BM"]),), args, meta,
                    tile_configs(n_dim, dtype, arch), ("lse", n_dim, dtype, arch, pen, mask))
            stats.append((m, s, p))
        softmax, row_loss = _combine(stats, joint, exp2)
    # the positive: the query_to_doc block's diagonal logit, always at the plain scale; back to natural units last
    loss = row_loss.mean() / unit
    if not compute_grad:
        return no_grads(loss, q)
    if strategy == "flash":
        _flash(blocks, softmax, grads, row_start, row_count, scalars, dir_w, exp2)
    elif strategy == "workspace":
        _workspace(blocks, softmax, grads, row_start, row_count, scalars, dir_w, exp2, block_rows)
    dq, da = grads.finish()
    return loss, _blocked.unshorten(dq, cq), _blocked.unshorten(da, ca), grads.scale_grad(scale)


def _flash(blocks, softmax, grads, row_start, row_count, scalars, dir_w, exp2) -> None:
    """dX and dY of each direction block accumulated on chip (fp32, already in v units)."""
    q = blocks[0][1]
    cfg = flash_config(q.shape[1], q.dtype)
    meta = dict(ACC=_acc(q.dtype), PREC=_precision(q.dtype), EXP2=exp2, **cfg)
    wd = _blocked.acc_dtype(q.dtype)
    for (name, x, y, rx, ry, pen, mask), (smax, ssum) in zip(blocks, softmax):
        n_cols, n_dim = y.shape
        wsum = dir_w / ssum  # the kernels take weight / sum per row
        dx = torch.empty(row_count, n_dim, dtype=wd, device=q.device)
        dy = torch.empty(n_cols, n_dim, dtype=wd, device=q.device)
        common = (row_start, row_count, n_cols, n_dim, x.stride(0), y.stride(0))
        consts = _with_float64(scalars, dir_w, _onehot(name, blocks, dir_w))
        flash_dx_kernel[(triton.cdiv(row_count, cfg["BM"]),)](x, y, rx, ry, smax, wsum, dx, *common, dx.stride(0),
                                                                *consts, PEN_MODE=pen, MASK_MODE=mask, **meta)
        flash_dy_kernel[(triton.cdiv(n_cols, cfg["BN"]),)](x, y, rx, ry, smax, wsum, dy, *common, dy.stride(0),
                                                             *consts, PEN_MODE=pen, MASK_MODE=mask, **meta)
        grads.add_products(name, row_start, row_start + row_count, dx, dy)


def _workspace(blocks, softmax, grads, row_start, row_count, scalars, dir_w, exp2, block_rows) -> None:
    """Two-pass strategy: softmax_grad_kernel recomputes S tile by tile into a 16-bit G~ workspace of one row
    block, then two cuBLAS products."""
    q = blocks[0][1]
    n_dim, dtype, arch = q.shape[1], q.dtype, _arch(q.device)
    width = max(y.shape[0] for _, _, y, *_ in blocks)
    per_block = block_rows if block_rows > 0 else _blocked.block_rows(row_count, width, q.element_size(), q.device)
    per_block = min(per_block, row_count)
    workspace = torch.empty(per_block * width, dtype=dtype, device=q.device)
    meta_common = dict(ACC=_acc(dtype), PREC=_precision(dtype), EXP2=exp2, GROUP=GROUP_ROWS)
    for (name, x, y, rx, ry, pen, mask), (smax, ssum) in zip(blocks, softmax):
        n_cols = y.shape[0]
        wsum = dir_w / ssum  # the kernels take weight / sum per row
        for r0 in range(0, row_count, per_block):
            n = min(per_block, row_count - r0)
            g = workspace[: n * n_cols].view(n, n_cols)
            args = (x, y, rx, ry, smax[r0:], wsum[r0:], g, row_start + r0, n, n_cols, n_dim, x.stride(0), y.stride(0),
                    g.stride(0), *_with_float64(scalars, dir_w, _onehot(name, blocks, dir_w)))

            def grid(c, n=n, n_cols=n_cols):
                return (triton.cdiv(n, c["BM"]) * triton.cdiv(n_cols, c["BN"]),)

            _launch(softmax_grad_kernel, grid, args, dict(PEN_MODE=pen, MASK_MODE=mask, **meta_common),
                    tile_configs(n_dim, dtype, arch), ("grad", n_dim, dtype, arch, pen, mask))
            grads.add(name, row_start + r0, row_start + r0 + n, g)


def _row_pass(block, view, softmax, stats, mode, row0, n, scalars, dir_w, exp2, cfg, grid, onehot) -> None:
    name, _, _, rx, ry, pen, mask = block
    sv, gv = view
    m, s, p = stats
    row_pass_kernel[grid](sv, gv, rx, ry, *softmax, m, s, p, row0, n, sv.shape[1], sv.stride(0), gv.stride(0),
                          *_with_float64(scalars, dir_w, onehot), PEN_MODE=pen, MASK_MODE=mask,
                          MODE=mode, EXP2=exp2, **cfg)


def fused_streams(device: torch.device) -> int:
    """Streams of the fused strategy (``EMBEDLOSS_TRITON_STREAMS``, default 2 on CUDA): with 2, the S product and
    row pass of block k+1 (memory-bound) run on a side stream while the gradient products of block k (compute-bound)
    run on the current one, each block with its own half of the logits budget; 1 runs them one after another."""
    raw = os.environ.get("EMBEDLOSS_TRITON_STREAMS", "").strip() or "2"
    if raw not in ("1", "2"):
        raise ValueError(f"EMBEDLOSS_TRITON_STREAMS must be 1 or 2, got {raw!r}")
    return int(raw) if device.type == "cuda" else 1


def _fused(blocks, grads, row_start, row_count, scalars, joint, exp2, block_rows) -> list:
    """Gradient in the forward pass: per row block, S of every direction once (cuBLAS, fp32 out), the row pass
    (MODE 0 alone; statistics, joint LSE, then G~ with several directions), G~ in place, then the products.
    Returns each direction's (max, sum, positive) per row for the loss.

    With two streams (:func:`fused_streams`), blocks alternate between two buffers: the side stream fills buffer
    ``k % 2`` once the products of block k - 2 have read it (event ``free``), the current stream runs block k's
    products once its G~ is written (event ``ready``)."""
    q = blocks[0][1]
    dtype, wd = q.dtype, _blocked.acc_dtype(q.dtype)
    widths = [y.shape[0] for _, _, y, *_ in blocks]
    n_streams = fused_streams(q.device)
    per_logit = n_streams * torch.finfo(wd).bits // 8  # G~ overwrites S; one buffer per stream
    per_block = block_rows if block_rows > 0 else _blocked.block_rows(row_count, sum(widths), per_logit, q.device)
    per_block = min(per_block, row_count)
    n_bufs = n_streams if per_block < row_count else 1
    bufs = [torch.empty(per_block * sum(widths), dtype=wd, device=q.device) for _ in range(n_bufs)]
    stats = [tuple(torch.empty(row_count, dtype=wd, device=q.device) for _ in range(3)) for _ in blocks]
    unused = torch.empty(row_count, dtype=wd, device=q.device)  # the (max, sum) pointers of MODE 0 and 1
    cfg = row_pass_config(dtype)
    dir_w = 1.0 if joint else 1.0 / len(blocks)
    main = side = None
    if n_bufs > 1:
        main, side = torch.cuda.current_stream(q.device), torch.cuda.Stream(q.device)
        side.wait_stream(main)  # inputs, norms and accumulators were made on the current stream
        ready = [torch.cuda.Event() for _ in range(n_bufs)]
        free = [torch.cuda.Event() for _ in range(n_bufs)]
    for k, r0 in enumerate(range(0, row_count, per_block)):
        n = min(per_block, row_count - r0)
        rows = slice(row_start + r0, row_start + r0 + n)
        buf = bufs[k % n_bufs]
        with torch.cuda.stream(side) if side is not None else _nullcontext():
            if side is not None:
                side.wait_event(free[k % n_bufs])  # the products of block k - 2 have read this buffer
            views, off = [], 0
            for (_, x, y, *_), width in zip(blocks, widths):
                sv = buf[off : off + n * width].view(n, width)
                _blocked.mm_acc(x[rows], y.T, out=sv)
                off += n * width
                views.append((sv, sv.view(dtype)[:, :width] if dtype != wd else sv))
            grid = (triton.cdiv(n, cfg["BM"]),)
            common = (row_start + r0, n, scalars, dir_w, exp2, cfg, grid)
            if len(blocks) == 1:
                _row_pass(blocks[0], views[0], (unused, unused), [t[r0:] for t in stats[0]], 0, *common, 1.0)
            else:
                for block, view, st in zip(blocks, views, stats):
                    _row_pass(block, view, (unused, unused), [t[r0:] for t in st], 1, *common, 0.0)  # statistics
                softmax, _ = _combine([tuple(t[r0 : r0 + n] for t in st) for st in stats], joint, exp2)
                for block, view, st, (smax, ssum) in zip(blocks, views, stats, softmax):
                    _row_pass(block, view, (smax.contiguous(), dir_w / ssum), [t[r0:] for t in st], 2, *common,
                              _onehot(block[0], blocks, dir_w))
            if side is not None:
                ready[k % n_bufs].record(side)
        if side is not None:
            main.wait_event(ready[k % n_bufs])
        for (name, *_), (_, gv) in zip(blocks, views):
            grads.add(name, rows.start, rows.stop, gv)
        if side is not None:
            free[k % n_bufs].record(main)
    if side is not None:
        main.wait_stream(side)  # the statistics of the last block
    return stats


def pair_block(dtype: torch.dtype) -> tuple[int, int]:
    """Pairwise tile (rows i, columns j): 64x32 for fp32 t, 32x32 for fp64 (compile_check). A 64x64 fp32 tile with
    4 warps needs 255 registers, the per-thread cap: triton 3.6's ptxas spilled it on sm_80 (3.9 just fit); 64x32
    takes about 113."""
    return (32, 32) if dtype == torch.float64 else (64, 32)


def cosent_tiled(x: Tensor, y: Tensor, labels: Tensor, scale: float, similarity: int, compute_grad: bool):
    """CoSENT through the pairwise kernels: per-row LSE over lower-labelled pairs, then d loss / d t per row."""
    wd = work_dtype(x.dtype)
    sim, backward = pair_similarity(x.to(wd), y.to(wd), similarity)
    t = (sim * scale).contiguous()
    lab = labels.to(device=x.device, dtype=torch.float64).contiguous()
    n = t.shape[0]
    acc = _acc(x.dtype)
    bm, bn = (16, 16) if _interpreted() else pair_block(x.dtype)
    m = torch.empty_like(t)
    s = torch.empty_like(t)
    pair_lse_kernel[(triton.cdiv(n, bm),)](t, lab, m, s, n, BM=bm, BN=bn, ACC=acc)
    # log(1 + sum_i s_i e^{m_i}): rows without a lower-labelled pair have m = -inf and drop out.
    loss = torch.logsumexp(torch.cat([t.new_zeros(1), m + s.log()]), 0)
    if not compute_grad:
        return no_grads(loss, x)
    dt = torch.empty_like(t)
    pair_grad_kernel[(triton.cdiv(n, bm),)](t, lab, loss.reshape(1), dt, n, BM=bm, BN=bn, ACC=acc)
    dx, dy = backward(dt * scale)
    return loss, dx.to(x.dtype), dy.to(x.dtype), torch.dot(dt, sim)  # d loss / d scale = sum_k dt_k sim_k


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
