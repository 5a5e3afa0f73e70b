"""The drop-in inside real training: same parameter gradients as sentence-transformers through a model, and a
SentenceTransformerTrainer run (with its model card) on our losses."""

import copy
import warnings

import pytest
import torch
from conftest import DEVICE, assert_param_grads_close, param_grads, trainer_updates
from tiny_model import on_device, sentences

import embedloss_kernels as ek

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
pytest.importorskip("transformers")


def features(model, n_cols, batch, seed):
    return [on_device(model.preprocess(sentences(batch, seed + c)), model.device) for c in range(n_cols)]


@pytest.mark.parametrize(
    "ours_cls, st_cls, kwargs, n_cols, labels",
    [
        (ek.MultipleNegativesRankingLoss, "MultipleNegativesRankingLoss", {}, 3, None),
        (ek.MultipleNegativesRankingLoss, "MultipleNegativesRankingLoss",
         dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
              hardness_mode="all_negatives", hardness_strength=5.0), 2, None),
        (ek.MultipleNegativesSymmetricRankingLoss, "MultipleNegativesSymmetricRankingLoss", {}, 2, None),
        (ek.CoSENTLoss, "CoSENTLoss", {}, 2, "float"),
        (ek.AnglELoss, "AnglELoss", {}, 2, "float"),
    ],
)
def test_parameter_gradients_match_sentence_transformers(tiny_model, ours_cls, st_cls, kwargs, n_cols, labels):
    """float64 model: loss and every parameter gradient within 1e-8 of sentence-transformers'."""
    model = copy.deepcopy(tiny_model).eval().double()
    batch = 12
    feats = features(model, n_cols, batch, seed=3)
    label_tensor = torch.rand(batch, device=DEVICE, dtype=torch.float64) if labels else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_loss = getattr(st_losses, st_cls)(model, **kwargs)
    ours = ours_cls(model, **kwargs)

    model.zero_grad()
    ref = st_loss(feats, label_tensor)
    ref.backward()
    ref_grads = param_grads(model)
    model.zero_grad()
    loss = ours(feats, label_tensor)
    (loss * 1.0).backward()
    grads = param_grads(model)

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-8, atol=1e-12)
    assert_param_grads_close(grads, ref_grads, rtol=1e-8)


def test_sentence_transformer_trainer_runs_and_writes_model_card(tiny_model, tmp_path):
    """Four SentenceTransformerTrainer steps (float64 model, SGD): every parameter update within 1e-8 of the run
    with sentence-transformers' own loss, and the model card names our loss."""
    datasets = pytest.importorskip("datasets")

    train = datasets.Dataset.from_dict({"anchor": sentences(32, 1), "positive": sentences(32, 2),
                                        "negative": sentences(32, 3)})
    runs = [trainer_updates(copy.deepcopy(tiny_model).double(), lambda m, cls=cls: cls(m, scale=20.0), train,
                            tmp_path / "out", per_device_train_batch_size=8, logging_steps=1)
            for cls in (ek.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss)]
    (result, model, updates), (st_result, _, st_updates) = runs
    assert result.global_step == 4
    assert abs(result.training_loss - st_result.training_loss) <= 1e-8 * abs(st_result.training_loss)
    assert_param_grads_close(updates, st_updates, rtol=1e-8)
    model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "MultipleNegativesRankingLoss" in card and '"scale": 20.0' in card
