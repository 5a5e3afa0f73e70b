"""The scale as sentence-transformers 6.2 takes it: a learnable tensor (its gradient on every backend, through
gather_across_devices and the gradient cache), and the values it accepts (inf, True, tensors, CoSENT's 0)."""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
from conftest import DEVICE, gloo_rank, spawn_gloo
from tiny_model import on_device, sentences

import embedloss_kernels as ek
from embedloss_kernels import dispatch, functional, reference

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")

ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# Scales and strengths exact in float32: the Triton kernels take Python floats as float32 scalars (a separate issue),
# and these tests are about the scale's gradient, not that rounding.
MNRL_OPTIONS = [
    dict(),
    dict(similarity="dot", scale=0.75),
    dict(directions=ALL_DIRECTIONS),
    dict(directions=ALL_DIRECTIONS, similarity="dot", scale=0.375, block_rows=2),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    dict(hardness_mode="in_batch_negatives", hardness_strength=0.75),
    dict(hardness_mode="hard_negatives", hardness_strength=0.75, similarity="dot", scale=0.5),
    dict(hardness_mode="all_negatives", hardness_strength=0.75, directions=("query_to_doc", "query_to_query")),
    dict(hardness_mode="all_negatives", hardness_strength=0.5, directions=("query_to_doc", "doc_to_query"),
         partition_mode="per_direction", block_rows=3),
]


def columns(n, batch=6, dim=7, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=gen, dtype=dtype).to(DEVICE) for _ in range(n)]


def learnable(value, dtype=torch.float64):
    return torch.nn.Parameter(torch.tensor(value, dtype=dtype, device=DEVICE))


def mnrl_reference(cols, scale, options):
    sim = reference.dot_score if options.get("similarity") == "dot" else reference.cos_sim
    return reference.infonce_reference(
        cols[0], cols[1:], scale, sim, options.get("directions", ("query_to_doc",)),
        options.get("partition_mode", "joint"), options.get("hardness_mode"), options.get("hardness_strength", 0.0))


def _name(options):
    return "-".join(f"{k}={v}" for k, v in options.items()) or "default"


# -- the gradient of a tensor scale, against the float64 reference ---------------------------------------------------
@pytest.mark.parametrize("options", MNRL_OPTIONS, ids=_name)
def test_mnrl_scale_gradient_matches_reference(backend, options):
    cols = [c.requires_grad_() for c in columns(3, seed=1)]
    opts = dict(options)
    ours_scale, ref_scale = learnable(opts.pop("scale", 20.0)), learnable(options.get("scale", 20.0))
    loss = functional.multiple_negatives_ranking_loss(*cols, scale=ours_scale, backend=backend, **opts)
    (loss * 3.0).backward()  # grad_output != 1
    ref_cols = [c.detach().clone().requires_grad_() for c in cols]
    ref = mnrl_reference(ref_cols, ref_scale, options)
    (ref * 3.0).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert ours_scale.grad is not None and ours_scale.grad.abs() > 1e-6
    torch.testing.assert_close(ours_scale.grad, ref_scale.grad, rtol=1e-8, atol=1e-10)
    for c, r in zip(cols, ref_cols):
        torch.testing.assert_close(c.grad, r.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("similarity", ["cosine", "dot", "angle"])
@pytest.mark.parametrize("value", [20.0, 0.0, -3.0])
def test_cosent_scale_gradient_matches_reference(backend, similarity, value):
    x, y = columns(2, seed=2)
    labels = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.7, 0.0], dtype=torch.float64, device=DEVICE)
    ours_scale, ref_scale = learnable(value), learnable(value)
    loss = functional.cosent_loss(x, y, labels, scale=ours_scale, similarity=similarity, backend=backend)
    loss.backward()
    sim = {"cosine": reference.pairwise_cos_sim, "dot": reference.pairwise_dot_score,
           "angle": reference.pairwise_angle_sim}[similarity]
    ref = reference.cosent_pairs_reference(x, y, labels, ref_scale, sim)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_scale.grad, ref_scale.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("options", [MNRL_OPTIONS[0], MNRL_OPTIONS[3], MNRL_OPTIONS[4], MNRL_OPTIONS[7]], ids=_name)
def test_gradcheck_scale(backend, options):
    # Only the scale moves: the hardness penalty (stop-gradient on the similarities) does not depend on it, so
    # finite differences see exactly the gradient the loss defines. The step is a power of two so that scale +- eps
    # stays exact where a kernel takes the scale as a float32 scalar (Triton today).
    cols = columns(3, seed=3)
    opts = dict(options)
    scale = torch.tensor(opts.pop("scale", 16.0), dtype=torch.float64, device=DEVICE, requires_grad=True)
    check = dict(eps=2.0**-10, atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(
        lambda s: functional.multiple_negatives_ranking_loss(*cols, scale=s, backend=backend, **opts), (scale,),
        **check)
    x, y = columns(2, seed=4)
    labels = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.7, 0.0], dtype=torch.float64, device=DEVICE)
    assert torch.autograd.gradcheck(lambda s: functional.cosent_loss(x, y, labels, scale=s, backend=backend), (scale,),
                                    **check)
    assert torch.autograd.gradcheck(lambda s: functional.angle_loss(x, y, labels=labels, scale=s, backend=backend),
                                    (scale,), **check)


def test_scale_jvp_and_no_grad_tensor_scale(backend):
    cols = columns(2, seed=5)
    f = lambda s: functional.multiple_negatives_ranking_loss(*cols, scale=s, backend=backend)  # noqa: E731
    r = lambda s: mnrl_reference(cols, s, {})  # noqa: E731
    s0, t = torch.tensor(15.0, dtype=torch.float64, device=DEVICE), torch.tensor(0.5, dtype=torch.float64,
                                                                                   device=DEVICE)
    torch.testing.assert_close(torch.func.jvp(f, (s0,), (t,))[1], torch.func.jvp(r, (s0,), (t,))[1], rtol=1e-8,
                               atol=1e-10)
    torch.testing.assert_close(torch.func.grad(f)(s0), torch.func.grad(r)(s0), rtol=1e-8, atol=1e-10)
    # a tensor scale that does not require grad is just a value
    torch.testing.assert_close(f(s0), r(s0), rtol=1e-10, atol=1e-12)


# -- the drop-in modules: a Parameter assigned to .scale, and the values sentence-transformers accepts ----------------
MODULES = [
    ("MultipleNegativesRankingLoss", dict(), 3),
    ("MultipleNegativesRankingLoss", dict(hardness_mode="all_negatives", hardness_strength=0.625,
                                          directions=ALL_DIRECTIONS), 3),
    ("MultipleNegativesSymmetricRankingLoss", dict(), 2),
    ("CoSENTLoss", dict(), 2),
    ("AnglELoss", dict(), 2),
]


def _module_loss(loss, cols):
    labels = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.7, 0.0], dtype=torch.float64, device=DEVICE)
    return loss.compute_loss_from_embeddings(cols, labels if isinstance(loss, (ek.CoSENTLoss,
                                                                                 st_losses.CoSENTLoss)) else None)


@pytest.mark.parametrize("name,kwargs,n_cols", MODULES, ids=lambda v: v if isinstance(v, str) else None)
def test_module_parameter_scale_matches_sentence_transformers(backend, monkeypatch, name, kwargs, n_cols):
    monkeypatch.setenv("EMBEDLOSS_BACKEND", backend)
    ours, theirs = getattr(ek, name)(None, **kwargs), getattr(st_losses, name)(None, **kwargs)
    for loss in (ours, theirs):
        loss.scale = torch.nn.Parameter(torch.tensor(17.0, dtype=torch.float64, device=DEVICE))
    assert isinstance(ours.scale, torch.nn.Parameter) and list(ours.parameters()) == [ours.scale]
    cols = columns(n_cols, seed=6)
    results = []
    for loss in (ours, theirs):
        value = _module_loss(loss, cols)
        value.backward()
        results.append((value.detach(), loss.scale.grad))
    (ours_loss, ours_grad), (st_loss, st_grad) = results
    torch.testing.assert_close(ours_loss, st_loss, rtol=1e-10, atol=1e-12)
    assert ours_grad is not None
    if set(kwargs.get("directions", ())) & {"query_to_query", "doc_to_doc"}:
        # sentence-transformers scales its -inf masked cells (-inf * scale), so its d loss / d scale is NaN there;
        # the float64 oracle masks after scaling
        assert st_grad.isnan()
        scale = learnable(17.0)
        mnrl_reference(cols, scale, kwargs).backward()
        st_grad = scale.grad
    torch.testing.assert_close(ours_grad, st_grad, rtol=1e-8, atol=1e-10)
    # a float32 Parameter with float32 embeddings: the gradient comes back in the Parameter's dtype
    ours.scale = torch.nn.Parameter(torch.tensor(17.0, device=DEVICE))
    _module_loss(ours, [c.float() for c in cols]).backward()
    assert ours.scale.grad.dtype == torch.float32 and ours.scale.grad.shape == ()


@pytest.mark.parametrize(
    "name,scale",
    [("MultipleNegativesRankingLoss", math.inf), ("MultipleNegativesRankingLoss", True),
     ("MultipleNegativesRankingLoss", "tensor"), ("MultipleNegativesSymmetricRankingLoss", 3),
     ("CoSENTLoss", 0), ("CoSENTLoss", 0.0), ("CoSENTLoss", -3.0), ("CoSENTLoss", False), ("CoSENTLoss", math.inf),
     ("CoSENTLoss", "tensor"), ("AnglELoss", 0.0), ("AnglELoss", True)],
)
def test_module_accepts_the_scales_sentence_transformers_accepts(backend, monkeypatch, name, scale):
    monkeypatch.setenv("EMBEDLOSS_BACKEND", backend)
    if scale == "tensor":
        scale = torch.tensor(12.5, dtype=torch.float64, device=DEVICE)
    cols = columns(2 if name != "MultipleNegativesRankingLoss" else 3, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = getattr(ek, name)(None, scale=scale), getattr(st_losses, name)(None, scale=scale)
    ours_loss, st_loss = _module_loss(ours, cols), _module_loss(theirs, cols)
    torch.testing.assert_close(ours_loss, st_loss, rtol=1e-10, atol=1e-12, equal_nan=True)
    if isinstance(scale, float) and math.isinf(scale):
        assert ours_loss.isnan()
    assert ours.get_config_dict()["scale"] is theirs.get_config_dict()["scale"]
    if hasattr(theirs, "temperature"):
        assert ours.temperature == theirs.temperature


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss"])
@pytest.mark.parametrize("scale", [0, -1.0, math.nan, False])
def test_mnrl_rejects_what_sentence_transformers_rejects(name, scale):
    with pytest.raises(ValueError, match="Scale must be a positive value"):
        getattr(st_losses, name)(None, scale=scale)
    with pytest.raises(ValueError, match="Scale must be a positive value"):
        getattr(ek, name)(None, scale=scale)


def test_bad_scale_types_and_values():
    with pytest.raises(TypeError, match="scale must be a real number"):
        ek.CoSENTLoss(None, scale="20")
    with pytest.raises(TypeError, match="one-element real tensor"):
        ek.MultipleNegativesRankingLoss(None, scale=torch.ones(2))
    with pytest.raises(ValueError, match="scale must not be NaN"):
        ek.CoSENTLoss(None, scale=math.nan)
    cols = columns(2, seed=8)
    with pytest.raises(ValueError, match="scale must be finite"):  # the functional API wants a finite scale
        functional.multiple_negatives_ranking_loss(*cols, scale=math.inf)
    with pytest.raises(ValueError, match="scale must be finite"):
        functional.cosent_loss(*cols, torch.rand(6, device=DEVICE), scale=-math.inf)


# -- the gradient cache ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_st):
    return tiny_st().eval()


@pytest.mark.parametrize("options", [dict(), dict(hardness_mode="in_batch_negatives", hardness_strength=2.0)],
                         ids=_name)
def test_cached_mnrl_learns_its_scale_like_sentence_transformers(tiny_model, options):
    model = copy.deepcopy(tiny_model).double()  # float64: held to 1e-8
    feats = [on_device(model.preprocess(sentences(5, seed=3 * c + 1)), model.device) for c in range(3)]
    grads = []
    for cls in (ek.CachedMultipleNegativesRankingLoss, st_losses.CachedMultipleNegativesRankingLoss):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss_fn = cls(model, mini_batch_size=2, **options)
        loss_fn.scale = torch.nn.Parameter(torch.tensor(15.0, device=model.device, dtype=torch.float64))
        assert isinstance(loss_fn.scale, torch.nn.Parameter)
        model.zero_grad()
        loss = loss_fn(feats, None)
        loss.backward()
        grads.append((loss.detach(), loss_fn.scale.grad))
    (ours_loss, ours_grad), (st_loss, st_grad) = grads
    torch.testing.assert_close(ours_loss, st_loss, rtol=1e-8, atol=1e-12)
    assert ours_grad is not None
    torch.testing.assert_close(ours_grad, st_grad, rtol=1e-8, atol=1e-12)


# -- gather_across_devices: both schedules, over a gloo process group (CPU on purpose) ---------------------------------
DIST_OPTIONS = [
    dict(),
    dict(similarity="dot", scale=0.6, directions=ALL_DIRECTIONS),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", hardness_mode="all_negatives",
         hardness_strength=0.7),
    dict(hardness_mode="hard_negatives", hardness_strength=0.7, block_rows=2),
]
WORLD, ROWS = 2, 3


def _dist_worker(rank, init_file, out_dir, backends_):
    with gloo_rank(rank, WORLD, init_file):
        out = {}
        for i, options in enumerate(DIST_OPTIONS):
            opts = dict(options)
            value = opts.pop("scale", 20.0)
            sim = opts.pop("similarity", "cosine")
            cols_world = columns(3, batch=WORLD * ROWS, seed=40 + i)
            for schedule in ("gather", "ring"):
                for name in backends_ if schedule == "gather" else backends_[:1]:
                    cols = [c.cpu()[rank * ROWS : (rank + 1) * ROWS].clone().requires_grad_() for c in cols_world]
                    scale = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))
                    loss = functional.infonce_across_devices(
                        cols[0], cols[1:], scale=scale, similarity=sim, schedule=schedule, backend=name,
                        hardness_mode=opts.get("hardness_mode"), hardness_strength=opts.get("hardness_strength", 0.0),
                        directions=opts.get("directions", ("query_to_doc",)),
                        partition_mode=opts.get("partition_mode", "joint"), block_rows=opts.get("block_rows", 0))
                    loss.backward()
                    out[i, schedule, name] = (loss.detach(), scale.grad.clone())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def test_scale_gradient_through_gather_across_devices(tmp_path):
    backends_ = [n for n in ("torch", "cpp") if dispatch.why_not(n, "cpu") is None]
    spawn_gloo(_dist_worker, WORLD, (str(tmp_path / "init"), str(tmp_path), backends_), 120)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for i, options in enumerate(DIST_OPTIONS):
        cols_world = [c.cpu() for c in columns(3, batch=WORLD * ROWS, seed=40 + i)]
        for rank in range(WORLD):
            # each rank's loss is the mean over its own rows against the world batch; DDP averages the gradients
            scale = torch.nn.Parameter(torch.tensor(options.get("scale", 20.0), dtype=torch.float64))
            sim = reference.dot_score if options.get("similarity") == "dot" else reference.cos_sim
            ref = reference.infonce_reference(
                cols_world[0], cols_world[1:], scale, sim, options.get("directions", ("query_to_doc",)),
                options.get("partition_mode", "joint"), options.get("hardness_mode"),
                options.get("hardness_strength", 0.0), row_start=rank * ROWS, row_count=ROWS)
            ref.backward()
            for key, (loss, grad) in results[rank].items():
                if key[0] != i:
                    continue
                torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12, msg=str(key))
                torch.testing.assert_close(grad, scale.grad, rtol=1e-8, atol=1e-10, msg=str(key))


@pytest.mark.parametrize("directions", [("query_to_doc", "query_to_query"), ("query_to_doc", "doc_to_doc"),
                                        ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")])
def test_scale_gradient_with_self_masks_is_finite_and_matches_finite_difference(backend, monkeypatch, directions):
    """query_to_query / doc_to_doc mask each row's own pair with -inf: sentence-transformers multiplies the masked
    logits by the scale, so its d loss / d scale is NaN; ours is finite and matches a fourth-order central difference
    (float64; measured relative error at most 3.4e-12 on every backend)."""
    monkeypatch.setenv("EMBEDLOSS_BACKEND", backend)
    gen = torch.Generator().manual_seed(4)
    cols = [torch.randn(6, 8, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3)]

    def value(s):
        return float(ek.MultipleNegativesRankingLoss(None, scale=s, directions=directions)
                     .compute_loss_from_embeddings(cols, None))

    grads = {}
    for lib in (st_losses, ek):
        scale = torch.nn.Parameter(torch.tensor(20.0, dtype=torch.float64, device=DEVICE))
        lib.MultipleNegativesRankingLoss(None, scale=scale, directions=directions) \
            .compute_loss_from_embeddings(cols, None).backward()
        grads[lib] = float(scale.grad)
    assert math.isnan(grads[st_losses])  # sentence-transformers' own gradient here
    h = 2.0 ** -10  # 20 +- h, 20 +- 2h are exact in float32 too (the triton backend passes the scale as fp32)
    fd = (8 * (value(20 + h) - value(20 - h)) - (value(20 + 2 * h) - value(20 - 2 * h))) / (12 * h)
    assert math.isfinite(grads[ek])
    assert abs(grads[ek] - fd) <= 2e-11 * abs(fd), (grads[ek], fd)
