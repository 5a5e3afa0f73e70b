"""Time ratios on a shared machine: every provider in one process, interleaved round by round.

    python benchmarks/interleaved.py                                   # MNRL, B=8192, D=256, 1 hard negative
    python benchmarks/interleaved.py --loss cosent --batch 65536 --rounds 7
    python benchmarks/interleaved.py --loss matryoshka --batch 4096 --dim 768 --matryoshka-dims 768 512 256 128 64
    python benchmarks/interleaved.py --loss matryoshka --device cuda --dtype bfloat16 --batch 16384 --dim 1024 \
        --negatives 0 --providers ours ours-mnrl                      # the GPU check of the fused Matryoshka loss

``throughput.py`` runs each provider in its own process, one after the other, which is what a clean peak-memory
figure needs; but when other jobs share the CPU, the load changes between those processes and their time ratios
drift with it. Here each round runs every provider once (in a rotated order), so the providers see the same load,
and the figures are per-provider medians over rounds plus the median of the per-round ratios to
sentence-transformers and to the floor. Memory is not measured here (use ``throughput.py``). The machine (``lscpu``
model name, cores), the load average before and after, versions and commit are printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import _cosent_step, _matryoshka_step, _mnrl_step  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=["mnrl", "cosent", "matryoshka"], default="mnrl")
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--negatives", type=int, default=1, help="hard-negative columns (MNRL)")
    parser.add_argument("--directions", nargs="+", default=["query_to_doc"])
    parser.add_argument("--backends", nargs="+", default=None, help="our backends (default: every available one)")
    parser.add_argument("--matryoshka-dims", nargs="+", type=int, default=None,
                        help="Matryoshka prefix dims (default: --dim halved four times, D included)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: every step is timed to a synchronize)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--providers", nargs="+", default=None,
                        help="keep only these providers (ours, ours-looped, ours-mnrl, sentence-transformers, floor); "
                             "the ratio columns need the provider they divide by")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)

    import sentence_transformers
    import torch

    import embedloss_kernels as ek

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = args.backends or ek.available_backends(device.type)
    providers = [("ours", b) for b in backends] + [("sentence-transformers", None)]
    if args.loss == "matryoshka":  # fused, looped over the dims, and our plain MNRL at full D (the 1.3x target)
        providers = ([("ours", b) for b in backends] + [("ours-looped", b) for b in backends]
                     + [("ours-mnrl", b) for b in backends] + [("sentence-transformers", None)])
    if args.loss in ("mnrl", "matryoshka"):
        providers.append(("floor", None))
    if args.providers:
        providers = [p for p in providers if p[0] in args.providers]
    n_cols = 2 + args.negatives if args.loss in ("mnrl", "matryoshka") else 2
    cols = [torch.randn(args.batch, args.dim, device=device, dtype=dtype, requires_grad=True) for _ in range(n_cols)]
    labels = torch.rand(args.batch, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    dims = args.matryoshka_dims or [max(1, args.dim >> i) for i in range(5)]
    steps = {}
    for provider, backend in providers:
        spec = {"provider": provider, "backend": backend, "directions": args.directions}
        if args.loss == "mnrl":
            fn = _mnrl_step(spec, torch)
            steps[(provider, backend)] = lambda fn=fn: fn(cols)
        elif args.loss == "matryoshka":
            fn = _matryoshka_step({**spec, "matryoshka_dims": dims, "dim": args.dim}, torch)
            steps[(provider, backend)] = lambda fn=fn: fn(cols)
        else:
            fn = _cosent_step(spec, torch)
            steps[(provider, backend)] = lambda fn=fn: fn(cols, labels)

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
           "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(), "commit": commit(),
           "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
           "python": platform.python_version(), "loadavg_before": os.getloadavg()}
    what = f"dims {dims} " if args.loss == "matryoshka" else ""
    where = env["device"] if device.type == "cuda" else env["cpu"]
    print(f"{args.loss} {what}B={args.batch} D={args.dim} {args.dtype} on {where} ({env['cores']} cores), commit "
          f"{env['commit']}, torch {env['torch']}, sentence-transformers {env['sentence_transformers']}; "
          f"load average before {env['loadavg_before'][0]:.2f}")
    keys = list(steps)
    for key in keys:  # warm-up
        steps[key]()
        for c in cols:
            c.grad = None
    times = {key: [] for key in keys}
    for r in range(args.rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for key in order:
            for c in cols:
                c.grad = None
            sync()
            start = time.perf_counter()
            steps[key]()
            sync()
            times[key].append((time.perf_counter() - start) * 1e3)
    env["loadavg_after"] = os.getloadavg()

    st_key = ("sentence-transformers", None)
    rows = []
    for key in keys:
        name = key[0] if key[1] is None else f"{key[0]}[{key[1]}]"
        row = {"provider": name, "median_ms": statistics.median(times[key]), "times_ms": times[key]}
        if st_key in times:
            row["ratio_to_st"] = statistics.median(t / s for t, s in zip(times[key], times[st_key]))
        if ("floor", None) in times:
            row["ratio_to_floor"] = statistics.median(t / f for t, f in zip(times[key], times[("floor", None)]))
        if ("ours-mnrl", key[1]) in times:  # Matryoshka: against our plain MNRL on the same backend
            row["ratio_to_mnrl"] = statistics.median(t / m for t, m in zip(times[key], times[("ours-mnrl", key[1])]))
        rows.append(row)
    print(f"{'provider':24} {'median ms':>10} {'min':>8} {'max':>8} {'/ ST':>6} {'/ floor':>8} {'/ MNRL':>7}")
    for row in rows:
        st, floor, mnrl = (f"{row[k]:.2f}" if k in row else "-"
                           for k in ("ratio_to_st", "ratio_to_floor", "ratio_to_mnrl"))
        print(f"{row['provider']:24} {row['median_ms']:10.1f} {min(row['times_ms']):8.1f} {max(row['times_ms']):8.1f} "
              f"{st:>6} {floor:>8} {mnrl:>7}")
    print(f"load average after {env['loadavg_after'][0]:.2f}; {args.rounds} rounds")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}_{args.dtype}"
    path = args.out / f"interleaved_{args.loss}_{args.batch}{suffix}.json"
    path.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in vars(args).items()},
                                "results": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
