"""A batch far past what a materialized loss can hold: forward+backward of our MNRL at B=32768 pairs, D=128 (fp32),
peak extra memory beyond inputs and gradients, and the loss checked against a float64 reference computed in row
chunks (each chunk materializes only chunk x B logits).

    python benchmarks/large_batch.py [--batch 32768] [--dim 128] [--backend torch]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_bytes, reset_peak_rss  # noqa: E402


def chunked_reference_loss(q, p, chunk: int = 1024) -> float:
    import torch

    from embedloss_kernels.reference import infonce_reference

    total = 0.0
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk):
            rows = min(chunk, q.shape[0] - start)
            total += infonce_reference(q, [p], 20.0, row_start=start, row_count=rows).item() * rows
    return total / q.shape[0]


def main() -> int:
    import torch

    from embedloss_kernels import current_backend, functional

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    q = torch.randn(args.batch, args.dim, requires_grad=True)
    p = torch.randn(args.batch, args.dim, requires_grad=True)
    backend = args.backend or current_backend("cpu")
    # The inputs' gradients are part of any training step; allocate them first so they are not counted as extra.
    q.grad, p.grad = torch.zeros_like(q), torch.zeros_like(p)
    base = reset_peak_rss()
    start = time.perf_counter()
    loss = functional.multiple_negatives_ranking_loss(q, p, backend=backend)
    loss.backward()
    elapsed = time.perf_counter() - start
    extra_mb = (peak_bytes(torch.device("cpu")) - base) / 2**20
    ref = chunked_reference_loss(q.detach().double(), p.detach().double())
    result = {"backend": backend, "batch": args.batch, "dim": args.dim, "loss": loss.item(), "reference_fp64": ref,
              "rel_err": abs(loss.item() - ref) / abs(ref), "peak_extra_mb_beyond_inputs_and_grads": round(extra_mb, 1),
              "time_s": round(elapsed, 2), "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    ok = extra_mb <= 512 and result["rel_err"] < 1e-5
    print("OK" if ok else "FAILED: over 512 MB or loss off")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
