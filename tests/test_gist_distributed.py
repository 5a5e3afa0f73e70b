"""GIST with gather_across_devices on 2 and 3 gloo ranks (CPU on purpose: gloo): each rank's loss and gradients
(anchor, positive, negative embeddings) equal sentence-transformers' GISTEmbedLoss with gather_across_devices=True
under the same process group, on every CPU backend, float64."""

from __future__ import annotations

import importlib
import itertools
import os

import pytest
import torch
from conftest import PassThroughModel, gloo_rank, spawn_gloo

from embedloss_kernels import dispatch

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
pytest.importorskip("transformers")

SPAWN_TIMEOUT_S = 300
COMBOS = [
    dict(margin_strategy=s, margin=m, contrast_anchors=ca, contrast_positives=cp, negatives=k)
    for (s, m), (ca, cp), k in itertools.product(
        [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.3)], [(True, True), (False, True), (True, False)],
        [0, 1],
    )
]


def _columns(seed, rows, n_cols, dim):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64) for _ in range(n_cols)]


def _worker(rank, world, init_file, out_dir, tokenizer_dir, backends_):
    from transformers import BertTokenizerFast

    from embedloss_kernels.losses import GISTEmbedLoss

    st_gist = importlib.import_module("sentence_transformers.sentence_transformer.losses.gist_embed")
    with gloo_rank(rank, world, init_file, timeout_s=120):
        tokenizer = BertTokenizerFast.from_pretrained(tokenizer_dir)
        model, guide = PassThroughModel(tokenizer=tokenizer), PassThroughModel(tokenizer=tokenizer)
        b = {2: 4, 3: 3}[world]
        results = []
        for i, c in enumerate(COMBOS):
            options = {k: v for k, v in c.items() if k != "negatives"}
            n_cols = 2 + c["negatives"]
            world_model = _columns(100 + i, b * world, n_cols, 11)
            proj = _columns(200 + i, 11, 1, 7)[0]
            world_guide = [m @ proj + 0.7 * g for m, g in zip(world_model, _columns(300 + i, b * world, n_cols, 7))]

            def local(cols):
                return [t[rank * b : (rank + 1) * b].clone() for t in cols]

            entry = {}
            # sentence-transformers: its own gathers and rank offset, its embedding step replaced
            cols = [t.requires_grad_() for t in local(world_model)]
            guide_cols = local(world_guide)
            st_gist.embed_columns = lambda enc, feats, cols=cols, guide_cols=guide_cols: (
                list(cols) if enc is model else list(guide_cols))
            st_loss = st_losses.GISTEmbedLoss(model, guide, temperature=0.05, gather_across_devices=True, **options)
            loss = st_loss([{} for _ in cols], None)
            loss.backward()
            entry["st"] = (loss.detach(), [t.grad.clone() for t in cols])
            for name in backends_:
                os.environ["EMBEDLOSS_BACKEND"] = name
                cols = [t.requires_grad_() for t in local(world_model)]
                ours = GISTEmbedLoss(model, guide, temperature=0.05, gather_across_devices=True, **options)
                loss = ours.compute_loss_from_embeddings(cols, local(world_guide))
                (loss * 2.0).backward()
                entry[name] = (loss.detach(), [t.grad.clone() / 2.0 for t in cols])
            results.append(entry)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [2, 3])
def test_gist_gather_across_devices_matches_sentence_transformers(world, tmp_path, tiny_st):
    tok_dir = tmp_path / "tok"
    tiny_st().tokenizer.save_pretrained(tok_dir)
    backends_ = [n for n in ("torch", "cpp") if dispatch.why_not(n, "cpu") is None]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    spawn_gloo(_worker, world, (world, str(tmp_path / "init"), str(out_dir), str(tok_dir), backends_),
               SPAWN_TIMEOUT_S, f"world size {world}")
    for rank in range(world):
        results = torch.load(out_dir / f"rank{rank}.pt", weights_only=False)
        assert len(results) == len(COMBOS)
        for c, entry in zip(COMBOS, results):
            ref_loss, ref_grads = entry["st"]
            for name in backends_:
                loss, grads = entry[name]
                torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-8, msg=lambda m: f"{name} {c}: {m}")
                for g, r in zip(grads, ref_grads):
                    torch.testing.assert_close(g, r, rtol=0, atol=1e-8, msg=lambda m: f"{name} {c}: {m}")
