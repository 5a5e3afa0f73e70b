"""Triton tiles, strategies and streams: what the launchers of :mod:`embedloss_kernels.backends.triton` run with.

Every tile here compiles without register spills for sm_80 and sm_90 under triton 3.6 and 3.9
(``python -m embedloss_kernels.compile_check``); the numbers in the comments are what that check found.
"""

from __future__ import annotations

import os

import torch


def is_interpreted() -> bool:
    """Whether the Triton kernels run through the interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """The dot precision of a kernel: ``tf32`` for fp32 unless matmul precision is \"highest\", ``upcast`` for bf16
    under the interpreter (numpy has no bf16), else ``ieee``."""
    if dtype == torch.bfloat16 and is_interpreted():
        return "upcast"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def device_arch(device: torch.device | None) -> int:
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
    if interpreted if interpreted is not None else is_interpreted():
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
    if interpreted if interpreted is not None else is_interpreted():
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
    if dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and dot_precision(dtype) == "tf32"):
        return FLASH_MAX_DIM
    return 32


def flash_config(n_dim: int, dtype: torch.dtype, interpreted: bool | None = None,
                 precision: str | None = None) -> dict:
    """Flash tiles: BK spans all of D (the dX / dY accumulators hold whole rows): 64x64 tiles with 8 warps for
    16-bit inputs, 16x32 with 4 warps for tf32, 16x16 for plain-FMA fp32 ("ieee") and fp64 (16x32 spilled in the
    column-parallel dY kernel on sm_90 once the own-docs test was in the tile; compile_check)."""
    bk = max(16, 1 << (max(n_dim, 1) - 1).bit_length())
    if interpreted if interpreted is not None else is_interpreted():
        return {"BM": 16, "BN": 16, "BK": bk}
    if dtype in (torch.float16, torch.bfloat16):
        return {"BM": 64, "BN": 64, "BK": bk, "num_warps": 8}
    fma = dtype == torch.float64 or (precision or dot_precision(dtype)) == "ieee"
    # 2 stages: 3 spilled 24 B in the penalized dX kernel, fp32 on sm_90 under triton 3.6 and fp64 (its scalars read
    # from a tensor) on sm_80 under 3.9; 1 stage spilled fp64 on sm_90 under 3.6 (ptxas's spills move with its
    # version; compile_check runs both)
    stages = 2
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


def autotune_enabled() -> bool:
    """``EMBEDLOSS_TRITON_AUTOTUNE`` (default on): time each candidate tile once per shape key on the GPU."""
    return os.environ.get("EMBEDLOSS_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no", "")


def fused_streams(device: torch.device) -> int:
    """Streams of the fused strategy (``EMBEDLOSS_TRITON_STREAMS``, default 2 on CUDA): with 2, the S product and
    row pass of block k+1 (memory-bound) run on a side stream while the gradient products of block k (compute-bound)
    run on the current one, each block with its own half of the logits budget; 1 runs them one after another."""
    raw = os.environ.get("EMBEDLOSS_TRITON_STREAMS", "").strip() or "2"
    if raw not in ("1", "2"):
        raise ValueError(f"EMBEDLOSS_TRITON_STREAMS must be 1 or 2, got {raw!r}")
    return int(raw) if device.type == "cuda" else 1


def pair_block(dtype: torch.dtype) -> tuple[int, int]:
    """Pairwise tile (rows i, columns j): 64x32 for fp32 t, 32x32 for fp64 (compile_check). A 64x64 fp32 tile with
    4 warps needs 255 registers, the per-thread cap: triton 3.6's ptxas spilled it on sm_80 (3.9 just fit); 64x32
    takes about 113."""
    return (32, 32) if dtype == torch.float64 else (64, 32)


def matryoshka_tile(cols: int, dtype: torch.dtype) -> int:
    """Column tile of the Matryoshka row kernels: the next power of two, at most 1024 (at 2048 the doc_to_doc stats
    kernel spills on sm_90: compile_check)."""
    cap = 256 if is_interpreted() else 1024
    return max(16, min(cap, 1 << (max(cols, 1) - 1).bit_length()))


def gist_tiles(dim: int, dtype: torch.dtype, interpreted: bool, precision: str) -> tuple[int, int, int]:
    """(BM, BN, BK) of the GIST kernel: 16x16 tiles under the interpreter (slow; odd shapes cross tiles), else 32x32
    for fp32 and 16x16 for fp64 (FMA dots, twice the registers per element); BK >= 16 for tl.dot, and 16 for every
    FMA dot (fp64, fp32 without tf32): at BK 32 an fp32 FMA guide dot beside the model's tile spills on sm_80
    (compile_check)."""
    bk = 16 if dim <= 16 or dtype == torch.float64 or (dtype == torch.float32 and precision == "ieee") else 32
    if interpreted or dtype == torch.float64:
        return 16, 16, bk
    return 32, 32, bk
