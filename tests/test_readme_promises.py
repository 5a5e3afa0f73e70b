"""README promises that had no test (issue 24, list 5)."""

import warnings

import pytest
import torch
from conftest import PassThroughModel, assert_float64_close, loss_and_grads, seeded_columns

import embedloss_kernels as ek
from embedloss_kernels import functional

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")


def test_tensor_hardness_strength_is_a_type_error():
    """README: hardness_strength is a number; a tensor is a TypeError naming the argument (functional and module)."""
    q, p = seeded_columns(0, 2, 4, 6)
    with pytest.raises(TypeError, match="hardness_strength"):
        functional.multiple_negatives_ranking_loss(q, p, hardness_mode="in_batch_negatives",
                                                   hardness_strength=torch.tensor(2.0))
    with pytest.raises(TypeError, match="hardness_strength"):
        ek.MultipleNegativesRankingLoss(None, hardness_mode="in_batch_negatives",
                                        hardness_strength=torch.tensor(2.0)).compute_loss_from_embeddings([q, p], None)


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["GISTEmbedLoss", "CachedGISTEmbedLoss"])
def test_gist_modules_raise_on_non_finite_margin(tiny_model, name, margin):
    """README: a non-finite margin is a ValueError of the GIST modules (not only of the functional API)."""
    from embedloss_kernels import losses

    cls = getattr(losses, name)


    with pytest.raises(ValueError, match="margin"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(tiny_model, tiny_model, margin=margin)


@pytest.mark.parametrize("dims,weights", [([12, 6, 3], [1.0, 0.5, 2.0]), ([12, 4], None)])
def test_matryoshka_over_plain_symmetric_mnrl_matches_sentence_transformers(dims, weights):
    """README: plain MultipleNegativesSymmetricRankingLoss as the inner loss (one fused call), float64 within 1e-8
    of sentence-transformers' MatryoshkaLoss over its MNSRL."""
    model = PassThroughModel(12)
    columns = seeded_columns(3, 2, 7, 12)
    results = []
    for lib in (ek, st_losses):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = lib.MatryoshkaLoss(model, lib.MultipleNegativesSymmetricRankingLoss(model, scale=15.0), dims,
                                      weights)
        results.append(loss_and_grads(lambda c, loss=loss: loss([{"embedding": x} for x in c], None), columns))
    (loss, grads), (ref, ref_grads) = results
    assert_float64_close(loss, ref, what="loss")
    for g, r in zip(grads, ref_grads):
        assert_float64_close(g, r, what="gradient")


def test_losses_built_before_patching_keep_their_class():
    """README: patching replaces the classes in sentence-transformers' namespace; a loss built before keeps its
    class (and after unpatching, one built while patched keeps ours)."""
    from embedloss_kernels import patching

    was_patched = patching.is_patched()
    patching.unpatch_sentence_transformers()
    try:
        before = st_losses.MultipleNegativesRankingLoss(None)
        patching.patch_sentence_transformers()
        during = st_losses.MultipleNegativesRankingLoss(None)
        patching.unpatch_sentence_transformers()
        assert not isinstance(before, ek.MultipleNegativesRankingLoss)
        assert type(before).__module__.startswith("sentence_transformers")
        assert isinstance(during, ek.MultipleNegativesRankingLoss)
        assert type(during) is ek.MultipleNegativesRankingLoss
    finally:
        (patching.patch_sentence_transformers if was_patched else patching.unpatch_sentence_transformers)()
