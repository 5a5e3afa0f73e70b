"""Checkpoints interchangeable with sentence-transformers 6.2 (issue 25, item 4): the state_dict of every cached loss
(and of MatryoshkaLoss over one) strict-loads into the other library's class both ways, with the same keys, and
``parameters()`` comes in the same order (so an optimizer's state lines up)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import embedloss_kernels.losses as ek_losses

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
pytest.importorskip("transformers")

CASES = (
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "CachedGISTEmbedLoss",
    "MatryoshkaLoss over CachedMultipleNegativesRankingLoss",
    "MatryoshkaLoss over CachedMultipleNegativesSymmetricRankingLoss",
    "MatryoshkaLoss over MultipleNegativesRankingLoss",
)


@pytest.fixture(scope="module")
def tiny(tiny_st):
    return tiny_st(dropout=0.0)


def build(case, lib, tiny, scale=None):
    model, guide = copy.deepcopy(tiny), copy.deepcopy(tiny)
    extra = {} if scale is None else dict(scale=scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "CachedGISTEmbedLoss":
            return lib.CachedGISTEmbedLoss(model, guide, mini_batch_size=4)
        if case.startswith("MatryoshkaLoss over "):
            inner_name = case.removeprefix("MatryoshkaLoss over ")
            inner = getattr(lib, inner_name)(model, **extra)
            return lib.MatryoshkaLoss(model, inner, [32, 16])
        return getattr(lib, case)(model, **extra)


def perturbed(state):
    """``state`` with every tensor changed (a shared tensor once), so a load that skipped a key would show."""
    out, seen = {}, {}
    for key, value in state.items():
        if value.data_ptr() not in seen:
            seen[value.data_ptr()] = value + 0.25 * torch.randn_like(value) if value.is_floating_point() else value
        out[key] = seen[value.data_ptr()]
    return out


@pytest.mark.parametrize("learnable_scale", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_state_dict_loads_both_ways_strict(case, tiny, learnable_scale):
    if learnable_scale and ("GIST" in case or not case.endswith("RankingLoss")):
        pytest.skip("no scale argument")
    scale = torch.nn.Parameter(torch.tensor(20.0)) if learnable_scale else None
    st = build(case, st_losses, tiny, scale=None if scale is None else torch.nn.Parameter(scale.detach().clone()))
    ours = build(case, ek_losses, tiny, scale=scale)
    assert list(ours.state_dict()) == list(st.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in st.named_parameters()]
    assert [p.shape for p in ours.parameters()] == [p.shape for p in st.parameters()]
    for source, target in ((st, ours), (ours, st)):
        state = perturbed(source.state_dict())
        result = target.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for key, value in target.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    # the optimizer state of one loads into an optimizer over the other's parameters
    opt_st = torch.optim.Adam(st.parameters())
    for p in st.parameters():
        p.grad = torch.ones_like(p)
    opt_st.step()
    opt_ours = torch.optim.Adam(ours.parameters())
    opt_ours.load_state_dict(opt_st.state_dict())
    for p_st, p_ours in zip(st.parameters(), ours.parameters()):
        torch.testing.assert_close(opt_ours.state[p_ours]["exp_avg"], opt_st.state[p_st]["exp_avg"])


def test_cached_inner_loss_holds_the_model_as_sentence_transformers(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CASES[:2]:
            st, ours = (getattr(lib, name)(tiny) for lib in (st_losses, ek_losses))
            assert st.loss.model is tiny and ours.loss.model is tiny
