"""The GPU measurement of issue 11 in one process per stage: forward+backward time (CUDA-event medians) and peak
extra memory of every provider over the bf16 sweep, as ratios to the floor (the three bare cuBLAS products).

    python benchmarks/gpu_sweep.py sweep --out DIR      # B {4096, 16384, 65536} x N {B, 2B} x D {384, 768, 1024}
    python benchmarks/gpu_sweep.py precision --out DIR  # bf16 / fp32 gradient error vs float64, ours vs ST
    python benchmarks/gpu_sweep.py large --out DIR      # B = N = 262144, D = 768; loss vs chunked float64
    python benchmarks/gpu_sweep.py cosent --out DIR     # CoSENT at B = 1M, D = 1024
    python benchmarks/gpu_sweep.py sweep --dry-run      # tiny shapes on CPU: code paths only, measures nothing

Providers: ``ours[triton]``, ``ours[torch]``, ``sentence-transformers`` (MNRL / CoSENT), ``inf-cl`` (Inf-CL 1.2.1
``cal_flash_loss`` on pre-normalized inputs, ``head_dim`` dividing D, mean of its per-row losses; skipped with a note
when it is not installed) and ``floor`` (S = Q A^T, Q.grad = S A, A.grad = S^T Q in bf16 through cuBLAS, in row
chunks of at most 8 GiB of S). Each result row is appended to ``DIR/<stage>.jsonl`` as soon as it is measured, so a
time-boxed stage keeps what it finished. ``benchmarks/gpu_check.sh`` runs every stage under ``timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCALE = 20.0
FLOOR_CHUNK_BYTES = 8 * 2**30


# ----------------------------------------------------------------------------------------------------------------
# Providers: each returns a closure running one forward+backward on (q, columns)
# ----------------------------------------------------------------------------------------------------------------
def provider_step(name: str, cols: list[torch.Tensor]):
    from embedloss_kernels import functional

    if name == "ours[triton,1 stream]":  # the fused strategy without the second stream, for comparison
        def one_stream():
            os.environ["EMBEDLOSS_TRITON_STREAMS"] = "1"
            try:
                functional.multiple_negatives_ranking_loss(*cols, scale=SCALE, backend="triton").backward()
            finally:
                os.environ.pop("EMBEDLOSS_TRITON_STREAMS")

        return one_stream
    if name.startswith("ours["):
        backend = name[5:-1]
        return lambda: functional.multiple_negatives_ranking_loss(*cols, scale=SCALE, backend=backend).backward()
    if name == "sentence-transformers":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        loss_fn = MultipleNegativesRankingLoss(None, scale=SCALE)
        return lambda: loss_fn.compute_loss_from_embeddings(cols, None).backward()
    if name == "inf-cl":
        from inf_cl import cal_flash_loss

        dim = cols[0].shape[1]
        head_dim = next(h for h in (256, 128, 64, 32, 16) if dim % h == 0)

        def infcl():
            q = F.normalize(cols[0], dim=1)
            k = F.normalize(torch.cat(cols[1:]), dim=1)
            cal_flash_loss(q, k, scale=SCALE, head_dim=head_dim).mean().backward()

        return infcl
    if name == "floor":
        q, a = cols[0].detach(), torch.cat([c.detach() for c in cols[1:]])
        chunk = max(1, min(q.shape[0], FLOOR_CHUNK_BYTES // (a.shape[0] * q.element_size())))

        def floor():
            dq = torch.empty_like(q)
            da = torch.zeros_like(a)
            for r0 in range(0, q.shape[0], chunk):
                s = q[r0 : r0 + chunk] @ a.T
                torch.mm(s, a, out=dq[r0 : r0 + chunk])
                da.addmm_(s.T, q[r0 : r0 + chunk])
            return dq, da

        return floor
    raise ValueError(name)


def available(name: str) -> str | None:
    """None, or why the provider cannot run here."""
    try:
        if name == "inf-cl":
            import inf_cl  # noqa: F401
        elif name == "sentence-transformers":
            import sentence_transformers  # noqa: F401
        elif name.startswith("ours["):
            from embedloss_kernels import dispatch

            return dispatch.why_not(name[5:-1].split(",")[0], "cuda" if torch.cuda.is_available() else "cpu")
    except ImportError as exc:
        return f"not installed ({exc})"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------
def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_call(fn, clear, budget_s: float, max_reps: int) -> tuple[float, list[float]]:
    """Median of CUDA-event times (host clock on CPU) after one warm-up call; as many repeats as fit in
    ``budget_s`` (at least 2, at most ``max_reps``)."""
    times = []
    reps = max_reps
    for i in range(max_reps + 1):
        clear()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i == 0:  # warm-up (compilation, autotuning, cuBLAS handles): decides the repeats
            reps = int(min(max_reps, max(2, budget_s * 1e3 / max(ms, 1e-3))))
            continue
        times.append(ms)
        if len(times) >= reps:
            break
    return statistics.median(times), times


def measure(name: str, cols: list[torch.Tensor], budget_s: float, max_reps: int) -> dict:
    reason = available(name)
    if reason:
        return {"status": f"skipped: {reason}"}
    for c in cols:
        c.grad = None
    _sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    try:
        fn = provider_step(name, cols)
        fn()  # the peak of one step; also the first warm-up
        _sync()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if torch.cuda.is_available() else None

        def clear():
            for c in cols:
                c.grad = None

        median, times = time_call(fn, clear, budget_s, max_reps)
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
        first = (str(exc).splitlines() or [""])[0][:160]
        return {"status": f"error: {type(exc).__name__}: {first}"}
    finally:
        for c in cols:
            c.grad = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"status": "ok", "time_ms": round(median, 4), "times_ms": [round(t, 4) for t in times],
            "peak_extra_mib": None if peak is None else round(peak, 1)}


def make_cols(batch: int, n_cols: int, dim: int, dtype, device, seed: int = 0) -> list[torch.Tensor]:
    """Q (B, D) and the candidate columns: P, then N - B hard-negative rows (N a multiple of B)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k = n_cols // batch
    return [torch.randn(batch, dim, device=device, dtype=dtype, generator=gen).requires_grad_()
            for _ in range(1 + k)]


def memory_budget_mib(batch: int, n_cols: int, dim: int, elem: int) -> float:
    """Item 5: the inputs' gradients + one fp32 dA (N x D x 4) + 1 GiB."""
    return ((batch + n_cols) * dim * elem + n_cols * dim * 4 + 2**30) / 2**20


def environment() -> dict:
    import subprocess

    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for mod in ("sentence_transformers", "inf_cl"):
        try:
            env[mod] = __import__(mod).__version__ if hasattr(__import__(mod), "__version__") else "installed"
        except ImportError:
            env[mod] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip() or "unknown"
    except OSError:
        env["commit"] = "unknown"
    return env


def emit(out: Path, stage: str, row: dict) -> None:
    with open(out / f"{stage}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------
PROVIDERS = ("floor", "ours[triton]", "ours[torch]", "sentence-transformers", "inf-cl")


def stage_sweep(args, out: Path) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    for batch in args.batches:
        for factor in (1, 2):
            for dim in args.dims:
                cols = make_cols(batch, factor * batch, dim, dtype, device)
                floor_ms = None
                extra = ("ours[triton,1 stream]",) if batch == 16384 else ()  # the second stream's gain
                for name in PROVIDERS + extra:
                    res = measure(name, cols, args.budget, args.max_reps)
                    if name == "floor":
                        floor_ms = res.get("time_ms")
                    row = {"stage": "sweep", "B": batch, "N": factor * batch, "D": dim, "dtype": args.dtype,
                           "provider": name, **res,
                           "vs_floor": round(res["time_ms"] / floor_ms, 3) if res.get("time_ms") and floor_ms else None,
                           "memory_budget_mib": round(memory_budget_mib(batch, factor * batch, dim,
                                                                        cols[0].element_size()), 1)}
                    emit(out, "sweep", row)
                del cols


def _errors(loss, grads, ref_loss, ref_grads) -> dict:
    rel = [((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, ref_grads)]
    return {"loss_rel": abs(loss - ref_loss) / abs(ref_loss), "grad_rel": rel}


def _loss_and_grads(fn, cols):
    leaves = [c.detach().clone().requires_grad_() for c in cols]
    loss = fn(leaves)
    loss.backward()
    return loss.item(), [leaf.grad for leaf in leaves]


def stage_precision(args, out: Path) -> None:
    """Gradient error against float64 (computed on the same rounded inputs): ours vs sentence-transformers at that
    dtype (bf16: ours <= 2x; fp32: <= 4x, with the default float32 matmul precision)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from embedloss_kernels import functional

    device = "cuda" if torch.cuda.is_available() else "cpu"
    st = MultipleNegativesRankingLoss(None, scale=SCALE)
    for dtype in (torch.bfloat16, torch.float32):
        batch, dim = args.precision_shape
        cols = [c.detach() for c in make_cols(batch, 2 * batch, dim, dtype, device, seed=1)]
        ref_loss, ref_grads = _loss_and_grads(lambda c: st.compute_loss_from_embeddings(c, None),
                                              [c.double() for c in cols])
        ref_grads = [g.double() for g in ref_grads]
        rows = {"sentence-transformers": _loss_and_grads(lambda c: st.compute_loss_from_embeddings(c, None), cols)}
        for backend in ("triton", "torch"):
            if available(f"ours[{backend}]") is None:
                rows[f"ours[{backend}]"] = _loss_and_grads(
                    lambda c, b=backend: functional.multiple_negatives_ranking_loss(*c, scale=SCALE, backend=b), cols)
        st_err = _errors(*rows["sentence-transformers"], ref_loss, ref_grads)
        limit = 2.0 if dtype == torch.bfloat16 else 4.0
        for name, (loss, grads) in rows.items():
            err = _errors(loss, grads, ref_loss, ref_grads)
            ok = all(e <= limit * s + 1e-6 for e, s in zip(err["grad_rel"], st_err["grad_rel"]))
            emit(out, "precision", {"stage": "precision", "dtype": str(dtype).split(".")[-1], "B": batch,
                                    "N": 2 * batch, "D": dim, "provider": name, **err,
                                    "limit_vs_st": limit, "within_limit": ok if name != "sentence-transformers"
                                    else None})


def chunked_reference_loss(q: torch.Tensor, p: torch.Tensor, chunk: int) -> float:
    """float64 MNRL (cosine, scale 20), ``chunk`` query rows at a time."""
    qn, pn = F.normalize(q.double(), dim=1), F.normalize(p.double(), dim=1)
    total = 0.0
    for r0 in range(0, q.shape[0], chunk):
        logits = (qn[r0 : r0 + chunk] @ pn.T) * SCALE
        ar = torch.arange(logits.shape[0], device=q.device)
        pos = logits[ar, r0 + ar]
        total += (torch.logsumexp(logits, 1) - pos).sum().item()
    return total / q.shape[0]


def stage_large(args, out: Path) -> None:
    from embedloss_kernels import functional

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, dim = args.large_shape
    cols = make_cols(batch, batch, dim, torch.bfloat16, device, seed=2)
    for name in ("floor", "ours[triton]", "ours[torch]"):
        res = measure(name, cols, args.budget, 2)
        row = {"stage": "large", "B": batch, "N": batch, "D": dim, "provider": name, **res,
               "memory_budget_mib": round(memory_budget_mib(batch, batch, dim, 2), 1)}
        if name.startswith("ours") and res["status"] == "ok":
            with torch.no_grad():
                loss = functional.multiple_negatives_ranking_loss(*[c.detach() for c in cols], scale=SCALE,
                                                                  backend=name[5:-1]).item()
            ref = chunked_reference_loss(cols[0].detach(), cols[1].detach(), args.ref_chunk)
            row.update(loss=loss, reference_fp64=ref, loss_rel=abs(loss - ref) / abs(ref))
        emit(out, "large", row)


def stage_cosent(args, out: Path) -> None:
    from embedloss_kernels import functional

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch, dim = args.cosent_shape
    gen = torch.Generator(device=device).manual_seed(3)
    x, y = (torch.randn(batch, dim, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))
    labels = torch.rand(batch, device=device, generator=gen)

    def ours():
        functional.cosent_loss(x, y, labels, backend="triton" if available("ours[triton]") is None
                               else "torch").backward()

    def st():
        from sentence_transformers.sentence_transformer.losses import CoSENTLoss

        CoSENTLoss(None).compute_loss_from_embeddings([x, y], labels).backward()

    for name, fn in (("ours", ours), ("sentence-transformers", st)):
        x.grad = y.grad = None
        _sync()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        try:
            fn()
            _sync()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if torch.cuda.is_available() else None

            def clear():
                x.grad = y.grad = None

            median, times = time_call(fn, clear, args.budget, 5)
            res = {"status": "ok", "time_ms": round(median, 3), "times_ms": times, "peak_extra_mib": peak}
        except torch.OutOfMemoryError:
            res = {"status": "OOM"}
        emit(out, "cosent", {"stage": "cosent", "B": batch, "D": dim, "provider": name, **res,
                             "memory_budget_mib": round((2 * batch * dim * 2 + 2**30) / 2**20, 1)})


def summarize(out: Path) -> None:
    """sweep.csv, results.json (every stage, with the environment) and sweep.png from the stages' .jsonl files."""
    import csv

    rows = {}
    for stage in ("sweep", "precision", "large", "cosent"):
        path = out / f"{stage}.jsonl"
        rows[stage] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.exists() else []
    env = environment()
    (out / "results.json").write_text(json.dumps({"environment": env, **rows}, indent=1))
    sweep = rows["sweep"]
    if sweep:
        keys = ["B", "N", "D", "dtype", "provider", "status", "time_ms", "vs_floor", "peak_extra_mib",
                "memory_budget_mib"]
        with open(out / "sweep.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(sweep)
        _plot(sweep, env, out / "sweep.png")
    print(f"\n{'B':>7} {'N':>7} {'D':>5} {'provider':22} {'time ms':>10} {'x floor':>8} {'peak MiB':>9}")
    for r in sweep + rows["large"]:
        t = f"{r['time_ms']:.2f}" if r.get("time_ms") is not None else r["status"][:10]
        vs = f"{r['vs_floor']:.2f}" if r.get("vs_floor") else "-"
        print(f"{r['B']:>7} {r['N']:>7} {r['D']:>5} {r['provider']:22} {t:>10} {vs:>8} "
              f"{r.get('peak_extra_mib') or '-':>9}")
    for r in rows["precision"] + rows["cosent"]:
        print(json.dumps(r))


def _plot(sweep: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["B"], r["N"], r["D"]) for r in sweep})
    names = [p for p in PROVIDERS if p != "floor"] + ["ours[triton,1 stream]"]
    fig, ax = plt.subplots(figsize=(max(8, len(shapes) * 0.7), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = []
        for shape in shapes:
            r = next((r for r in sweep if (r["B"], r["N"], r["D"]) == shape and r["provider"] == name), None)
            vals.append(r["vs_floor"] if r and r.get("vs_floor") else 0.0)
        ax.bar([k + i * width for k in range(len(shapes))], vals, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.5, color="r", lw=0.8, ls="--", label="1.5x floor")
    ax.set_yscale("log")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(shapes))])
    ax.set_xticklabels([f"{b // 1024}k/{n // 1024}k/{d}" for b, n, d in shapes], rotation=60, fontsize=7)
    ax.set_ylabel("time / floor (3 bare cuBLAS matmuls)")
    ax.set_xlabel("B / N / D (bf16; missing bar: OOM, error or skipped)")
    ax.legend(fontsize=7)
    ax.set_title(f"MNRL forward+backward, {env['device']}, torch {env['torch']}, commit {env['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["sweep", "precision", "large", "cosent", "summarize"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batches", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--dims", nargs="+", type=int, default=[384, 768, 1024])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per provider and shape")
    parser.add_argument("--max-reps", type=int, default=10)
    parser.add_argument("--precision-shape", nargs=2, type=int, default=[4096, 1024])
    parser.add_argument("--large-shape", nargs=2, type=int, default=[262144, 768])
    parser.add_argument("--ref-chunk", type=int, default=2048)
    parser.add_argument("--cosent-shape", nargs=2, type=int, default=[1 << 20, 1024])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes (on CPU when there is no GPU)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.batches, args.dims, args.budget, args.max_reps = [8], [32], 0.01, 2
        args.precision_shape, args.large_shape, args.ref_chunk, args.cosent_shape = [8, 32], [64, 32], 16, [64, 16]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "summarize":
        summarize(args.out)
        return 0
    try:
        {"sweep": stage_sweep, "precision": stage_precision, "large": stage_large, "cosent": stage_cosent}[
            args.stage](args, args.out)
    except Exception:  # noqa: BLE001 - the stage's rows so far are kept; the failure is logged
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
