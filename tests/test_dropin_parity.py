"""The drop-in modules against sentence-transformers 6.2: constructor signatures and defaults, and the inputs it
accepts (infinite / NaN hardness, similarity_fct=None, odd cached mini_batch_size values, NaN embeddings and
labels) behaving as it does; the deliberate differences are the README's table."""

import inspect
import logging
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE

import embedloss_kernels as ek
from embedloss_kernels import functional

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")

CLASSES = (
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "CoSENTLoss",
    "AnglELoss",
)
CACHED = {"CachedMultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss"}


def st_and_ours(name, *args, **kwargs):
    """Both classes built with the same arguments (deprecation warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(st_losses, name)(*args, **kwargs), getattr(ek, name)(*args, **kwargs)


def parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


# -- signatures --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLASSES)
def test_constructor_signature_and_defaults_match(name):
    """Same parameter names, order, kinds and default objects as sentence-transformers 6.2; the only additions are
    the README's: ``model=None`` for the non-cached losses, keyword-only ``sort_by_length`` for the cached ones."""
    st, ours = parameters(getattr(st_losses, name).__init__), parameters(getattr(ek, name).__init__)
    expected = list(st)
    if name in CACHED:
        assert ours[-1] == ("sort_by_length", inspect.Parameter.KEYWORD_ONLY, True)
        ours = ours[:-1]
    else:
        assert expected[1] == ("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty)
        expected[1] = ("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, None)
    assert [p[:2] for p in ours] == [p[:2] for p in expected]
    for (pname, _, ours_default), (_, _, st_default) in zip(ours, expected):
        if callable(st_default):
            assert ours_default is st_default, pname  # util.cos_sim itself, not a look-alike
        else:
            assert ours_default == st_default, pname


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("method", ["forward", "compute_loss_from_embeddings", "get_config_dict", "calculate_loss"])
def test_method_signatures_match(name, method):
    st_cls, ours_cls = getattr(st_losses, name), getattr(ek, name)
    if not hasattr(st_cls, method):  # the same surface: ours has no method sentence-transformers' class lacks
        assert not hasattr(ours_cls, method), f"{name}.{method} exists only in embedloss_kernels"
        return
    st, ours = parameters(getattr(st_cls, method)), parameters(getattr(ours_cls, method))
    assert ours == st  # e.g. forward(sentence_features, labels): labels has no default there either


def test_default_similarities_are_sentence_transformers_objects():
    assert ek.MultipleNegativesRankingLoss(None).similarity_fct is st_util.cos_sim
    assert ek.CoSENTLoss(None).similarity_fct is st_util.pairwise_cos_sim
    assert ek.AnglELoss(None).similarity_fct is st_util.pairwise_angle_sim


def test_package_imports_and_runs_without_sentence_transformers():
    code = (
        "import sys; sys.modules['sentence_transformers'] = None\n"
        "import torch, embedloss_kernels as ek\n"
        "from embedloss_kernels import reference\n"
        "loss = ek.MultipleNegativesRankingLoss(None)\n"
        "assert loss.similarity_fct is reference.cos_sim\n"
        "assert ek.CoSENTLoss(None).similarity_fct is reference.pairwise_cos_sim\n"
        "q, p = torch.randn(4, 8), torch.randn(4, 8)\n"
        "a = loss.compute_loss_from_embeddings([q, p], None)\n"
        "b = ek.multiple_negatives_ranking_loss(q, p)\n"
        "assert torch.equal(a, b), (a, b)\n"
        "print(loss.get_config_dict()['similarity_fct'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "cos_sim"


def test_import_embedloss_kernels_does_not_import_sentence_transformers():
    code = "import sys, embedloss_kernels; print('sentence_transformers' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-3000:]


# -- deprecations ------------------------------------------------------------------------------------------------
SYMMETRIC = ["MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss"]


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetric_losses_are_deprecated_as_in_sentence_transformers(name, tiny_st):
    model = tiny_st() if name in CACHED else None
    for cls in (getattr(st_losses, name), getattr(ek, name)):
        with pytest.warns(DeprecationWarning, match=name):
            cls(model)
    with warnings.catch_warnings():  # the non-symmetric losses do not warn
        warnings.simplefilter("error", DeprecationWarning)
        ek.MultipleNegativesRankingLoss(None)
        if model is not None:
            ek.CachedMultipleNegativesRankingLoss(model)


# -- inputs sentence-transformers accepts ------------------------------------------------------------------------
def columns(n=3, batch=6, dim=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=gen, dtype=dtype).to(DEVICE) for _ in range(n)]


@pytest.mark.parametrize("mode", ["in_batch_negatives", "hard_negatives", "all_negatives"])
@pytest.mark.parametrize("strength", [math.inf, math.nan, 3])
def test_hardness_strength_values_sentence_transformers_accepts(mode, strength):
    st, ours = st_and_ours("MultipleNegativesRankingLoss", None, hardness_mode=mode, hardness_strength=strength)
    cols = columns()
    expected = st.compute_loss_from_embeddings(cols, None)
    got = ours.compute_loss_from_embeddings(cols, None)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0, equal_nan=True)
    assert repr(ours.get_config_dict()) == repr(st.get_config_dict())
    with pytest.raises(ValueError, match="hardness_strength"):  # the functional API stays strict
        functional.multiple_negatives_ranking_loss(*cols, hardness_mode=mode, hardness_strength=math.inf)


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CoSENTLoss"])
def test_similarity_fct_none_is_accepted_then_fails_as_in_sentence_transformers(name):
    st, ours = st_and_ours(name, None, similarity_fct=None)
    assert ours.similarity_fct is None and st.similarity_fct is None
    cols = columns(2)
    labels = torch.rand(6, dtype=torch.float64, device=DEVICE)
    for loss in (st, ours):
        with pytest.raises(TypeError):
            loss.compute_loss_from_embeddings(cols, labels)
    if name == "MultipleNegativesRankingLoss":
        assert ours.get_config_dict() == st.get_config_dict()


@pytest.fixture(scope="module")
def tiny_model(tiny_st):
    return tiny_st(dropout=0.0).eval()


def text_features(model, batch=8):
    from tiny_model import sentences

    return [model.preprocess(sentences(batch, seed)) for seed in (1, 2)]


@pytest.mark.parametrize("size, error", [(0, ValueError), (2.5, TypeError)])
def test_cached_bad_mini_batch_size_accepted_then_fails_in_forward_as_in_sentence_transformers(tiny_model, size,
                                                                                               error):
    st, ours = st_and_ours("CachedMultipleNegativesRankingLoss", tiny_model, mini_batch_size=size)
    assert ours.mini_batch_size == size and ours.get_config_dict()["mini_batch_size"] == size
    for loss in (st, ours):
        with pytest.raises(error):
            loss(text_features(tiny_model), None)


def test_cached_numpy_integer_mini_batch_size(tiny_model):
    """issue 15, item 7: np.int64(4) works as 4 (sentence-transformers' range() takes it)."""
    feats = text_features(tiny_model)
    st, ours = st_and_ours("CachedMultipleNegativesRankingLoss", tiny_model, mini_batch_size=np.int64(4))
    _, reference = st_and_ours("CachedMultipleNegativesRankingLoss", tiny_model, mini_batch_size=4)
    got = ours(feats, None)
    torch.testing.assert_close(got, reference(feats, None))
    torch.testing.assert_close(got, st(feats, None), rtol=1e-5, atol=1e-6)
    assert ours.get_config_dict()["mini_batch_size"] == 4


# -- NaN / Inf ---------------------------------------------------------------------------------------------------
def count_nonfinite_warnings(caplog):
    return sum("NaN or Inf" in r.message for r in caplog.records if r.name == "embedloss_kernels")


@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_embeddings_give_sentence_transformers_loss_and_one_warning(monkeypatch, caplog, backend, similarity,
                                                                        bad):
    monkeypatch.setenv("EMBEDLOSS_BACKEND", backend)
    monkeypatch.delenv("EMBEDLOSS_CHECK_FINITE", raising=False)
    fn = getattr(st_util, similarity)
    st, ours = st_and_ours("MultipleNegativesRankingLoss", None, similarity_fct=fn)
    cols = columns(3, dtype=torch.float32)
    cols[1][2, 3] = bad
    before = [c.clone() for c in cols]
    cols = [c.requires_grad_() for c in cols]
    expected = st.compute_loss_from_embeddings(cols, None)
    with caplog.at_level(logging.WARNING, logger="embedloss_kernels"):
        got = ours.compute_loss_from_embeddings(cols, None)
        ours.compute_loss_from_embeddings(cols, None)
    assert not torch.isfinite(got)
    torch.testing.assert_close(got, expected.float(), equal_nan=True)
    assert count_nonfinite_warnings(caplog) == 1
    got.backward()  # the gradients are not finite either, so GradScaler skips the step
    assert not all(bool(torch.isfinite(c.grad).all()) for c in cols)
    for c, b in zip(cols, before):
        torch.testing.assert_close(c.detach(), b, equal_nan=True)


def test_nan_embeddings_strict_paths(monkeypatch, caplog):
    cols = columns(2, dtype=torch.float32)
    cols[0][0, 0] = math.nan
    monkeypatch.delenv("EMBEDLOSS_CHECK_FINITE", raising=False)
    with pytest.raises(ValueError, match="NaN or Inf"):  # the functional API is strict by default
        functional.multiple_negatives_ranking_loss(*cols)
    for value in ("1", "true", "YES", "on"):  # and the variable makes the modules strict too
        monkeypatch.setenv("EMBEDLOSS_CHECK_FINITE", value)
        with pytest.raises(ValueError, match="NaN or Inf"):
            ek.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(cols, None)
        with pytest.raises(ValueError, match="NaN or Inf"):
            ek.CoSENTLoss(None).compute_loss_from_embeddings(cols, torch.rand(6, device=DEVICE))
    for value in ("0", "false", "No", "off"):  # no check, no warning, on either path
        monkeypatch.setenv("EMBEDLOSS_CHECK_FINITE", value)
        with caplog.at_level(logging.WARNING, logger="embedloss_kernels"):
            assert torch.isnan(functional.multiple_negatives_ranking_loss(*cols))
            assert torch.isnan(ek.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(cols, None))
        assert count_nonfinite_warnings(caplog) == 0


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
def test_check_finite_variable_rejects_other_values(monkeypatch, value):
    monkeypatch.setenv("EMBEDLOSS_CHECK_FINITE", value)
    with pytest.raises(ValueError, match="EMBEDLOSS_CHECK_FINITE must be one of .* got '" + value):
        functional.multiple_negatives_ranking_loss(*columns(2))
    with pytest.raises(ValueError, match="EMBEDLOSS_CHECK_FINITE"):
        ek.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(columns(2), None)


@pytest.mark.parametrize(
    "labels",
    [
        [0.1, math.nan, 0.5, 0.2, 0.9, 0.3],
        [0.1, math.nan, 0.5, math.nan, 0.9, 0.3],
        [math.nan] * 6,
        [0.5, 0.1, 0.3, 0.2, 0.9, math.nan],
        [math.nan, 0.2, 0.2, 0.2, 0.7, 0.2],
        [0.1, math.inf, 0.5, -math.inf, 0.9, 0.3],
    ],
)
@pytest.mark.parametrize("name", ["CoSENTLoss", "AnglELoss"])
def test_nan_labels_give_what_sentence_transformers_gives(monkeypatch, backend, name, labels):
    monkeypatch.setenv("EMBEDLOSS_BACKEND", backend)
    monkeypatch.delenv("EMBEDLOSS_CHECK_FINITE", raising=False)
    st, ours = st_and_ours(name, None)
    cols = [c.requires_grad_() for c in columns(2)]
    lab = torch.tensor(labels, dtype=torch.float64, device=DEVICE)
    expected = st.compute_loss_from_embeddings(cols, lab)
    got = ours.compute_loss_from_embeddings(cols, lab)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    st_grads = torch.autograd.grad(expected, cols)
    ours_grads = torch.autograd.grad(got, cols)
    for g, e in zip(ours_grads, st_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="NaN or Inf"):  # the functional API stays strict
        functional.cosent_loss(*cols, lab)


# -- the once-only warning for an unfused similarity ------------------------------------------------------------
def test_unfused_warning_is_keyed_by_callable_not_name(caplog):
    cols = columns(2)
    labels = torch.rand(6, dtype=torch.float64, device=DEVICE)
    mnrl_sim = lambda a, b: a @ b.T  # noqa: E731 - two lambdas share the name "<lambda>"
    cosent_sim = lambda a, b: (a * b).sum(-1)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="embedloss_kernels"):
        ek.MultipleNegativesRankingLoss(None, similarity_fct=mnrl_sim).compute_loss_from_embeddings(cols, None)
        ek.MultipleNegativesRankingLoss(None, similarity_fct=mnrl_sim).compute_loss_from_embeddings(cols, None)
        ek.CoSENTLoss(None, similarity_fct=cosent_sim).compute_loss_from_embeddings(cols, labels)
        other = lambda a, b: a @ b.T  # noqa: E731 - same name and code, another callable
        ek.MultipleNegativesRankingLoss(None, similarity_fct=other).compute_loss_from_embeddings(cols, None)
    messages = [r.message for r in caplog.records if "is not fused" in r.message]
    assert len(messages) == 3, messages


def test_cosent_loss_options_are_keyword_only():
    x, y = columns(2)
    labels = torch.rand(6, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError):
        functional.cosent_loss(x, y, labels, 5.0)
    torch.testing.assert_close(functional.cosent_loss(x, y, labels, scale=5.0),
                               ek.CoSENTLoss(None, scale=5.0).compute_loss_from_embeddings([x, y], labels))
