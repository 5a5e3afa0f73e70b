"""gather_across_devices on CPU: per-rank peak extra memory of one forward+backward, ours vs sentence-transformers.

Every (provider, local batch) runs in fresh processes: ``world`` gloo ranks on loopback, one thread each. Each
rank allocates its local columns, resets its peak RSS (Linux ``clear_refs``), runs the loss forward+backward with
gather_across_devices=True, and reports the peak RSS growth (VmHWM - VmRSS before the step; ``ru_maxrss`` where
``clear_refs`` is unavailable) and the wall time. Also printed: the bytes of the gathered world columns and their
gradients, the floor both providers share, and the local x world logits that only sentence-transformers keeps.

    python benchmarks/bench_distributed.py [--world 2] [--batches 512 1024 2048 4096] [--dim 256] [--negatives 0]

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import _peak_bytes, _reset_peak_rss  # noqa: E402  (one peak-RSS method for every benchmark)


def _peak() -> int:
    import torch

    return _peak_bytes(torch.device("cpu"))


def _worker(rank, world, init_file, out_file, provider, batch, dim, negatives):
    import logging

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    if provider == "ours":
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
    base = _reset_peak_rss()
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--negatives", type=int, default=0)
    parser.add_argument("--providers", nargs="+", default=["ours", "sentence_transformers"])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()

    mib = 2**20
    cols = 2 + args.negatives
    print(f"world={args.world} gloo ranks on CPU, dim={args.dim}, float32, {cols} columns, one thread per rank")
    print("| provider | local B | world B | gathered cols + grads (MiB) | ST logits B x K*W*B (MiB) "
          "| peak extra per rank (MiB) | step (s) | loss rank 0 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in args.batches:
        world_rows = batch * args.world
        columns_bytes = 2 * world_rows * cols * args.dim * 4
        logits_bytes = batch * (cols - 1) * world_rows * 4
        for provider in args.providers:
            res = run_one(provider, args.world, batch, args.dim, args.negatives)
            extra = max(r["extra_bytes"] for r in res)
            secs = max(r["seconds"] for r in res)
            rows.append(dict(provider=provider, local_batch=batch, world_batch=world_rows, extra_bytes=extra,
                             seconds=secs, loss=res[0]["loss"], columns_bytes=columns_bytes,
                             logits_bytes=logits_bytes))
            print(f"| {provider} | {batch} | {world_rows} | {columns_bytes / mib:.1f} | {logits_bytes / mib:.1f} "
                  f"| {extra / mib:.1f} | {secs:.2f} | {res[0]['loss']:.6f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
