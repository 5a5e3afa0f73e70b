"""The gradient-cached losses: equal to the plain loss (eval), same dropout replay (train), trainer, Matryoshka,
model card, bad input. The model and its inputs live on conftest's DEVICE; the gloo test runs on CPU on purpose."""

import copy
import math
import warnings

import pytest
import torch
from conftest import (
    DEVICE,
    assert_param_grads_close,
    assert_within_measured_error,
    gloo_rank,
    param_grads,
    spawn_gloo,
    trainer_updates,
)
from tiny_model import WORDS, on_device, sentences

import embedloss_kernels as ek
from embedloss_kernels.losses.cached_multiple_negatives_ranking import length_sorted

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
pytest.importorskip("transformers")

OPTIONS = [
    dict(),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
    dict(hardness_mode="in_batch_negatives", hardness_strength=5.0),
    dict(hardness_mode="hard_negatives", hardness_strength=5.0, scale=10.0),
    dict(hardness_mode="all_negatives", hardness_strength=2.0, directions=("query_to_doc", "query_to_query")),
]


def mixed_sentences(n: int, seed: int, shortest: int = 1, longest: int = 12) -> list[str]:
    """Sentences of random lengths: the cached loss then sorts rows by token count before mini-batching."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=gen).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=gen).tolist()) for k in lengths]


def features(model, n_cols, batch, seed=0):
    return [on_device(model.preprocess(mixed_sentences(batch, seed + 7 * c)), model.device) for c in range(n_cols)]


# float32 parameter gradients (conftest's assert_param_grads_close): 1e-4 relative, plus 1e-6 of the whole gradient's
# norm on a gradient that is zero by symmetry
FP32_GRADS = dict(rtol=1e-4, zero_floor=1e-6)


def run(loss_fn, model, feats, grad_scale=1.0):
    model.zero_grad()
    loss = loss_fn(feats, None)
    (loss * grad_scale).backward()
    return loss.detach(), param_grads(model)


@pytest.mark.parametrize("n_cols", [2, 3])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_eval_mode_equals_plain_mnrl(tiny_model, options, n_cols):
    """float64 model: the cached loss and every parameter gradient within 1e-8 of sentence-transformers' MNRL."""
    model = copy.deepcopy(tiny_model).eval().double()
    feats = features(model, n_cols, batch=13)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = st_losses.MultipleNegativesRankingLoss(model, **options)
    ref_loss, ref_grads = run(plain, model, feats, grad_scale=3.0)
    cached = ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=5, **options)
    loss, grads = run(cached, model, feats, grad_scale=3.0)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-12)
    assert_param_grads_close(grads, ref_grads, rtol=1e-8)


def test_train_mode_replays_dropout_masks(tiny_model):
    """With dropout on, the cached gradients equal a non-cached computation that uses the same dropout masks:
    (a) one mini-batch per column against plain per-column forwards after the same seed; (b) small mini-batches
    in row order against sentence-transformers' own cached loss, which replays the same RNG states."""
    model = copy.deepcopy(tiny_model).train()
    feats = features(model, 3, batch=10, seed=5)

    torch.manual_seed(123)
    model.zero_grad()
    embeddings = [model(f)["sentence_embedding"] for f in feats]
    plain = ek.MultipleNegativesRankingLoss(model).compute_loss_from_embeddings(embeddings, None)
    plain.backward()
    ref_loss, ref_grads = plain.detach(), param_grads(model)

    torch.manual_seed(123)
    loss, grads = run(ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=64, sort_by_length=False), model,
                      feats)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_param_grads_close(grads, ref_grads, **FP32_GRADS)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_cached = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
    torch.manual_seed(7)
    st_loss, st_grads = run(st_cached, model, feats)
    torch.manual_seed(7)
    loss, grads = run(ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, sort_by_length=False), model,
                      feats)
    torch.testing.assert_close(loss, st_loss, rtol=1e-5, atol=1e-6)
    assert_param_grads_close(grads, st_grads, **FP32_GRADS)


def test_train_mode_length_sorted_minibatches_replay_their_masks(tiny_model):
    """Length-sorted mini-batches in train mode: the gradients equal a non-cached computation that embeds the same
    sorted mini-batches with grad, in the same order after the same seed (so the same dropout masks), restores the
    row order and takes plain MNRL."""
    from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges

    model = copy.deepcopy(tiny_model).train()
    feats = features(model, 3, batch=11, seed=9)
    torch.manual_seed(321)
    model.zero_grad()
    columns = []
    for feature in feats:
        ordered, inverse = length_sorted(feature)
        assert inverse is not None  # mixed lengths: the rows really are reordered
        parts = [model(_create_minibatch(ordered, b, e))["sentence_embedding"]
                 for b, e in _minibatch_ranges(ordered, 4)]
        columns.append(torch.cat(parts).index_select(0, inverse))
    ref = ek.MultipleNegativesRankingLoss(model).compute_loss_from_embeddings(columns, None)
    ref.backward()
    ref_loss, ref_grads = ref.detach(), param_grads(model)

    torch.manual_seed(321)
    loss, grads = run(ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), model, feats)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_param_grads_close(grads, ref_grads, **FP32_GRADS)


def test_length_sorting_embeds_less_padding_and_keeps_inputs(tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    feats = [on_device(model.preprocess(mixed_sentences(48, seed, longest=30))) for seed in (4, 5)]
    snapshot = [{k: v.clone() if torch.is_tensor(v) else v for k, v in f.items()} for f in feats]
    widths = []
    handle = model[0].register_forward_pre_hook(lambda mod, args: widths.append(tuple(args[0]["input_ids"].shape)))
    try:
        results = {}
        for sort in (False, True):
            widths.clear()
            loss_fn = ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, sort_by_length=sort)
            results[sort] = run(loss_fn, model, feats)
            results[sort] += (sum(r * w for r, w in widths),)
    finally:
        handle.remove()
    assert results[True][2] < 0.8 * results[False][2]  # embedded token slots (rows x padded width), both passes
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    assert_param_grads_close(results[True][1], results[False][1], **FP32_GRADS)
    for f, snap in zip(feats, snapshot):  # the caller's features are untouched
        assert f.keys() == snap.keys()
        assert all(torch.equal(f[k], snap[k]) if torch.is_tensor(f[k]) else f[k] == snap[k] for k in f)

    ordered, inverse = length_sorted(feats[0])
    lengths = ordered["attention_mask"].sum(1)
    assert bool((lengths[1:] <= lengths[:-1]).all())  # longest first
    assert all(torch.equal(ordered[k].index_select(0, inverse), v) for k, v in feats[0].items() if torch.is_tensor(v))
    same_length = on_device(model.preprocess(sentences(6, 3)))
    assert length_sorted(same_length)[1] is None  # already in order: nothing to do
    # left padding: the mixin keeps it, so reordering would save nothing
    left = {k: v.flip(1) if torch.is_tensor(v) else v for k, v in feats[0].items()}
    assert length_sorted(left)[1] is None
    with pytest.raises(TypeError, match="sort_by_length must be a bool"):
        ek.CachedMultipleNegativesRankingLoss(model, sort_by_length="yes")


def test_symmetric_and_config(tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    feats = features(model, 2, batch=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_sym = st_losses.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=4)
        st_plain = st_losses.MultipleNegativesSymmetricRankingLoss(model)
    ours = ek.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=4)
    ref_loss, ref_grads = run(st_plain, model, feats)
    loss, grads = run(ours, model, feats)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    assert_param_grads_close(grads, ref_grads, **FP32_GRADS)
    assert ours.get_config_dict() == st_sym.get_config_dict()
    assert ours.citation == st_sym.citation and ours.temperature == st_sym.temperature
    ours.scale = 10.0  # hyperparameters live on the wrapped loss, as upstream
    assert ours.loss.scale == 10.0 and ours.get_config_dict()["scale"] == 10.0


def test_no_grad_returns_loss_only(tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    feats = features(model, 2, batch=6)
    with torch.no_grad():
        loss = ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)(feats, None)
        plain = ek.MultipleNegativesRankingLoss(model)(feats, None)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)


def test_matryoshka_wrapping_matches_sentence_transformers(tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    feats = features(model, 2, batch=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_cached = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
        st_loss = st_losses.MatryoshkaLoss(model, st_cached, matryoshka_dims=[32, 16, 8])
        ours = st_losses.MatryoshkaLoss(model, ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3),
                                        matryoshka_dims=[32, 16, 8])
    ref_loss, ref_grads = run(st_loss, model, feats)
    loss, grads = run(ours, model, feats)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
    assert_param_grads_close(grads, ref_grads, **FP32_GRADS)


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_with_cached_loss(tiny_model, tmp_path, bf16):
    """Two trainer steps (SGD) with our cached loss against sentence-transformers' CachedMNRL, same seed: float64
    updates within 1e-8; under bf16 autocast within 4x the measured difference of the float32 runs' updates from the
    float64 ones (round-off of the plain computation), and the model card names our loss."""
    datasets = pytest.importorskip("datasets")

    train = datasets.Dataset.from_dict({"anchor": sentences(24, 1), "positive": sentences(24, 2)})

    def run_pair(model, **args):
        return [trainer_updates(model, lambda m, cls=cls: cls(m, mini_batch_size=4, show_progress_bar=False), train,
                                tmp_path / "out", per_device_train_batch_size=12, **args)
                for cls in (ek.CachedMultipleNegativesRankingLoss, st_losses.CachedMultipleNegativesRankingLoss)]

    if not bf16:
        (result, model, updates), (_, _, st_updates) = run_pair(copy.deepcopy(tiny_model).double())
        assert_param_grads_close(updates, st_updates, rtol=1e-8)
    else:
        (result, model, updates), (_, _, st_updates) = run_pair(tiny_model, bf16=True)
        _, _, exact = run_pair(copy.deepcopy(tiny_model).double())[1]
        flat = [torch.cat([u[k].double().flatten() for k in sorted(exact)]) for u in (updates, st_updates, exact)]
        assert_within_measured_error(flat[0], flat[2], flat[1], dtype=torch.bfloat16, what="bf16 trainer updates")
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "CachedMultipleNegativesRankingLoss" in card and '"mini_batch_size": 4' in card


def test_progress_bars(tiny_model, capsys):
    model = copy.deepcopy(tiny_model).eval()
    loss = ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, show_progress_bar=True)
    loss(features(model, 2, batch=7), None).backward()
    assert "Embed mini-batches" in capsys.readouterr().err


def test_bad_input(tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    # the constructor takes any mini_batch_size, as sentence-transformers'; forward fails on a bad one
    for bad in (0, -3):
        with pytest.raises(ValueError, match="mini_batch_size must be a positive integer"):
            ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=bad)(features(model, 2, batch=4), None)
    with pytest.raises(TypeError, match="mini_batch_size must be a positive integer, got float"):
        ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2.5)(features(model, 2, batch=4), None)
    with pytest.raises(ValueError, match="mini_batch_num_tokens"):
        ek.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=0)
    with pytest.raises(ValueError, match="Scale must be a positive value"):
        ek.CachedMultipleNegativesRankingLoss(model, scale=-1.0)
    with pytest.raises(ValueError, match="needs a SentenceTransformer"):
        ek.CachedMultipleNegativesRankingLoss(None)
    with pytest.raises(ValueError, match="Expected at least 2 inputs"):
        ek.CachedMultipleNegativesRankingLoss(model)(features(model, 1, batch=4), None)
    mismatched = [on_device(model.preprocess(sentences(6, 1))), on_device(model.preprocess(sentences(5, 2)))]
    with pytest.raises(ValueError, match="batch size 5"):
        ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)(mismatched, None)

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    static = SentenceTransformer(modules=[StaticEmbedding(tok, embedding_dim=8)], device=str(DEVICE))
    with pytest.raises(ValueError, match="StaticEmbedding"):
        ek.CachedMultipleNegativesRankingLoss(static)


def _cached_gather_worker(rank, world, init_file, model_dir, out_dir):
    # gloo is a CPU process group: this test runs on CPU on purpose, whatever DEVICE is.
    from sentence_transformers import SentenceTransformer

    with gloo_rank(rank, world, init_file):
        model = SentenceTransformer(model_dir, device="cpu").eval()
        feats = features(model, 3, batch=5, seed=11 + 3 * rank)
        results = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st_loss = st_losses.CachedMultipleNegativesRankingLoss(
                model, mini_batch_size=2, gather_across_devices=True, hardness_mode="all_negatives",
                hardness_strength=3.0,
            )
        ours = ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, gather_across_devices=True,
                                                     hardness_mode="all_negatives", hardness_strength=3.0)
        for name, loss_fn in (("st", st_loss), ("ours", ours)):
            results[name] = run(loss_fn, model, feats)
        torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_cached_with_gather_across_devices_matches_sentence_transformers(tiny_model, tmp_path):
    """Two gloo ranks: our cached loss with gather_across_devices gives each rank the loss and parameter
    gradients of sentence-transformers' cached loss under the same setup."""
    model_dir = tmp_path / "model"
    tiny_model.save(str(model_dir))
    spawn_gloo(_cached_gather_worker, 2, (2, str(tmp_path / "init"), str(model_dir), str(tmp_path)), 120)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(res["ours"][0], res["st"][0], rtol=1e-4, atol=1e-6)
        assert_param_grads_close(res["ours"][1], res["st"][1], **FP32_GRADS)
