"""Fused Matryoshka MNRL against sentence-transformers 6.2's ``MatryoshkaLoss`` on every backend.

float64: loss and every embedding gradient within 1e-8 of sentence-transformers, over random configurations of
every MNRL option, dims including D and one below 16, non-uniform weights and ``n_dims_per_step`` with seeds.
float32: error against the float64 result at most 4x sentence-transformers' own float32 error.
"""

import copy
import functools
import os
import random
import warnings

import pytest
import torch
from conftest import (
    DEVICE,
    DIRECTION_SETS,
    HARDNESS,
    PassThroughModel,
    assert_within_measured_error,
    gloo_rank,
    is_informative,
    is_interpreted,
    loss_and_grads,
    rel_err,
    spawn_gloo,
)
from torch import nn

import embedloss_kernels as ek
from embedloss_kernels import dispatch, functional, reference
from embedloss_kernels.losses.matryoshka import draw_dim_indices

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")


def random_config(seed: int, small: bool) -> dict:
    return dict(_drawn_config(seed, small))  # a copy: callers may change theirs


@functools.cache
def _drawn_config(seed: int, small: bool) -> dict:
    """A random configuration, drawn again while degenerate (issue 24): a prefix of width 1 (its cosine gradient is
    exactly 0) is never drawn, nor one row without negatives; a draw whose float64 anchor gradient on
    ``make_columns(cfg, ., seed)`` is below ``INFORMATIVE_FRACTION`` of the scale (a saturated softmax) is redrawn."""
    rng = random.Random(seed)
    cfg = draw_config(rng, small)
    while cfg["batch"] == 1 and cfg["n_neg"] == 0 or not is_informative(anchor_gradient(cfg, seed), cfg["scale"]):
        cfg = draw_config(rng, small)
    return cfg


def anchor_gradient(cfg, seed):
    columns = make_columns(cfg, torch.float64, seed)
    return loss_and_grads(module_loss(matryoshka_module(cfg, False), seed), columns)[1][0]


def draw_config(rng, small: bool) -> dict:
    directions = rng.choice(DIRECTION_SETS)
    per_direction_ok = not set(directions) & {"query_to_query", "doc_to_doc"}
    dim = rng.choice([17, 24, 33] if small else [17, 40, 64, 97])
    n_dims = rng.randint(1, 4)
    dims = sorted({dim, rng.randint(2, 15), *(rng.randint(2, dim) for _ in range(n_dims - 1))}, reverse=True)
    return dict(
        batch=rng.choice([1, 2, 5, 9] if small else [1, 2, 7, 33, 70]),
        dim=dim,
        n_neg=rng.randint(0, 2),
        scale=rng.choice([1.0, 7.5, 20.0, 50.0]),
        cosine=rng.random() < 0.7,
        directions=directions,
        partition_mode=rng.choice(["joint", "per_direction"]) if per_direction_ok else "joint",
        hardness_mode=rng.choice(HARDNESS),
        hardness_strength=rng.choice([0.5, 5.0]),
        block_rows=rng.choice([0, 1, 3]),
        dims=dims,
        weights=[rng.choice([1, 0.5, 2.0, 0.25, 3]) for _ in dims],
        n_dims_per_step=rng.choice([-1, -1, 1, 2]),
    )


def make_columns(cfg, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg["batch"], cfg["dim"])
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for _ in range(2 + cfg["n_neg"])]


def mnrl_kwargs(cfg, ours: bool):
    sim = (reference.cos_sim if ours else st_util.cos_sim) if cfg["cosine"] else (
        reference.dot_score if ours else st_util.dot_score)
    return dict(scale=cfg["scale"], similarity_fct=sim, directions=cfg["directions"],
                partition_mode=cfg["partition_mode"], hardness_mode=cfg["hardness_mode"],
                hardness_strength=cfg["hardness_strength"])


def matryoshka_module(cfg, ours: bool):
    model = PassThroughModel(cfg["dim"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ours:
            inner = ek.MultipleNegativesRankingLoss(model, **mnrl_kwargs(cfg, True))
            return ek.MatryoshkaLoss(model, inner, cfg["dims"], cfg["weights"], cfg["n_dims_per_step"])
        inner = st_losses.MultipleNegativesRankingLoss(model, **mnrl_kwargs(cfg, False))
        return st_losses.MatryoshkaLoss(model, inner, cfg["dims"], cfg["weights"], cfg["n_dims_per_step"])


def module_loss(module, seed):
    def fn(leaves):
        random.seed(seed)  # n_dims_per_step draws from `random`
        return module([{"embedding": leaf} for leaf in leaves], None)

    return fn


def skip_without_op(backend: str) -> None:
    reason = dispatch.why_not(backend, DEVICE, "matryoshka")
    if reason is not None:
        pytest.skip(f"backend {backend} has no Matryoshka op on {DEVICE}: {reason}")


@pytest.fixture
def forced_backend(backend, monkeypatch):
    skip_without_op(backend)
    monkeypatch.setenv("EMBEDLOSS_BACKEND", backend)
    return backend


@pytest.mark.parametrize("seed", range(24))
def test_float64_matches_sentence_transformers_matryoshka(forced_backend, seed):
    cfg = random_config(seed, small=is_interpreted(forced_backend))
    columns = make_columns(cfg, torch.float64, seed)
    ref_loss, ref_grads = loss_and_grads(module_loss(matryoshka_module(cfg, False), seed), columns, grad_scale=2.0)
    loss, grads = loss_and_grads(module_loss(matryoshka_module(cfg, True), seed), columns, grad_scale=2.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10)
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert rel_err(g, ref) <= 1e-8, f"column {i}: {rel_err(g, ref)} ({cfg})"


@pytest.mark.parametrize("seed", range(100, 112))
def test_float32_error_within_4x_sentence_transformers(forced_backend, seed, request):
    if forced_backend == "cpp" and seed == 105:
        # measured 4.36x (torch 3.89x): one step on the width-2 prefix only (n_dims_per_step=1), column 3's gradient
        # 1.7e-7 off on a norm of 0.044. sentence-transformers' own fp32 error of the same quantity is 3.8e-8 through
        # MatryoshkaLoss but 3.4e-7 through MultipleNegativesRankingLoss on the truncated rows (ours: 2.8e-7), so the
        # 4x bound is set by a lucky sample; no single stage of the algorithm dominates (emulated in float64: fp32
        # prefix norms alone 3.3x, exact norms with the rest in fp32 3.5x). tests/README.md, known exceptions.
        request.applymarker(pytest.mark.xfail(reason="cpp fp32 4.36x on a width-2 prefix, against a lucky "
                                              "sentence-transformers sample", strict=False))
    cfg = random_config(seed, small=is_interpreted(forced_backend))
    columns64 = make_columns(cfg, torch.float64, seed)
    columns32 = [c.float() for c in columns64]
    st = matryoshka_module(cfg, False)
    exact_loss, exact_grads = loss_and_grads(module_loss(st, seed), columns64)
    st32_loss, st32_grads = loss_and_grads(module_loss(st, seed), columns32)
    loss, grads = loss_and_grads(module_loss(matryoshka_module(cfg, True), seed), columns32)
    assert_within_measured_error(loss, exact_loss, st32_loss, dtype=torch.float32, what=f"loss ({cfg})")
    for i, (g, g_st, ref) in enumerate(zip(grads, st32_grads, exact_grads)):
        assert_within_measured_error(g, ref, g_st, dtype=torch.float32, what=f"column {i} ({cfg})")


@pytest.mark.parametrize("directions,partition", [
    (("query_to_doc",), "joint"), (("query_to_doc", "doc_to_query"), "per_direction"),
    (("query_to_doc", "query_to_query"), "joint"), (("query_to_doc", "doc_to_doc"), "joint")],
    ids=["qd", "qd+dq-per_direction", "qd+qq", "qd+dd"])
def test_triton_single_candidate_rows_give_zero_float32_gradient(directions, partition, monkeypatch):
    """B = 1 with one doc: every softmax of the row has one entry (query_to_query's and doc_to_doc's only column is
    masked), so the gradient is exactly 0, as sentence-transformers' float32 gives. The triton row kernels put all
    of the one-hot in query_to_doc, so per_direction query_to_doc + doc_to_query gave -w and +w that cancelled only
    after the gradient products (9e-7 at scale 50); now each block takes its share. Within 4x
    sentence-transformers' error + 1e-7."""
    skip_without_op("triton")
    monkeypatch.setenv("EMBEDLOSS_BACKEND", "triton")
    for seed in range(4):
        cfg = dict(batch=1, dim=17, n_neg=0, scale=(20.0, 50.0)[seed % 2], cosine=seed < 2, directions=directions,
                   partition_mode=partition, hardness_mode=HARDNESS[seed], hardness_strength=5.0, block_rows=0,
                   dims=[17, 8, 3], weights=[1, 0.5, 2.0], n_dims_per_step=-1)
        columns64 = make_columns(cfg, torch.float64, seed)
        st = matryoshka_module(cfg, False)
        _, exact = loss_and_grads(module_loss(st, seed), columns64)
        _, st32 = loss_and_grads(module_loss(st, seed), [c.float() for c in columns64])
        _, grads = loss_and_grads(module_loss(matryoshka_module(cfg, True), seed), [c.float() for c in columns64])
        for i, (g, g_st, ref) in enumerate(zip(grads, st32, exact)):
            assert ref.abs().max() <= 1e-12
            err, st_err = (g - ref).abs().max().item(), (g_st - ref).abs().max().item()
            assert err <= 4 * st_err + 1e-7, f"column {i}: {err:.3g} (sentence-transformers {st_err:.3g}) {cfg}"


@pytest.mark.parametrize("seed", range(8))
def test_functional_matches_reference(backend, seed):
    skip_without_op(backend)
    cfg = random_config(seed + 50, small=is_interpreted(backend))
    columns = make_columns(cfg, torch.float64, seed + 50)
    opts = dict(scale=cfg["scale"], directions=cfg["directions"], partition_mode=cfg["partition_mode"],
                hardness_mode=cfg["hardness_mode"], hardness_strength=cfg["hardness_strength"])
    ref_loss, ref_grads = loss_and_grads(
        lambda c: reference.matryoshka_reference(c[0], c[1:], cfg["dims"], cfg["weights"], **opts), columns)
    loss, grads = loss_and_grads(
        lambda c: functional.matryoshka_mnrl_loss(*c, dims=cfg["dims"], weights=cfg["weights"], backend=backend,
                                                  block_rows=cfg["block_rows"], **opts), columns)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) <= 1e-10


def test_fused_op_runs_once_per_step(monkeypatch):
    cfg = random_config(3, small=True) | dict(n_dims_per_step=-1, dims=[24, 16, 8, 3], dim=24, weights=[1, 1, 1, 1])
    calls = []
    original = functional.matryoshka_from_columns

    def spy(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "matryoshka_from_columns", spy)
    module = matryoshka_module(cfg, True)
    module([{"embedding": c} for c in make_columns(cfg, torch.float64, 0)], None)
    assert calls == [[24, 16, 8, 3]]


def test_n_dims_per_step_draws_like_sentence_transformers():
    cfg = random_config(5, small=True) | dict(dim=24, dims=[24, 20, 16, 8, 4], weights=[1, 2, 3, 4, 5],
                                              n_dims_per_step=2)
    columns = make_columns(cfg, torch.float64, 1)
    seen = set()
    for seed in range(6):
        ref = module_loss(matryoshka_module(cfg, False), seed)(columns)
        ours = module_loss(matryoshka_module(cfg, True), seed)(columns)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
        seen.add(round(ref.item(), 8))
    assert len(seen) > 1  # the draws differ between seeds


def test_half_precision_inputs(backend):
    skip_without_op(backend)
    cfg = random_config(7, small=True)
    for dtype in (torch.bfloat16, torch.float16):
        cols = [c.to(dtype) for c in make_columns(cfg, torch.float64, 2)]
        leaves = [c.clone().requires_grad_() for c in cols]
        loss = functional.matryoshka_mnrl_loss(*leaves, dims=cfg["dims"], weights=cfg["weights"], backend=backend)
        loss.backward()

        def ref(c):
            return reference.matryoshka_reference(c[0], c[1:], cfg["dims"], cfg["weights"])

        # measured error: the reference in float32 on the same rounded inputs, its gradients rounded to dtype
        ref_loss, ref_grads = loss_and_grads(ref, [c.double() for c in cols])
        plain_loss, plain_grads = loss_and_grads(ref, [c.float() for c in cols])
        assert_within_measured_error(loss, ref_loss, plain_loss, dtype=torch.float32, what=f"{dtype} loss")
        for i, (leaf, g, r) in enumerate(zip(leaves, plain_grads, ref_grads)):
            assert leaf.grad.dtype == dtype
            assert_within_measured_error(leaf.grad, r, g.to(dtype), what=f"{dtype} column {i}")


def test_no_grad_and_inputs_not_modified(backend):
    skip_without_op(backend)
    cols = make_columns(random_config(1, small=True), torch.float64, 3)
    before = [c.clone() for c in cols]
    with torch.no_grad():
        loss = functional.matryoshka_mnrl_loss(*cols, dims=[cols[0].shape[1], 5], backend=backend)
    ref = reference.matryoshka_reference(cols[0], cols[1:], [cols[0].shape[1], 5], [1.0, 1.0])
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(cols, before))


def test_validation_errors():
    q, p = torch.randn(4, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="at least one dimension"):
        functional.matryoshka_mnrl_loss(q, p, dims=[])
    with pytest.raises(ValueError, match="> 0"):
        functional.matryoshka_mnrl_loss(q, p, dims=[8, 0])
    with pytest.raises(ValueError, match="cannot be greater than the embedding dimension 8"):
        functional.matryoshka_mnrl_loss(q, p, dims=[9])
    with pytest.raises(TypeError, match="dims must hold ints"):
        functional.matryoshka_mnrl_loss(q, p, dims=[8, 4.0])
    with pytest.raises(TypeError, match="dims must be a sequence"):
        functional.matryoshka_mnrl_loss(q, p, dims=8)
    with pytest.raises(ValueError, match="same length"):
        functional.matryoshka_mnrl_loss(q, p, dims=[8, 4], weights=[1.0])
    with pytest.raises(ValueError, match="finite"):
        functional.matryoshka_mnrl_loss(q, p, dims=[8, 4], weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="Scale"):
        functional.matryoshka_mnrl_loss(q, p, dims=[8], scale=0.0)
    with pytest.raises(ValueError, match="partition_mode"):
        functional.matryoshka_mnrl_loss(q, p, dims=[8], partition_mode="bad")


def test_duplicate_dims_sum_their_weights(backend):
    skip_without_op(backend)
    cols = make_columns(random_config(2, small=True), torch.float64, 4)
    d = cols[0].shape[1]
    ours = functional.matryoshka_mnrl_loss(*cols, dims=[d, 5, 5], weights=[1.0, 0.5, 2.0], backend=backend)
    ref = reference.matryoshka_reference(cols[0], cols[1:], [d, 5, 5], [1.0, 0.5, 2.0])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_module_validation_and_config_match_sentence_transformers():
    model = PassThroughModel(16)
    inner = ek.MultipleNegativesRankingLoss(model)
    st_inner = st_losses.MultipleNegativesRankingLoss(model)
    for args, kwargs in [(([],), {}), (([16, 0],), {}), (([16, 8],), dict(matryoshka_weights=[1])),
                         (([32, 8],), {})]:
        with pytest.raises(ValueError) as ours:
            ek.MatryoshkaLoss(model, inner, *args, **kwargs)
        with pytest.raises(ValueError) as theirs:
            st_losses.MatryoshkaLoss(model, st_inner, *args, **kwargs)
        assert str(ours.value) == str(theirs.value)
    ours = ek.MatryoshkaLoss(model, inner, [8, 16, 4], [1, 2, 3], n_dims_per_step=2)
    theirs = st_losses.MatryoshkaLoss(model, st_inner, [8, 16, 4], [1, 2, 3], n_dims_per_step=2)
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.citation == theirs.citation
    assert ours.matryoshka_dims == (16, 8, 4) and ours.matryoshka_weights == (2, 1, 3)


def test_a_dim_that_is_not_an_int_raises_type_error_as_sentence_transformers():
    # issue 26: [16, 8.5] trained silently at dim 8 (its config saying 8.5); sentence-transformers raises TypeError
    model = PassThroughModel(16)
    feats = [{"embedding": torch.randn(4, 16, dtype=torch.float64, device=DEVICE)} for _ in range(2)]
    for dims in ([16, 8.5], [8.0], [16.0, 4]):
        with pytest.raises(TypeError):
            st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), dims)(feats, None)
        with pytest.raises(TypeError, match="matryoshka_dims must hold ints"):
            ek.MatryoshkaLoss(model, ek.MultipleNegativesRankingLoss(model), dims)(feats, None)


def test_other_inner_loss_is_sentence_transformers_behaviour():
    model = PassThroughModel(12)
    gen = torch.Generator().manual_seed(0)
    x, y, labels = (torch.randn(6, 12, generator=gen, dtype=torch.float64).to(DEVICE),
                    torch.randn(6, 12, generator=gen, dtype=torch.float64).to(DEVICE),
                    torch.rand(6, generator=gen, dtype=torch.float64).to(DEVICE))
    ours = ek.MatryoshkaLoss(model, st_losses.CoSENTLoss(model), [12, 6, 3], [1, 0.5, 2])
    theirs = st_losses.MatryoshkaLoss(model, st_losses.CoSENTLoss(model), [12, 6, 3], [1, 0.5, 2])
    assert not ours.fused
    feats = [{"embedding": x}, {"embedding": y}]
    torch.testing.assert_close(ours(feats, labels), theirs(feats, labels), rtol=1e-12, atol=0)


def test_compile_fullgraph(backend):
    skip_without_op(backend)
    if is_interpreted(backend):
        pytest.skip("torch.compile of the interpreted Triton backend is covered by test_opcheck")
    cols = make_columns(random_config(4, small=True), torch.float64, 5)
    d = cols[0].shape[1]

    def fn(q, p):
        return functional.matryoshka_mnrl_loss(q, p, dims=[d, 7, 2], weights=[1.0, 0.5, 2.0], backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q, p = (c.detach().clone().requires_grad_() for c in cols[:2])
    loss = compiled(q, p)
    loss.backward()
    q2, p2 = (c.detach().clone().requires_grad_() for c in cols[:2])
    ref = reference.matryoshka_reference(q2, [p2], [d, 7, 2], [1.0, 0.5, 2.0])
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-9, atol=1e-12)


def test_opcheck(backend):
    skip_without_op(backend)
    op = dispatch.get_op("matryoshka", DEVICE, backend)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 19, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    a = torch.randn(10, 19, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    for compute_grad in (True, False):
        args = (q, a, [3, 11, 19], [1.0, 0.5, 2.0], 0, 5, 20.0, 1 | 4, False, 0, 0.0, compute_grad, 2)
        tests = ("test_schema", "test_faketensor") if not compute_grad else None
        torch.library.opcheck(op, args, test_utils=tests or ("test_schema", "test_autograd_registration",
                                                             "test_faketensor", "test_aot_dispatch_dynamic"))


def test_cached_variants_match_sentence_transformers(tiny_st):
    pytest.importorskip("transformers")
    from tiny_model import on_device, sentences

    model = tiny_st().eval().double()
    feats = [on_device(model.preprocess(sentences(9, 10 + c))) for c in range(3)]
    for ours_cls, st_cls, n_dims_per_step in [
        (ek.CachedMultipleNegativesRankingLoss, st_losses.CachedMultipleNegativesRankingLoss, -1),
        (ek.CachedMultipleNegativesSymmetricRankingLoss, st_losses.CachedMultipleNegativesSymmetricRankingLoss, 2),
    ]:
        n_cols = 2 if "Symmetric" in ours_cls.__name__ else 3
        results = []
        for cls in (st_cls, ours_cls):
            m = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss_fn = ek.MatryoshkaLoss(m, cls(m, mini_batch_size=4), [32, 20, 8], [1, 0.5, 2], n_dims_per_step)
            random.seed(7)
            loss = loss_fn(feats[:n_cols], None)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                            if p.grad is not None}))
        (ref_loss, ref_grads), (loss, grads) = results
        torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert rel_err(grads[name], ref_grads[name]) <= 1e-8, name


def test_tiny_model_forward_and_matryoshka2d(tiny_st):
    pytest.importorskip("transformers")
    from tiny_model import on_device, sentences

    model = tiny_st().eval().double()
    feats = [on_device(model.preprocess(sentences(7, 20 + c))) for c in range(3)]
    for wrapper in ("MatryoshkaLoss", "Matryoshka2dLoss"):
        results = []
        for ours in (False, True):
            m = copy.deepcopy(model)
            inner = (ek if ours else st_losses).MultipleNegativesRankingLoss(m, scale=15.0)
            cls = getattr(ek.losses if ours else st_losses, wrapper)
            kwargs = dict(n_dims_per_step=2) if wrapper == "MatryoshkaLoss" else {}
            loss_fn = cls(m, inner, [32, 24, 12, 5], [1, 2, 0.5, 1], **kwargs)
            random.seed(3)
            loss = loss_fn(feats, None)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                            if p.grad is not None}))
        (ref_loss, ref_grads), (loss, grads) = results
        torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10)
        for name in ref_grads:
            assert rel_err(grads[name], ref_grads[name]) <= 1e-8, (wrapper, name)


def test_forward_mode_and_torch_func_grad():
    cols = make_columns(random_config(6, small=True), torch.float64, 8)
    d = cols[0].shape[1]

    def fn(q, p):
        return functional.matryoshka_mnrl_loss(q, p, dims=[d, 4], weights=[1.0, 0.5], backend="torch")

    gq, gp = torch.func.grad(fn, argnums=(0, 1))(cols[0], cols[1])
    q, p = (c.detach().clone().requires_grad_() for c in cols[:2])
    reference.matryoshka_reference(q, [p], [d, 4], [1.0, 0.5]).backward()
    torch.testing.assert_close(gq, q.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gp, p.grad, rtol=1e-9, atol=1e-12)
    tangent = torch.randn_like(cols[0])
    _, jvp = torch.func.jvp(lambda x: fn(x, cols[1]), (cols[0],), (tangent,))
    torch.testing.assert_close(jvp, (q.grad * tangent).sum(), rtol=1e-9, atol=1e-12)


def _gather_worker(rank, world, init_file, out_dir, schedule):

    os.environ["EMBEDLOSS_DISTRIBUTED_SCHEDULE"] = schedule
    with gloo_rank(rank, world, init_file):
        gen = torch.Generator().manual_seed(0)
        world_cols = [torch.randn(6 * world, 21, generator=gen, dtype=torch.float64) for _ in range(3)]
        local = [c[rank * 6:(rank + 1) * 6].clone().requires_grad_() for c in world_cols]
        model = PassThroughModel(21)
        inner = ek.MultipleNegativesRankingLoss(model, scale=15.0, gather_across_devices=True,
                                                hardness_mode="in_batch_negatives", hardness_strength=0.5)
        loss = ek.MatryoshkaLoss(model, inner, [21, 9, 4], [1.0, 0.5, 2.0])([{"embedding": c} for c in local], None)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [c.grad for c in local]}, os.path.join(out_dir, f"r{rank}.pt"))


@pytest.mark.parametrize("schedule", ["gather", "ring"])
def test_gather_across_devices_two_ranks(tmp_path, schedule):
    """Two gloo ranks (CPU on purpose): each rank's loss is the world-batch loss over its rows, and its gradients are
    the world loss's (summed over ranks) on its rows; under the ring schedule the Matryoshka loss runs gather."""
    spawn_gloo(_gather_worker, 2, (2, str(tmp_path / "init"), str(tmp_path), schedule), 120)
    gen = torch.Generator().manual_seed(0)
    world_cols = [torch.randn(12, 21, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)]
    opts = dict(scale=15.0, hardness_mode="in_batch_negatives", hardness_strength=0.5)
    total = 0.0
    for rank in range(2):
        ref = reference.matryoshka_reference(world_cols[0], world_cols[1:], [21, 9, 4], [1.0, 0.5, 2.0],
                                             row_start=6 * rank, row_count=6, **opts)
        res = torch.load(tmp_path / f"r{rank}.pt")
        torch.testing.assert_close(res["loss"], ref.detach(), rtol=1e-10, atol=1e-12)
        total = total + ref
    total.backward()
    for rank in range(2):
        res = torch.load(tmp_path / f"r{rank}.pt")
        for g, col in zip(res["grads"], world_cols):
            torch.testing.assert_close(g, col.grad[rank * 6:(rank + 1) * 6], rtol=1e-9, atol=1e-12)


# -- a learnable scale (an nn.Parameter as the inner MNRL's scale), as sentence-transformers trains it ---------------
def learnable_scale(value, dtype=torch.float64):
    return nn.Parameter(torch.tensor(value, dtype=dtype, device=DEVICE))


def masks_cells(directions) -> bool:
    """sentence-transformers multiplies its -inf masked cells by the scale, so its d loss / d scale is NaN with
    query_to_query or doc_to_doc (the float64 reference masks after scaling)."""
    return bool(set(directions) & {"query_to_query", "doc_to_doc"})


def reference_scale_grad(module, cfg, columns, seed):
    """d loss / d scale of the float64 reference on the dims the module draws with ``seed``."""
    random.seed(seed)
    picked = draw_dim_indices(len(module.matryoshka_dims), module.n_dims_per_step, sort=True)
    scale = learnable_scale(cfg["scale"])
    kw = mnrl_kwargs(cfg, True)
    reference.matryoshka_reference(
        columns[0], columns[1:], [module.matryoshka_dims[i] for i in picked],
        [module.matryoshka_weights[i] for i in picked], kw["similarity_fct"], scale=scale,
        directions=kw["directions"], partition_mode=kw["partition_mode"], hardness_mode=kw["hardness_mode"],
        hardness_strength=kw["hardness_strength"]).backward()
    return scale.grad


@pytest.mark.parametrize("seed", range(16))
def test_learnable_scale_float64_matches_sentence_transformers(forced_backend, seed):
    """Loss, every embedding gradient and d loss / d scale within 1e-8 of sentence-transformers' MatryoshkaLoss around
    its MNRL with an nn.Parameter scale (random dims, weights, n_dims_per_step, directions, hardness, block sizes)."""
    cfg = random_config(seed + 300, small=is_interpreted(forced_backend))
    columns = make_columns(cfg, torch.float64, seed)
    results = []
    for ours in (False, True):
        module = matryoshka_module(cfg, ours)
        module.loss.scale = learnable_scale(cfg["scale"])
        loss, grads = loss_and_grads(module_loss(module, seed), columns, grad_scale=2.0)
        results.append((loss, grads, module.loss.scale.grad))
    (ref_loss, ref_grads, ref_scale_grad), (loss, grads, scale_grad) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10)
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert rel_err(g, ref) <= 1e-8, f"column {i}: {rel_err(g, ref)} ({cfg})"
    assert scale_grad is not None and scale_grad.shape == () and scale_grad.dtype == torch.float64
    if masks_cells(cfg["directions"]):
        assert ref_scale_grad.isnan()
        ref_scale_grad = 2.0 * reference_scale_grad(module, cfg, columns, seed)
    torch.testing.assert_close(scale_grad, ref_scale_grad, rtol=1e-8, atol=1e-10, msg=str(cfg))


def test_learnable_scale_functional_and_op(backend):
    """The functional API takes a tensor scale and gives it its gradient (block_rows and row ranges too); the op's
    fourth output is d loss / d scale (empty without compute_grad), in the loss's dtype."""
    skip_without_op(backend)
    cols = make_columns(dict(batch=5, dim=13, n_neg=1), torch.float64, 3)
    opts = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                hardness_mode="hard_negatives", hardness_strength=0.5)
    for block_rows in (0, 2):
        leaves = [c.detach().clone().requires_grad_() for c in cols]
        scale = learnable_scale(7.5)
        functional.matryoshka_mnrl_loss(*leaves, dims=[13, 6, 2], weights=[1.0, 0.5, 2.0], scale=scale,
                                        backend=backend, block_rows=block_rows, **opts).backward()
        ref_leaves = [c.detach().clone().requires_grad_() for c in cols]
        ref_scale = learnable_scale(7.5)
        reference.matryoshka_reference(ref_leaves[0], ref_leaves[1:], [13, 6, 2], [1.0, 0.5, 2.0], scale=ref_scale,
                                       **opts).backward()
        torch.testing.assert_close(scale.grad, ref_scale.grad, rtol=1e-10, atol=1e-12)
        for g, ref in zip(leaves, ref_leaves):
            assert rel_err(g.grad, ref.grad) <= 1e-10
    op = dispatch.get_op("matryoshka", DEVICE, backend)
    q, a = cols[0].contiguous(), torch.cat(cols[1:])
    for row_start, row_count in ((0, 5), (1, 3)):
        loss, _, _, grad_scale = op(q, a, [2, 6, 13], [2.0, 0.5, 1.0], row_start, row_count, 7.5, 1 | 4, False, 2,
                                    0.5, True, 2)
        ref_scale = learnable_scale(7.5)
        ref = reference.matryoshka_reference(q, [cols[1], cols[2]], [2, 6, 13], [2.0, 0.5, 1.0], scale=ref_scale,
                                             row_start=row_start, row_count=row_count, **opts)
        ref.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
        assert grad_scale.shape == () and grad_scale.dtype == loss.dtype
        torch.testing.assert_close(grad_scale, ref_scale.grad, rtol=1e-10, atol=1e-12)
    out = op(q.float(), a.float(), [2, 13], [1.0, 1.0], 0, 5, 7.5, 1, True, 0, 0.0, False, 0)
    assert len(out) == 4 and out[3].shape == (0,) and out[0].dtype == torch.float32


def test_learnable_scale_float32_and_zero(backend, monkeypatch):
    """A float32 Parameter with float32 embeddings gets a float32 gradient close to the float64 one; a learnable
    scale of exactly 0 (the fused identity divides by it) runs the plain computation, as sentence-transformers'."""
    skip_without_op(backend)
    monkeypatch.setenv("EMBEDLOSS_BACKEND", backend)
    cfg = random_config(0, small=True) | dict(directions=("query_to_doc",), partition_mode="joint", n_dims_per_step=-1)
    cols = make_columns(cfg, torch.float64, 1)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        module = matryoshka_module(cfg, True)
        module.loss.scale = learnable_scale(cfg["scale"], dtype)
        module_loss(module, 0)([c.to(dtype) for c in cols]).backward()
        grads[dtype] = module.loss.scale.grad
    assert grads[torch.float32].dtype == torch.float32 and grads[torch.float32].shape == ()
    torch.testing.assert_close(grads[torch.float32].double(), grads[torch.float64], rtol=1e-4, atol=1e-5)
    results = []
    for ours in (False, True):
        module = matryoshka_module(cfg, ours)
        module.loss.scale = learnable_scale(0.0)
        loss, col_grads = loss_and_grads(module_loss(module, 0), cols)
        results.append((loss, col_grads, module.loss.scale.grad))
    (ref_loss, ref_grads, ref_scale_grad), (loss, col_grads, scale_grad) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for g, ref in zip(col_grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    assert scale_grad.isfinite() and scale_grad != 0
    torch.testing.assert_close(scale_grad, ref_scale_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", ["cached", "cached_symmetric"])
def test_learnable_scale_under_the_gradient_cache(tiny_st, variant):
    """Our cached MNRL inside MatryoshkaLoss (one fused call per step on the cache) with a learnable scale: loss and
    every model gradient within 1e-8 of sentence-transformers' cached MatryoshkaLoss, and d loss / d scale within 1e-8
    of the gradient of the loss it returns, which sentence-transformers' uncached MatryoshkaLoss gives.

    sentence-transformers' ``CachedLossDecorator`` weights the embeddings' gradients by each dim's weight but not the
    scale's (its inner step's own backward reaches the scale unweighted), so with non-uniform weights its cached
    d loss / d scale is ``sum_d dL_d/ds``, not ``sum_d w_d dL_d/ds``; with uniform weights the two agree, and ours
    matches it there too."""
    pytest.importorskip("transformers")
    from tiny_model import on_device, sentences

    model = tiny_st().eval().double()
    if variant == "cached":
        cached, plain = "CachedMultipleNegativesRankingLoss", "MultipleNegativesRankingLoss"
        n_cols, n_dims_per_step = 3, 2
        kwargs = dict(hardness_mode="in_batch_negatives", hardness_strength=0.5)
    else:
        cached, plain = "CachedMultipleNegativesSymmetricRankingLoss", "MultipleNegativesSymmetricRankingLoss"
        n_cols, n_dims_per_step = 2, -1
        kwargs = {}
    feats = [on_device(model.preprocess(sentences(7, 30 + c))) for c in range(n_cols)]

    def run(lib, name, weights, mini_batch_size):
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = dict(mini_batch_size=mini_batch_size) if mini_batch_size else {}
            inner = getattr(lib, name)(m, **extra, **kwargs)
            inner.scale = nn.Parameter(torch.tensor(13.0, dtype=torch.float64, device=m.device))
            loss_fn = lib.MatryoshkaLoss(m, inner, [32, 20, 8, 3], weights, n_dims_per_step)
        random.seed(11)
        loss = loss_fn(feats, None)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return loss.detach(), grads, inner.scale.grad

    for weights in ([1, 0.5, 2, 1], [1, 1, 1, 1]):
        loss, grads, scale_grad = run(ek, cached, weights, 3)
        st_loss, st_grads, st_scale_grad = run(st_losses, cached, weights, 3)
        torch.testing.assert_close(loss, st_loss, rtol=1e-8, atol=1e-10)
        assert grads.keys() == st_grads.keys()
        for name in grads:
            assert rel_err(grads[name], st_grads[name]) <= 1e-8, name
        exact_loss, _, exact_scale_grad = run(st_losses, plain, weights, None)
        torch.testing.assert_close(loss, exact_loss, rtol=1e-8, atol=1e-10)
        assert scale_grad is not None
        torch.testing.assert_close(scale_grad, exact_scale_grad, rtol=1e-8, atol=1e-10)
        if len(set(weights)) == 1:
            torch.testing.assert_close(scale_grad, st_scale_grad, rtol=1e-8, atol=1e-10)
        else:  # sentence-transformers' cached scale gradient leaves out the dims' weights (see the docstring)
            assert not torch.allclose(st_scale_grad, exact_scale_grad, rtol=1e-3)


SCALE_DIST_CONFIGS = [
    dict(kwargs=dict(hardness_mode="in_batch_negatives", hardness_strength=0.5), dims=[21, 9, 4],
         weights=[1.0, 0.5, 2.0], n_dims_per_step=-1, scale=15.0),
    dict(kwargs=dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                     hardness_mode="all_negatives", hardness_strength=0.75, similarity_fct="dot"),
         dims=[21, 13, 6, 2], weights=[2.0, 1.0, 0.25, 3.0], n_dims_per_step=2, scale=7.5),
    dict(kwargs=dict(hardness_mode="hard_negatives", hardness_strength=5.0), dims=[21, 1], weights=[1.0, 1.0],
         n_dims_per_step=1, scale=50.0),
]


def _scale_gather_worker(rank, world, init_file, out_dir, backends_):
    with gloo_rank(rank, world, init_file):
        out = {}
        for i, cfg in enumerate(SCALE_DIST_CONFIGS):
            gen = torch.Generator().manual_seed(i)
            world_cols = [torch.randn(3 * world, 21, generator=gen, dtype=torch.float64) for _ in range(3)]
            for name in ("sentence-transformers", *backends_):
                if name != "sentence-transformers":
                    os.environ["EMBEDLOSS_BACKEND"] = name
                lib = st_losses if name == "sentence-transformers" else ek
                local = [c[rank * 3:(rank + 1) * 3].clone().requires_grad_() for c in world_cols]
                kwargs = dict(cfg["kwargs"])
                if kwargs.get("similarity_fct") == "dot":
                    kwargs["similarity_fct"] = st_util.dot_score
                model = PassThroughModel(21)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    inner = lib.MultipleNegativesRankingLoss(model, gather_across_devices=True, **kwargs)
                    inner.scale = nn.Parameter(torch.tensor(cfg["scale"], dtype=torch.float64))
                    module = lib.MatryoshkaLoss(model, inner, cfg["dims"], cfg["weights"], cfg["n_dims_per_step"])
                random.seed(5 + i)
                loss = module([{"embedding": c} for c in local], None)
                loss.backward()
                out[i, name] = (loss.detach(), [c.grad for c in local], inner.scale.grad.clone())
        torch.save(out, os.path.join(out_dir, f"scale_r{rank}.pt"))


def test_learnable_scale_gather_across_devices_two_ranks(tmp_path):
    """Two gloo ranks (CPU on purpose), gather_across_devices with an nn.Parameter scale: on every backend each
    rank's loss, its embedding gradients and its d loss / d scale are sentence-transformers' (within 1e-8)."""
    backends_ = [n for n in dispatch.BACKEND_NAMES if dispatch.why_not(n, "cpu", "matryoshka") is None]
    spawn_gloo(_scale_gather_worker, 2, (2, str(tmp_path / "init"), str(tmp_path), backends_), 240)
    for rank in range(2):
        res = torch.load(tmp_path / f"scale_r{rank}.pt", weights_only=False)
        for i, cfg in enumerate(SCALE_DIST_CONFIGS):
            ref_loss, ref_grads, ref_scale_grad = res[i, "sentence-transformers"]
            assert ref_scale_grad.isfinite() and ref_scale_grad != 0
            for name in backends_:
                loss, grads, scale_grad = res[i, name]
                torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10, msg=f"{name} {cfg}")
                for g, ref in zip(grads, ref_grads):
                    assert rel_err(g, ref) <= 1e-8, (name, rank, cfg)
                torch.testing.assert_close(scale_grad, ref_scale_grad, rtol=1e-8, atol=1e-10, msg=f"{name} {cfg}")
