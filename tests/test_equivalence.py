"""Every backend against sentence-transformers 6.2 on random configurations of every option.

float64: loss and every embedding gradient within 1e-8 relative. float32: our error against the float64 result is
at most 4x sentence-transformers' own float32 error (plus a tiny floor for cases where that error is ~0).
"""

import random
import warnings

import pytest
import torch
from conftest import DEVICE, is_interpreted

from embedloss_kernels import functional

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")

DIRECTION_SETS = [
    ("query_to_doc",),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "query_to_query"),
    ("query_to_doc", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]


def random_config(seed: int, small: bool) -> dict:
    rng = random.Random(seed)
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


def loss_and_grads(fn, columns, grad_scale=1.0):
    leaves = [c.detach().clone().requires_grad_() for c in columns]
    loss = fn(leaves)
    (loss * grad_scale).backward()
    return loss.detach().double(), [leaf.grad.double() for leaf in leaves]


def rel_err(ours, ref, floor=1e-10):
    """Norm-relative error; differences below ``floor`` (round-off on exactly-zero gradients) count as zero."""
    diff = (ours - ref).norm().item()
    return 0.0 if diff <= floor else diff / max(ref.norm().item(), 1e-30)


@pytest.mark.parametrize("seed", range(40))
def test_mnrl_float64_matches_sentence_transformers(backend, seed):
    cfg = random_config(seed, small=is_interpreted(backend))
    columns = make_columns(cfg, torch.float64, seed)
    ref_loss, ref_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns, grad_scale=2.0)
    loss, grads = loss_and_grads(lambda c: our_loss(cfg, c, backend), columns, grad_scale=2.0)
    assert loss.dtype == torch.float64
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
    floor = 2e-6
    assert loss.dtype == torch.float64  # .double() of a float32 loss
    assert rel_err(loss, exact_loss) <= 4 * rel_err(st32_loss, exact_loss) + floor, cfg
    # A gradient that is exactly zero in float64 (a saturated softmax, D=1 under cosine) has no relative error to
    # compare: there a difference of one fp32 ulp of a softmax entry times the scale counts as round-off (the
    # exp2/LSE of the Triton kernels round such an entry to 1 - 2^-24 where sentence-transformers gets exactly 1).
    zero_floor = cfg["scale"] * torch.finfo(torch.float32).eps
    for i, (g, g_st, ref) in enumerate(zip(grads, st32_grads, exact_grads)):
        err = rel_err(g, ref, floor=zero_floor if ref.norm() < zero_floor else 1e-10)
        assert err <= 4 * rel_err(g_st, ref) + floor, f"column {i} ({cfg})"


def test_fp32_loss_dtype_and_grad_dtype(backend):
    columns = make_columns(random_config(3, small=True), torch.float32, 0)
    leaves = [c.clone().requires_grad_() for c in columns]
    loss = functional.multiple_negatives_ranking_loss(*leaves, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert all(leaf.grad.dtype == torch.float32 and leaf.grad.shape == leaf.shape for leaf in leaves)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    """fp16/bf16 in: fp32 loss, gradients in the input dtype, close to the float64 result."""
    cfg = dict(random_config(5, small=True), batch=9, dim=24, n_neg=1, cosine=True, scale=20.0)
    columns64 = make_columns(cfg, torch.float64, 1)
    exact_loss, exact_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns64)
    leaves = [c.to(dtype).requires_grad_() for c in columns64]
    loss = our_loss(cfg, leaves, backend)
    assert loss.dtype == torch.float32
    loss.backward()
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    assert rel_err(loss.double(), exact_loss) < tol
    for leaf, ref in zip(leaves, exact_grads):
        assert leaf.grad.dtype == dtype
        assert rel_err(leaf.grad.double(), ref) < 4 * tol


@pytest.mark.parametrize("seed", range(12))
def test_cosent_and_angle_float64_match_sentence_transformers(backend, seed):
    rng = random.Random(seed)
    small = is_interpreted(backend)
    batch = rng.choice([1, 2, 9, 16] if small else [1, 2, 9, 64, 301])
    dim = rng.choice([1, 5, 8, 17] if small else [1, 5, 8, 33, 64])
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


def test_no_grad_skips_gradient_work(backend):
    columns = make_columns(random_config(4, small=True), torch.float32, 4)
    with torch.no_grad():
        loss = functional.multiple_negatives_ranking_loss(*[c.requires_grad_() for c in columns], backend=backend)
    assert not loss.requires_grad
    plain = functional.multiple_negatives_ranking_loss(*[c.detach() for c in columns], backend=backend)
    assert not plain.requires_grad
    torch.testing.assert_close(loss, plain)


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
