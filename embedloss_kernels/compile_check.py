"""Ahead-of-time compile of every Triton kernel and every tile config the launcher can pick, for sm_80 and sm_90.

``python -m embedloss_kernels.compile_check`` prints (kernel, config, target, registers, spills, shared memory) and
exits non-zero on a compile failure or a register spill. No GPU is needed: ``triton.compile`` lowers to a cubin for
the target, and ``ptxas -v`` on the same PTX reports registers and spills (a CompiledKernel only knows them after
loading on a device).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

TARGETS = (80, 90)
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "fp64": "fp64"}


def _configs():
    """(kernel name, dtype, target, constexprs) for every combination the launchers can pick on a GPU."""
    import torch
    import triton.language as tl

    from .heuristics.triton import GROUP_ROWS, flash_config, pair_block, row_pass_config, tile_configs

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    # The penalty only applies to query_to_doc, which is never masked: (pen, mask) pairs the launcher passes.
    pen_mask = [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (0, 2)]
    for arch in TARGETS:
        for dt in DTYPES:
            acc = tl.float64 if dt == "fp64" else tl.float32
            exp2 = dt != "fp64"
            precs = ("tf32", "ieee") if dt == "fp32" else ("ieee",)
            for prec in precs:
                for name in ("row_lse_kernel", "softmax_grad_kernel", "flash_dx_kernel", "flash_dy_kernel"):
                    dims = (16, 32, 64)
                    if name.startswith("flash"):  # flash_max_dim: 64 on tensor cores, 32 for plain fp32 / fp64
                        dims = tuple(d for d in dims if d <= (32 if dt == "fp64" or (dt, prec) == ("fp32", "ieee")
                                                              else 64))
                    for n_dim in dims:  # one per BK the launcher can pick
                        if name.startswith("flash"):
                            cfgs = [flash_config(n_dim, torch_dtype[dt], interpreted=False, precision=prec)]
                        else:
                            cfgs = tile_configs(n_dim, torch_dtype[dt], arch, interpreted=False)
                        extra = {"GROUP": GROUP_ROWS} if name == "softmax_grad_kernel" else {}
                        for cfg in cfgs:
                            for pen, mask in pen_mask:
                                yield name, dt, arch, dict(PEN_MODE=pen, MASK_MODE=mask, ACC=acc, PREC=prec,
                                                           EXP2=exp2, **extra, **cfg)
            cfg = row_pass_config(torch_dtype[dt], interpreted=False)
            for mode in (0, 1, 2):  # MODE 0 (one direction) only ever sees query_to_doc, never masked
                for pen, mask in (pen_mask if mode else pen_mask[:4]):
                    yield "row_pass_kernel", dt, arch, dict(PEN_MODE=pen, MASK_MODE=mask, MODE=mode, EXP2=exp2, **cfg)
            for name in ("pair_lse_kernel", "pair_grad_kernel"):
                bm, bn = pair_block(torch_dtype[dt])
                yield name, dt, arch, dict(BM=bm, BN=bn, ACC=acc, num_warps=4)
        yield from _gist_configs(arch, torch_dtype)
        yield from _matryoshka_configs(arch, torch_dtype)
        yield from _siglip_configs(arch, torch_dtype)


def _siglip_configs(arch: int, torch_dtype: dict):
    """SigLIP's row pass: G written in every input dtype over the work-dtype S, with and without the positives, with
    and without the gradient, at the row-pass tile the launcher takes."""
    import triton.language as tl

    from .heuristics.triton import row_pass_config

    for dt in DTYPES:
        cfg = row_pass_config(torch_dtype[dt], interpreted=False)
        acc = tl.float64 if dt == "fp64" else tl.float32
        for has_pos in (True, False):
            for grad in (True, False):
                yield "siglip_row_kernel", dt, arch, dict(HAS_POS=has_pos, GRAD=grad, ACC=acc, **cfg)


def _matryoshka_configs(arch: int, torch_dtype: dict):
    """The Matryoshka row kernels in their work dtype (fp32 for 16-bit and fp32 inputs, fp64), at every column
    tile the launcher picks, in the (positive, penalty, mask) modes its directions give: the penalty only on
    query_to_doc (the one with the positive), the masks on query_to_query (1) and doc_to_doc (2)."""
    from .heuristics.triton import matryoshka_tile

    for dt in ("fp32", "fp64"):
        cap = matryoshka_tile(1 << 30, torch_dtype[dt])
        for bn in (1 << k for k in range(4, cap.bit_length())):
            for pen, mask in ((0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (0, 2)):
                yield "matryoshka_row_stats_kernel", dt, arch, dict(PEN_MODE=pen, MASK_MODE=mask, BN=bn)
                if mask == 0:
                    yield "matryoshka_row_grad_kernel", dt, arch, dict(POSITIVE=True, PEN_MODE=pen, MASK_MODE=0,
                                                                       BN=bn)
                if pen == 0:  # doc_to_query (mask 0), query_to_query, doc_to_doc
                    yield "matryoshka_row_grad_kernel", dt, arch, dict(POSITIVE=False, PEN_MODE=0, MASK_MODE=mask,
                                                                       BN=bn)


def _gist_configs(arch: int, torch_dtype: dict):
    """GIST's masked-logits kernel: every tile the launcher picks for the model's embeddings (dtype, precision, BK),
    each with the guide in every dtype and precision at its widest BK, and in the model's own at every BK. The
    exemption (``HAS_EXEMPT``) only adds elementwise code: both ways once per model tile."""
    import triton.language as tl

    from .heuristics.triton import gist_tiles

    def options(dt):
        acc = tl.float64 if dt == "fp64" else tl.float32
        for prec in (("tf32", "ieee") if dt == "fp32" else ("ieee",)):
            for dim in (16, 64):  # BK 16 and (for tensor-core dots) 32
                yield dict(zip(("BM", "BN", "BK"), gist_tiles(dim, torch_dtype[dt], False, prec))), acc, prec

    picks = {dt: list(dict.fromkeys((t["BK"], t["BM"], t["BN"], a, p) for t, a, p in options(dt))) for dt in DTYPES}
    for dt in DTYPES:
        for bk, bm, bn, acc, prec in picks[dt]:
            guides = {(gdt, gbk, gacc, gprec) for gdt in DTYPES for gbk, _, _, gacc, gprec in picks[gdt]
                      if gdt == dt and gprec == prec or gbk == max(k for k, *_ in picks[gdt])}
            for gdt, gbk, gacc, gprec in sorted(guides, key=str):
                for exempt in ((True, False) if (gdt, gbk, gprec) == (dt, bk, prec) else (True,)):
                    yield "gist_masked_logits_kernel", dt, arch, dict(
                        HAS_EXEMPT=exempt, BM=bm, BN=bn, BK=bk, BKG=gbk, ACC=acc, GACC=gacc, PREC=prec, GPREC=gprec,
                        guide_dtype=gdt)


def _signature(fn, dt: str, constexprs: dict, guide_dt: str | None = None) -> dict:
    import inspect

    import triton.language as tl

    work = "fp64" if dt == "fp64" else "fp32"
    annotations = {n: p.annotation for n, p in inspect.signature(fn.fn).parameters.items()}
    sig = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif isinstance(annotations.get(arg), tl.dtype):
            sig[arg] = str(annotations[arg])  # an annotated scalar (what Triton's launcher specializes it to)
        elif arg in ("xg_ptr", "yg_ptr"):
            sig[arg] = f"*{guide_dt}"  # GIST's guide embeddings, in the guide's dtype
        elif arg in ("x_ptr", "y_ptr", "g_ptr") and not fn.__name__.startswith("pair_"):
            sig[arg] = f"*{dt}"  # inputs and the G~ workspace are in the input dtype
        elif arg == "y_ptr":
            sig[arg] = "*fp64"  # CoSENT labels
        elif arg == "owner_ptr":
            sig[arg] = "*i32"  # column -> query index
        elif arg == "near_ptr":
            sig[arg] = "*i8"  # GIST's flags of the entries within rounding of their bound
        elif arg.endswith("_ptr"):
            sig[arg] = f"*{work}"
        elif arg in ("scale", "boost", "weight", "onehot"):
            sig[arg] = "fp32"  # a Python float argument (no launched kernel takes one: test_compile_check checks)
        else:
            sig[arg] = "i32"
    return sig


def _ptxas(arch: int) -> str | None:
    """Triton's bundled ptxas (it understands the PTX version Triton emits; a system ptxas may be older)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            found = get_ptxas(arch)  # triton >= 3.7 picks the ptxas per architecture
        except TypeError:  # triton 3.6 takes no argument
            found = get_ptxas()
        return found.path if hasattr(found, "path") else found[0]
    except Exception:  # noqa: BLE001 - older/newer triton: fall back to PATH
        return shutil.which("ptxas")


def _usage(ptx: str, arch: int, ptxas: str | None) -> tuple[int, int]:
    """Registers and spill bytes (stores + loads) of the kernel in ``ptx`` for ``sm_<arch>``. ptxas's answer is kept
    on disk by the hash of (ptxas, its file's size and time, arch, PTX), as Triton keeps its compiles: a second run
    over unchanged kernels runs no ptxas (``EMBEDLOSS_CACHE_DIR``, default ``~/.cache/embedloss_kernels``)."""
    if ptxas is None:
        return -1, -1
    stat = os.stat(ptxas)
    key = hashlib.sha256(f"{ptxas}|{stat.st_size}|{stat.st_mtime_ns}|{arch}|".encode() + ptx.encode()).hexdigest()
    cache = os.path.join(os.environ.get("EMBEDLOSS_CACHE_DIR") or os.path.expanduser("~/.cache/embedloss_kernels"),
                         "ptxas", key)
    try:
        with open(cache) as f:
            regs, spills = (int(v) for v in f.read().split())
        return regs, spills
    except (OSError, ValueError):
        pass
    regs, spills = _run_ptxas(ptx, arch, ptxas)
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f"{cache}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{regs} {spills}")
        os.replace(tmp, cache)  # atomic: parallel workers never read half a file
    except OSError:
        pass  # a read-only home: no cache, same answer
    return regs, spills


def _run_ptxas(ptx: str, arch: int, ptxas: str) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""  # triton targets sm_90a on Hopper
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{suffix}", "-v", path, "-o", os.devnull], capture_output=True,
                             text=True, check=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return int(regs.group(1)) if regs else -1, sum(spills)


def compile_kernel(name: str, dt: str, arch: int, constexprs: dict):
    """``triton.compile`` of one (kernel, dtype, target, constexprs) of :func:`_configs` (launch options and GIST's
    guide dtype ride in ``constexprs``), for sm_``arch`` without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernels import cosent, gist, infonce, matryoshka, siglip

    cst = dict(constexprs)
    options = {"num_warps": cst.pop("num_warps", 4), "num_stages": cst.pop("num_stages", 3)}
    guide_dt = cst.pop("guide_dtype", None)
    fn = next(getattr(m, name) for m in (infonce, cosent, gist, matryoshka, siglip)
              if hasattr(m, name))
    return triton.compile(ASTSource(fn, _signature(fn, dt, cst, guide_dt), cst), target=GPUTarget("cuda", arch, 32),
                          options=options)


def _compile_one(job: tuple[str, str, dict, int]) -> tuple:
    """One (kernel, config, target) row of the table; runs in a worker process."""
    name, dt, arch, cst = job
    num_warps, num_stages = cst.get("num_warps", 4), cst.get("num_stages", 3)
    guide_dt = cst.get("guide_dtype")
    guide = [f"guide {guide_dt} BK{cst['BKG']} {cst['GPREC']}", f"exempt{int(cst['HAS_EXEMPT'])}"] if guide_dt else []
    config = " ".join([dt] + [f"{k}{v}" for k, v in cst.items() if k in ("BM", "BN", "BK")] + guide
                      + [f"w{num_warps}s{num_stages}"]
                      + [f"{k.split('_')[0].lower()}{v}" for k, v in cst.items() if k.endswith("_MODE")]
                      + ([f"mode{cst['MODE']}"] if "MODE" in cst else [])
                      + ([f"positive{int(cst['POSITIVE'])}"] if "POSITIVE" in cst else [])
                      + [cst.get("PREC", "")]).strip()
    try:
        compiled = compile_kernel(name, dt, arch, cst)
        regs, spills = _usage(compiled.asm["ptx"], arch, _ptxas(arch))
        shared = compiled.metadata.shared
        status = "SPILL" if spills > 0 else "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the table and in the exit status
        regs = spills = shared = -1
        status = f"FAIL {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:100]}"
    return name, config, f"sm_{arch}", regs, spills, shared, status


def main(argv: list[str] | None = None) -> int:
    """``--quick``: one penalty/mask variant per kernel, tile config, dtype and target (the modes only change
    elementwise code); the default compiles every combination the launchers can pick."""
    import argparse
    import concurrent.futures

    parser = argparse.ArgumentParser(
        prog="python -m embedloss_kernels.compile_check",
        description="Compile every Triton kernel and tile config the launchers can pick for sm_80 and sm_90 (no GPU "
        "needed); print registers, spills and shared memory; exit 1 on a compile failure or a register spill.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="one penalty/mask variant per kernel, tile config, dtype and target (a fast local check)")
    quick = parser.parse_args(sys.argv[1:] if argv is None else argv).quick
    jobs, seen = [], set()
    for name, dt, arch, cst in _configs():
        key = (name, dt, arch, repr(sorted(cst.items())))
        if key in seen or (quick and ((cst.get("PEN_MODE", 0), cst.get("MASK_MODE", 0)) not in ((0, 0), (3, 0))
                                      or cst.get("HAS_EXEMPT") is False)):
            continue  # two D choices can map to one tile config
        seen.add(key)
        jobs.append((name, dt, arch, cst))
    widths = (20, 48, 7, 9, 6, 6)
    header = ("kernel", "config", "target", "registers", "spills", "shared", "status")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths + (0,))).rstrip(), flush=True)
    failed = 0
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for row in pool.map(_compile_one, jobs):
            failed += row[-1] != "ok"
            print("  ".join(str(v).ljust(w) for v, w in zip(row, widths + (0,))).rstrip(), flush=True)
    print(f"{len(jobs)} compiles, {f'{failed} FAILED' if failed else 'all ok, no spills'} "
          f"(ptxas: {_ptxas(TARGETS[-1])})")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the test environment set
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
