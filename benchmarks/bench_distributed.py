"""gather_across_devices on CPU: per-rank peak extra memory and time of one forward+backward, ours (gather and/or
ring schedule) vs sentence-transformers.

Every (provider, local batch) runs in fresh processes: ``world`` gloo ranks on loopback, one thread each. Each
rank allocates its local columns, resets its peak RSS (Linux ``clear_refs``), runs the loss forward+backward with
gather_across_devices=True, and reports the peak RSS growth (VmHWM - VmRSS before the step; ``ru_maxrss`` where
``clear_refs`` is unavailable) and the wall time. Also printed: the bytes of the gathered world columns and their
gradients (what the gather schedule holds), the local x world logits that only sentence-transformers keeps, and the
bytes each rank sends per step (gather: 2 (W-1) blocks of B x C x D; ring: those plus W gradient accumulators).
Our losses pick the schedule from ``EMBEDLOSS_DISTRIBUTED_SCHEDULE``, set here per provider. Writes
``--out``/distributed.json and distributed.png (time and memory against the local batch).

    python benchmarks/bench_distributed.py [--world 2] [--batches 512 1024 2048 4096 8192] [--dim 256] [--negatives 0]
        [--schedule gather|ring|both]

RSS is what the allocator holds, not what tensors need: repeated runs of the same row vary by up to ~30% for ours
(freed blocks kept in glibc arenas); the table reports the largest rank of one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, peak_bytes, reset_peak_rss  # noqa: E402  (one peak-RSS method everywhere)

SCHEDULE_ENV = "EMBEDLOSS_DISTRIBUTED_SCHEDULE"


def _peak() -> int:
    import torch

    return peak_bytes(torch.device("cpu"))


def _worker(rank, world, init_file, out_file, provider, batch, dim, negatives):
    import logging

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    if provider.startswith("ours"):
        os.environ[SCHEDULE_ENV] = provider.partition("-")[2] or "gather"
        from embedloss_kernels.losses import MultipleNegativesRankingLoss
    else:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    loss_fn = MultipleNegativesRankingLoss(None, scale=20.0, gather_across_devices=True)
    g = torch.Generator().manual_seed(rank)
    cols = [torch.randn(batch, dim, generator=g).requires_grad_(True) for _ in range(2 + negatives)]
    # a small warm-up step so lazy initialisation (thread pools, gloo buffers) is not counted
    small = [c[:8].detach().clone().requires_grad_(True) for c in cols]
    loss_fn.compute_loss_from_embeddings(small, None).backward()
    dist.barrier()
    base = reset_peak_rss()
    t0 = time.perf_counter()
    loss = loss_fn.compute_loss_from_embeddings(cols, None)
    loss.backward()
    elapsed = time.perf_counter() - t0
    extra = _peak() - base
    dist.barrier()
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"rank": rank, "extra_bytes": extra, "seconds": elapsed, "loss": loss.item()}, f)
    dist.destroy_process_group()


def run_one(provider, world, batch, dim, negatives) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out, provider, batch, dim, negatives),
                 nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(f"{out}.{r}") as f:
                results.append(json.load(f))
        return results


def comm_bytes(provider: str, world: int, batch: int, cols: int, dim: int, elem: int = 4, work_elem: int = 4) -> int:
    """Bytes one rank sends per forward+backward: gather (and sentence-transformers) 2 (W-1) blocks of the input
    dtype; ring 2 (W-1) blocks of the input dtype plus W gradient accumulators of the working precision."""
    block = batch * cols * dim
    if provider == "ours-ring":
        return (2 * (world - 1) * elem + world * work_elem) * block
    return 2 * (world - 1) * elem * block


def plot(rows, env, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, provider in enumerate(dict.fromkeys(r["provider"] for r in rows)):
        pts = sorted((r["local_batch"], r["seconds"], r["extra_bytes"] / 2**20) for r in rows
                     if r["provider"] == provider)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider, color=f"C{i}")
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=provider, color=f"C{i}")
    for ax, title in zip(axes, ("step time (s)", "peak extra memory per rank (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("local batch size")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gather_across_devices, {args.world} gloo ranks, D={args.dim}, fp32, {env['device']}, "
                 f"commit {env['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--negatives", type=int, default=0)
    parser.add_argument("--schedule", choices=["gather", "ring", "both"], default="gather",
                        help="our schedule(s) to measure (EMBEDLOSS_DISTRIBUTED_SCHEDULE)")
    parser.add_argument("--providers", nargs="+", choices=["ours", "sentence_transformers"],
                        default=["ours", "sentence_transformers"])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args()

    schedules = ["gather", "ring"] if args.schedule == "both" else [args.schedule]
    providers = []
    for p in args.providers:
        providers += [f"ours-{s}" for s in schedules] if p == "ours" else [p]
    mib = 2**20
    cols = 2 + args.negatives
    env = environment()
    print(f"world={args.world} gloo ranks on {env['device']}, dim={args.dim}, float32, {cols} columns, one thread "
          f"per rank | torch {env['torch']} | sentence-transformers {env['sentence_transformers']} | commit "
          f"{env['commit']}")
    print("| provider | local B | world B | gathered cols + grads (MiB) | ST logits B x K*W*B (MiB) "
          "| sent per rank (MiB) | peak extra per rank (MiB) | step (s) | loss rank 0 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in args.batches:
        world_rows = batch * args.world
        columns_bytes = 2 * world_rows * cols * args.dim * 4
        logits_bytes = batch * (cols - 1) * world_rows * 4
        for provider in providers:
            res = run_one(provider, args.world, batch, args.dim, args.negatives)
            extra = max(r["extra_bytes"] for r in res)
            secs = max(r["seconds"] for r in res)
            sent = comm_bytes(provider, args.world, batch, cols, args.dim)
            rows.append(dict(provider=provider, local_batch=batch, world_batch=world_rows, extra_bytes=extra,
                             seconds=secs, loss=res[0]["loss"], columns_bytes=columns_bytes,
                             logits_bytes=logits_bytes, sent_bytes=sent))
            print(f"| {provider} | {batch} | {world_rows} | {columns_bytes / mib:.1f} | {logits_bytes / mib:.1f} "
                  f"| {sent / mib:.1f} | {extra / mib:.1f} | {secs:.2f} | {res[0]['loss']:.6f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps({"environment": env, "args": vars(args) | {
        "out": str(args.out)}, "results": rows}, indent=1))
    plot(rows, env, args, args.out / "distributed.png")
    print(f"\nwrote {args.out / 'distributed.json'} and distributed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
