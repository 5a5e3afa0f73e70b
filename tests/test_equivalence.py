"""Every backend against sentence-transformers 6.2 on random configurations of every option.

float64: loss and every embedding gradient within 1e-8 relative. float32: our error against the float64 result is
at most 4x sentence-transformers' own float32 error (plus a tiny floor for cases where that error is ~0).
"""

import functools
import random
import warnings

import pytest
import torch
from conftest import (
    DEVICE,
    DIRECTION_SETS,
    HARDNESS,
    assert_within_measured_error,
    is_informative,
    is_interpreted,
    loss_and_grads,
    rel_err,
)

from embedloss_kernels import functional

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")


def is_degenerate(cfg, seed: int) -> bool:
    """A configuration whose anchor gradient is ~0, where a relative-error assertion checks nothing: D=1 under
    cosine (every similarity is +-1, the gradient is exactly 0), one row with no negative (a single candidate; with
    doc_to_query the positive counted twice), or, measured on the columns ``make_columns(cfg, ., seed)``, a softmax
    so saturated that the anchor gradient is below ``INFORMATIVE_FRACTION`` of the scale."""
    if (cfg["dim"] == 1 and cfg["cosine"]) or (cfg["batch"] == 1 and cfg["n_neg"] == 0):
        return True
    return not is_informative(anchor_gradient(cfg, seed), cfg["scale"])


def anchor_gradient(cfg, seed: int) -> torch.Tensor:
    """sentence-transformers' float64 gradient of the anchors of the fuzz case (cfg, seed)."""
    _, grads = loss_and_grads(lambda c: st_loss(cfg, c), make_columns(cfg, torch.float64, seed))
    return grads[0]


def random_config(seed: int, small: bool) -> dict:
    return dict(_drawn_config(seed, small))  # a copy: callers may change theirs


@functools.cache
def _drawn_config(seed: int, small: bool) -> dict:
    """A random configuration of every MNRL option; a degenerate draw (``is_degenerate``) is drawn again (the
    deliberate edge cases have their own tests with exact assertions: ``test_degenerate_configs_exact``)."""
    rng = random.Random(seed)
    cfg = draw_config(rng, small)
    while is_degenerate(cfg, seed):
        cfg = draw_config(rng, small)
    return cfg


def draw_config(rng: random.Random, small: bool) -> dict:
    directions = rng.choice(DIRECTION_SETS)
    per_direction_ok = not set(directions) & {"query_to_query", "doc_to_doc"}
    batch_sizes = [1, 2, 5, 12] if small else [1, 2, 7, 33, 130, 257]
    dims = [1, 3, 8, 17, 24] if small else [1, 3, 16, 31, 64, 97]
    return dict(
        batch=rng.choice(batch_sizes),
        dim=rng.choice(dims),
        n_neg=rng.randint(0, 3),
        scale=rng.choice([1.0, 7.5, 20.0, 50.0, 100.0]),
        cosine=rng.random() < 0.7,
        directions=directions,
        partition_mode=rng.choice(["joint", "per_direction"]) if per_direction_ok else "joint",
        hardness_mode=rng.choice(HARDNESS),
        hardness_strength=rng.choice([0.5, 5.0, 9.0]),
        block_rows=rng.choice([0, 1, 3, 5]),
    )


def make_columns(cfg, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg["batch"], cfg["dim"])
    # Dot similarity at large scale: keep norms moderate so the float32 comparison is about our arithmetic.
    spread = 1.0 if cfg["cosine"] else 0.3
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) * spread).to(DEVICE, dtype)
            for _ in range(2 + cfg["n_neg"])]


def st_loss(cfg, columns):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_fn = st_losses.MultipleNegativesRankingLoss(
            None, scale=cfg["scale"], similarity_fct=st_util.cos_sim if cfg["cosine"] else st_util.dot_score,
            directions=cfg["directions"], partition_mode=cfg["partition_mode"], hardness_mode=cfg["hardness_mode"],
            hardness_strength=cfg["hardness_strength"],
        )
    return loss_fn.compute_loss_from_embeddings(columns, None)


def our_loss(cfg, columns, backend):
    return functional.multiple_negatives_ranking_loss(
        *columns, scale=cfg["scale"], similarity="cosine" if cfg["cosine"] else "dot", directions=cfg["directions"],
        partition_mode=cfg["partition_mode"], hardness_mode=cfg["hardness_mode"],
        hardness_strength=cfg["hardness_strength"], backend=backend, block_rows=cfg["block_rows"],
    )


@pytest.mark.parametrize("seed", range(40))
def test_mnrl_float64_matches_sentence_transformers(backend, seed):
    cfg = random_config(seed, small=is_interpreted(backend))
    columns = make_columns(cfg, torch.float64, seed)
    ref_loss, ref_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns, grad_scale=2.0)
    loss, grads = loss_and_grads(lambda c: our_loss(cfg, c, backend), columns, grad_scale=2.0)
    assert our_loss(cfg, columns, backend).dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10)
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert rel_err(g, ref) <= 1e-8, f"column {i}: {rel_err(g, ref)} ({cfg})"


@pytest.mark.parametrize("seed", range(100, 130))
def test_mnrl_float32_error_within_4x_sentence_transformers(backend, seed):
    cfg = random_config(seed, small=is_interpreted(backend))
    columns64 = make_columns(cfg, torch.float64, seed)
    columns32 = [c.float() for c in columns64]
    exact_loss, exact_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns64)
    st32_loss, st32_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns32)
    loss, grads = loss_and_grads(lambda c: our_loss(cfg, c, backend), columns32)
    assert_within_measured_error(loss, exact_loss, st32_loss, dtype=torch.float32, what=f"loss ({cfg})")
    for i, (g, g_st, ref) in enumerate(zip(grads, st32_grads, exact_grads)):
        assert_within_measured_error(g, ref, g_st, dtype=torch.float32, what=f"column {i} ({cfg})")


def test_fp32_loss_dtype_and_grad_dtype(backend):
    columns = make_columns(random_config(3, small=True), torch.float32, 0)
    leaves = [c.clone().requires_grad_() for c in columns]
    loss = functional.multiple_negatives_ranking_loss(*leaves, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert all(leaf.grad.dtype == torch.float32 and leaf.grad.shape == leaf.shape for leaf in leaves)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    """fp16/bf16 in: fp32 loss, gradients in the input dtype, as close to the float64 result on the same (rounded)
    inputs as sentence-transformers computing in float32 and rounding its gradients to the input dtype."""
    cfg = dict(random_config(5, small=True), batch=9, dim=24, n_neg=1, cosine=True, scale=20.0)
    rounded = [c.to(dtype) for c in make_columns(cfg, torch.float64, 1)]
    exact_loss, exact_grads = loss_and_grads(lambda c: st_loss(cfg, c), [c.double() for c in rounded])
    st32_loss, st32_grads = loss_and_grads(lambda c: st_loss(cfg, c), [c.float() for c in rounded])
    leaves = [c.clone().requires_grad_() for c in rounded]
    loss = our_loss(cfg, leaves, backend)
    assert loss.dtype == torch.float32
    loss.backward()
    assert_within_measured_error(loss, exact_loss, st32_loss, dtype=torch.float32, what="loss")
    for i, (leaf, g_st, ref) in enumerate(zip(leaves, st32_grads, exact_grads)):
        assert leaf.grad.dtype == dtype
        assert_within_measured_error(leaf.grad, ref, g_st.to(dtype), what=f"column {i}")


@pytest.mark.parametrize("seed", range(12))
def test_cosent_and_angle_float64_match_sentence_transformers(backend, seed):
    rng = random.Random(seed)
    small = is_interpreted(backend)
    # B=1 (no pair) and D=1 (cosine +-1) have a gradient of exactly 0: test_degenerate_configs_exact, not here
    batch = rng.choice([2, 3, 9, 16] if small else [2, 3, 9, 64, 301])
    dim = rng.choice([2, 5, 8, 17] if small else [2, 5, 8, 33, 64])
    scale = rng.choice([1.0, 20.0, 50.0])
    gen = torch.Generator().manual_seed(seed)
    x, y, z = (torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))
    labels = (torch.randint(0, 4, (batch,), generator=gen).double() / 3).to(DEVICE)  # ties on purpose
    cases = [
        (st_losses.CoSENTLoss(None, scale=scale),
         lambda c: functional.cosent_loss(*c, labels, scale=scale, backend=backend), [x, y]),
        (st_losses.CoSENTLoss(None, scale=scale, similarity_fct=st_util.pairwise_dot_score),
         lambda c: functional.cosent_loss(*c, labels, scale=scale, similarity="dot", backend=backend),
         [x * 0.3, y * 0.3]),
        (st_losses.AnglELoss(None, scale=scale),
         lambda c: functional.angle_loss(*c, labels=labels, scale=scale, backend=backend), [x, y]),
        (st_losses.AnglELoss(None, scale=scale),
         lambda c: functional.angle_loss(*c, scale=scale, backend=backend), [x, y, z]),
    ]
    for st_module, ours, columns in cases:
        st_labels = None if len(columns) == 3 else labels
        ref_loss, ref_grads = loss_and_grads(lambda c: st_module.compute_loss_from_embeddings(c, st_labels), columns)
        loss, grads = loss_and_grads(ours, columns)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10)
        for g, ref in zip(grads, ref_grads):
            assert rel_err(g, ref) <= 1e-8


@pytest.mark.parametrize("seed", range(6))
def test_cosent_float32_error_within_4x_sentence_transformers(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    batch = 16 if is_interpreted(backend) else 200
    x64, y64 = (torch.randn(batch, 13, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    labels = torch.rand(batch, generator=gen).to(DEVICE)
    for st_module, sim in [(st_losses.CoSENTLoss(None), "cosine"), (st_losses.AnglELoss(None), "angle")]:
        exact, exact_g = loss_and_grads(lambda c: st_module.compute_loss_from_embeddings(c, labels), [x64, y64])
        st32, st32_g = loss_and_grads(lambda c: st_module.compute_loss_from_embeddings(c, labels),
                                      [x64.float(), y64.float()])
        ours, ours_g = loss_and_grads(lambda c: functional.cosent_loss(*c, labels, similarity=sim, backend=backend),
                                      [x64.float(), y64.float()])
        assert rel_err(ours, exact) <= 4 * rel_err(st32, exact) + 2e-6
        for g, g_st, ref in zip(ours_g, st32_g, exact_g):
            assert rel_err(g, ref) <= 4 * rel_err(g_st, ref) + 2e-6


def test_zero_vectors_under_cosine(backend):
    """Zero rows are normalized with the reference's eps: finite loss and gradients equal to ST's."""
    cfg = dict(random_config(1, small=True), batch=6, dim=7, n_neg=1, cosine=True, directions=DIRECTION_SETS[-1],
               partition_mode="joint", hardness_mode="all_negatives")
    columns = make_columns(cfg, torch.float64, 2)
    columns[0][1] = 0.0
    columns[1][3] = 0.0
    columns[2][0] = 0.0
    ref_loss, ref_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns)
    loss, grads = loss_and_grads(lambda c: our_loss(cfg, c, backend), columns)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10)
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) <= 1e-8


def test_large_norm_dot_product_does_not_overflow(backend):
    """scale 100 with dot similarity on large-norm float32 inputs: logits far beyond exp's range stay exact."""
    cfg = dict(random_config(2, small=True), batch=8, dim=16, n_neg=1, cosine=False, scale=100.0,
               directions=("query_to_doc",), partition_mode="joint", hardness_mode=None)
    columns = [c * 30 for c in make_columns(cfg, torch.float64, 3)]
    exact, _ = loss_and_grads(lambda c: st_loss(cfg, c), columns)
    loss, grads = loss_and_grads(lambda c: our_loss(cfg, c, backend), [c.float() for c in columns])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert rel_err(loss, exact) < 1e-4


def test_no_grad_skips_gradient_work(backend, monkeypatch):
    """Under no_grad (or with no input requiring grad) the op is asked for no gradient and returns none (empty
    gradient outputs: no gradient work), and the loss is the same as with gradients."""
    import embedloss_kernels.functional.infonce as infonce_module

    outputs = []
    get_op = infonce_module.dispatch.get_op

    def spy_get_op(*args, **kwargs):
        op = get_op(*args, **kwargs)

        def spy(*op_args, **op_kwargs):
            out = op(*op_args, **op_kwargs)
            outputs.append([t.numel() for t in out[1:3]])
            return out

        return spy

    monkeypatch.setattr(infonce_module.dispatch, "get_op", spy_get_op)
    columns = make_columns(random_config(4, small=True), torch.float32, 4)
    with torch.no_grad():
        loss = functional.multiple_negatives_ranking_loss(*[c.requires_grad_() for c in columns], backend=backend)
    assert not loss.requires_grad
    plain = functional.multiple_negatives_ranking_loss(*[c.detach() for c in columns], backend=backend)
    assert not plain.requires_grad
    with_grad = functional.multiple_negatives_ranking_loss(*columns, backend=backend)
    assert outputs[0] == outputs[1] == [0, 0], outputs  # no gradient computed
    assert outputs[2][0] == columns[0].numel()  # the spy sees gradients when they are asked for
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(loss, with_grad.detach())


def test_inputs_not_modified(backend):
    cfg = dict(random_config(6, small=True), batch=5, dim=9, n_neg=2, hardness_mode="in_batch_negatives")
    columns = make_columns(cfg, torch.float32, 6)
    before = [c.clone() for c in columns]
    loss, _ = loss_and_grads(lambda c: our_loss(cfg, c, backend), columns)
    x, y = columns[0].clone(), columns[1].clone()
    labels = torch.rand(cfg["batch"], device=DEVICE)
    labels_before = labels.clone()
    functional.cosent_loss(x, y, labels, backend=backend)
    for c, b in zip(columns, before):
        assert torch.equal(c, b)
    assert torch.equal(labels, labels_before) and torch.equal(x, columns[0]) and torch.equal(y, columns[1])


DEGENERATE_MNRL = [
    dict(batch=6, dim=1, n_neg=1, cosine=True),  # every cosine similarity is +-1
    dict(batch=1, dim=5, n_neg=0, cosine=True),  # one row, one candidate
    dict(batch=1, dim=5, n_neg=0, cosine=False),
]


@pytest.mark.parametrize("case", DEGENERATE_MNRL, ids=lambda c: f"B{c['batch']}-D{c['dim']}-cos{int(c['cosine'])}")
def test_degenerate_configs_exact(backend, case):
    """The configurations the fuzz generators redraw have their own exact assertion: the loss equals
    sentence-transformers' and every gradient is exactly 0 (sentence-transformers leaves round-off, ~1e-16)."""
    cfg = dict(random_config(0, small=True), scale=20.0, directions=("query_to_doc",), partition_mode="joint",
               hardness_mode=None, **case)
    columns = make_columns(cfg, torch.float64, 5)
    ref_loss, ref_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns)
    loss, grads = loss_and_grads(lambda c: our_loss(cfg, c, backend), columns)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for g, ref in zip(grads, ref_grads):
        assert ref.abs().max() <= 1e-12 * cfg["scale"]
        assert torch.count_nonzero(g) == 0, g


@pytest.mark.parametrize("batch,dim", [(1, 8), (7, 1)])
def test_degenerate_cosent_exact(backend, batch, dim):
    """CoSENT with one pair (no pair of pairs) or D=1 under cosine: loss as sentence-transformers', gradient 0."""
    gen = torch.Generator().manual_seed(batch + dim)
    x, y = (torch.randn(batch, dim, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    labels = torch.arange(batch, dtype=torch.float64, device=DEVICE) / batch
    ref_loss, ref_grads = loss_and_grads(lambda c: st_losses.CoSENTLoss(None).compute_loss_from_embeddings(c, labels),
                                         [x, y])
    loss, grads = loss_and_grads(lambda c: functional.cosent_loss(*c, labels, backend=backend), [x, y])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for g, ref in zip(grads, ref_grads):
        assert ref.abs().max() <= 1e-12
        assert torch.count_nonzero(g) == 0, g
