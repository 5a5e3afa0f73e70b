"""NaN embeddings in every drop-in module (issue 25, item 2): the loss sentence-transformers 6.2 returns (NaN), the
same gradients where both are finite, exactly one warning per loss object, no ValueError unless
``EMBEDLOSS_CHECK_FINITE=1``; and under gloo with two ranks, one rank's NaN gives every rank a NaN loss (no rank
raises or hangs)."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import warnings

import pytest
import torch
from conftest import DEVICE, PassThroughModel, gloo_rank, spawn_gloo

import embedloss_kernels.losses as ek_losses
from embedloss_kernels import dispatch

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
pytest.importorskip("transformers")

SPAWN_TIMEOUT_S = 300
BATCH = 6

# name -> (columns, op the fused path calls)
MODULES = {
    "MultipleNegativesRankingLoss": (3, "infonce"),
    "MultipleNegativesSymmetricRankingLoss": (2, "infonce"),
    "CachedMultipleNegativesRankingLoss": (3, "infonce"),
    "CachedMultipleNegativesSymmetricRankingLoss": (2, "infonce"),
    "CoSENTLoss": (2, "cosent"),
    "AnglELoss": (2, "cosent"),
    "GISTEmbedLoss": (3, "gist"),
    "CachedGISTEmbedLoss": (3, "gist"),
    "MatryoshkaLoss": (3, "matryoshka"),
    "MatryoshkaLoss over cached": (3, "matryoshka"),
    "Matryoshka2dLoss": (3, "matryoshka"),
}


def build(name, lib, model, guide):
    """``name`` from ``lib`` (sentence-transformers' losses module or ours) on ``model``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in ("GISTEmbedLoss", "CachedGISTEmbedLoss"):
            extra = dict(mini_batch_size=4) if name.startswith("Cached") else {}
            return getattr(lib, name)(model, guide, **extra)
        if name.startswith("Cached"):
            return getattr(lib, name)(model, mini_batch_size=4)
        if name == "MatryoshkaLoss":
            return lib.MatryoshkaLoss(model, lib.MultipleNegativesRankingLoss(model), [32, 16, 8], [1, 0.5, 2])
        if name == "MatryoshkaLoss over cached":
            inner = lib.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
            return lib.MatryoshkaLoss(model, inner, [32, 16, 8], [1, 0.5, 2])
        if name == "Matryoshka2dLoss":
            return lib.Matryoshka2dLoss(model, lib.MultipleNegativesRankingLoss(model), [32, 16, 8], [1, 0.5, 2])
        return getattr(lib, name)(model)


def poison(model, value=math.nan):
    """A forward hook on the pooling module: row 0 of every embedded column gets ``value`` in one coordinate (the
    gradient still reaches the model through the other coordinates)."""

    def hook(_module, _inputs, output):
        emb = output["sentence_embedding"]
        bad = torch.zeros_like(emb)
        bad[0, 1] = value
        return {**output, "sentence_embedding": emb + bad}

    return model[len(model) - 1].register_forward_hook(hook)


@pytest.fixture(scope="module")
def tiny(tiny_st):
    return tiny_st(dropout=0.0).eval().double()


def features(model, n_cols):
    from tiny_model import on_device, sentences

    return [on_device(model.preprocess(sentences(BATCH, 40 + c))) for c in range(n_cols)]


def count_nonfinite_warnings(caplog):
    return sum("NaN or Inf" in r.message for r in caplog.records if r.name == "embedloss_kernels")


def run(name, lib, tiny, feats, labels, calls=1):
    model, guide = copy.deepcopy(tiny), copy.deepcopy(tiny)
    handle = poison(model)
    loss_fn = build(name, lib, model, guide)
    losses = []
    for _ in range(calls):
        random.seed(5)
        model.zero_grad()
        loss = loss_fn(feats, labels)
        loss.backward()
        losses.append(loss.detach())
    handle.remove()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODULES))
def test_nan_embeddings_give_sentence_transformers_nan_loss_and_one_warning(name, tiny, backend, monkeypatch,
                                                                           caplog):
    n_cols, op = MODULES[name]
    reason = dispatch.why_not(backend, DEVICE, op)
    if reason is not None:
        pytest.skip(f"backend {backend}: {reason}")
    monkeypatch.setenv("EMBEDLOSS_BACKEND", backend)
    monkeypatch.delenv("EMBEDLOSS_CHECK_FINITE", raising=False)
    feats = features(tiny, n_cols)
    labels = torch.rand(BATCH, dtype=torch.float64, device=DEVICE) if op == "cosent" else None
    (expected,), st_grads = run(name, st_losses, tiny, feats, labels)
    assert torch.isnan(expected)
    with caplog.at_level(logging.WARNING, logger="embedloss_kernels"):
        got, grads = run(name, ek_losses, tiny, feats, labels, calls=2)
    assert all(torch.isnan(loss) for loss in got), got
    assert count_nonfinite_warnings(caplog) == 1
    assert grads.keys() == st_grads.keys()
    compared = 0
    for key, g in grads.items():
        both = torch.isfinite(g) & torch.isfinite(st_grads[key])
        compared += int(both.sum())
        torch.testing.assert_close(g[both], st_grads[key][both], rtol=1e-8, atol=1e-12, msg=key)
    assert not all(bool(torch.isfinite(g).all()) for g in grads.values())  # GradScaler skips the step


@pytest.mark.parametrize("name", list(MODULES))
def test_check_finite_makes_every_module_raise(name, tiny, monkeypatch):
    n_cols, _ = MODULES[name]
    monkeypatch.setenv("EMBEDLOSS_CHECK_FINITE", "1")
    feats = features(tiny, n_cols)
    labels = torch.rand(BATCH, dtype=torch.float64, device=DEVICE) if "CoSENT" in name or "AnglE" in name else None
    with pytest.raises(ValueError, match="NaN or Inf"):
        run(name, ek_losses, tiny, feats, labels)


def test_gist_nan_guide_gives_sentence_transformers_finite_loss(tiny, monkeypatch, caplog):
    """A NaN in the guide's embeddings: its comparisons are false, nothing is masked, and sentence-transformers'
    loss is finite; ours is the same (no error, no warning)."""
    monkeypatch.delenv("EMBEDLOSS_CHECK_FINITE", raising=False)
    feats = features(tiny, 3)
    results = []
    for lib in (st_losses, ek_losses):
        model, guide = copy.deepcopy(tiny), copy.deepcopy(tiny)
        handle = poison(guide)
        loss = build("GISTEmbedLoss", lib, model, guide)(feats, None)
        loss.backward()
        handle.remove()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (expected, st_grads), (got, grads) = results
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    for g, ref in zip(grads, st_grads):
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-12)
    assert count_nonfinite_warnings(caplog) == 0


# -- two gloo ranks, one with a NaN -------------------------------------------------------------------------------
def _gloo_worker(rank, world, init_file, out_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    with gloo_rank(rank, world, init_file):
        logging.basicConfig(level=logging.WARNING)
        records = []

        class Collect(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        logging.getLogger("embedloss_kernels").addHandler(Collect())
        results = {}
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        gen = torch.Generator().manual_seed(rank)
        cols = [torch.randn(4, 12, generator=gen, dtype=torch.float64) for _ in range(3)]
        if rank == 0:
            cols[1][2, 5] = math.nan  # a positive: every rank scores it
        model = PassThroughModel(12, tokenizer)
        guide = PassThroughModel(12, tokenizer)
        feats = [{"embedding": c} for c in cols]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cases = {
                "mnrl gather": ("gather", ek_losses.MultipleNegativesRankingLoss(model, gather_across_devices=True)),
                "mnrl ring": ("ring", ek_losses.MultipleNegativesRankingLoss(model, gather_across_devices=True)),
                "matryoshka": ("gather", ek_losses.MatryoshkaLoss(
                    model, ek_losses.MultipleNegativesRankingLoss(model, gather_across_devices=True), [12, 6])),
                "gist": ("gather", ek_losses.GISTEmbedLoss(model, guide, gather_across_devices=True)),
            }
        for key, (schedule, loss_fn) in cases.items():
            os.environ["EMBEDLOSS_DISTRIBUTED_SCHEDULE"] = schedule
            before = len(records)
            losses = []
            for _ in range(2):
                if key == "gist":
                    # GIST's guide embeds the same features (the pass-through ignores the tokenizer)
                    loss = loss_fn.compute_loss_from_embeddings(cols, [c.detach() for c in cols])
                else:
                    loss = loss_fn(feats, None)
                losses.append(float(loss))
            warned = sum("NaN or Inf" in m for m in records[before:])
            results[key] = (losses, warned)
        torch.save(results, os.path.join(out_dir, f"r{rank}.pt"))


def test_gloo_one_rank_with_nan_every_rank_gets_nan(tmp_path, tiny):

    tokenizer_dir = tmp_path / "tok"
    tiny.tokenizer.save_pretrained(tokenizer_dir)
    spawn_gloo(_gloo_worker, 2, (2, str(tmp_path / "init"), str(tmp_path), str(tokenizer_dir)), SPAWN_TIMEOUT_S)
    for rank in range(2):
        res = torch.load(tmp_path / f"r{rank}.pt")
        assert set(res) == {"mnrl gather", "mnrl ring", "matryoshka", "gist"}
        for key, (losses, warned) in res.items():
            assert all(math.isnan(v) for v in losses), (rank, key, losses)
            assert warned == 1, (rank, key, warned)
