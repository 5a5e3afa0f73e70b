"""A real GIST training step: all-MiniLM-L6-v2 as the model and as the guide, (anchor, positive) pairs of short
texts, forward + backward of the loss (train mode), ours vs sentence-transformers' GISTEmbedLoss, with both
libraries' MNRL (no guide) for scale.

    python benchmarks/bench_gist_step.py                        # B=512, 8-word texts, 2 repeats
    python benchmarks/bench_gist_step.py --batch-size 256 --repeats 3

Each provider runs in a fresh process; time is the median of ``--repeats`` steps after one warm-up step, peak
extra memory the growth of peak RSS over the first step (the encoder's activations included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_cached import load_encoder  # noqa: E402
from common import environment, peak_bytes, reset_peak_rss  # noqa: E402

PROVIDERS = ("ours-gist", "st-gist", "ours-mnrl", "st-mnrl")


def make_loss(provider: str, model, guide):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers.sentence_transformer import losses as st

        from embedloss_kernels import losses as ours

        return {
            "ours-gist": lambda: ours.GISTEmbedLoss(model, guide),
            "st-gist": lambda: st.GISTEmbedLoss(model, guide),
            "ours-mnrl": lambda: ours.MultipleNegativesRankingLoss(model),
            "st-mnrl": lambda: st.MultipleNegativesRankingLoss(model),
        }[provider]()


def run_worker(spec: dict) -> dict:
    import torch

    torch.manual_seed(0)
    model, encoder = load_encoder()
    guide, _ = load_encoder()
    model.train()
    guide.eval()
    words = "the a quick brown fox jumps over lazy dog river city music coffee road house tree".split()
    gen = torch.Generator().manual_seed(1)

    def texts(n):
        return [" ".join(words[i] for i in torch.randint(0, len(words), (spec["tokens"],), generator=gen).tolist())
                for _ in range(n)]

    features = [model.preprocess(texts(spec["batch"])) for _ in range(2)]
    loss_fn = make_loss(spec["provider"], model, guide)

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn([dict(f) for f in features], None).backward()

    base = reset_peak_rss()
    step()
    peak = (peak_bytes(torch.device("cpu")) - base) / 2**20
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {**spec, "encoder": encoder, "time_s": statistics.median(times), "peak_extra_mb": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    env = environment()
    print(f"GIST training step on {env['device']} | torch {env['torch']} | sentence-transformers "
          f"{env['sentence_transformers']} | commit {env['commit']} | B={args.batch_size}, {args.tokens} words")
    rows = []
    for provider in args.providers:
        spec = dict(provider=provider, batch=args.batch_size, tokens=args.tokens, repeats=args.repeats)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                **spec, "status": "OOM" if proc.returncode == -9 else f"error: {proc.stderr.strip()[-200:]}"}
        except subprocess.TimeoutExpired:
            row = {**spec, "status": "timeout"}
        rows.append(row)
        print(json.dumps(row))
    ref = {r["provider"]: r for r in rows if "time_s" in r}
    print(f"\n{'provider':10} {'step s':>8} {'peak extra MB':>14} {'t / st-gist':>12} {'mem / st-gist':>14}")
    for r in rows:
        if "time_s" not in r:
            print(f"{r['provider']:10} {r['status']}")
            continue
        st = ref.get("st-gist")
        t_ratio = f"{r['time_s'] / st['time_s']:.2f}" if st else "-"
        m_ratio = f"{r['peak_extra_mb'] / st['peak_extra_mb']:.2f}" if st and st["peak_extra_mb"] > 0 else "-"
        print(f"{r['provider']:10} {r['time_s']:8.2f} {r['peak_extra_mb']:14.0f} {t_ratio:>12} {m_ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
