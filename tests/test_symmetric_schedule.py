"""The symmetric InfoNCE schedule of the cpp and torch backends (DESIGN.md, "The symmetric schedule"): directions
exactly query_to_doc | doc_to_query over the whole batch (OpenCLIP's ClipLoss, MultipleNegativesSymmetricRankingLoss),
without a hardness penalty, computed from S = s Q A^T alone in two passes over row blocks: four matmul-equivalents
per row block instead of six.

* The op takes it: the profiler counts the products of one call (``aten::mm`` and ``aten::addmm_``, which the C++
  kernel's ``at::mm_out`` / ``addmm_`` record too): 4 per row block, against 6 for the general schedule on a row
  range (the distributed paths' call) or with a hardness penalty.
* Several row blocks, odd B (1, and 13 with 4-row blocks), K > 1 hard-negative columns, joint and per_direction,
  cosine and dot, logits far apart from row to row: float64 within 1e-8 of sentence-transformers, and the scale's
  gradient within 1e-8 of the float64 reference.
* float32: within 4x of sentence-transformers' own float32 error.

Both backends run these on CPU tensors on purpose, on a CUDA machine too: the schedule is the plain (CPU) path; on
CUDA the torch backend takes the blocked path (backends/blocked.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_within_measured_error, loss_and_grads, rel_err, seeded_columns

from embedloss_kernels import dispatch, functional, reference
from embedloss_kernels.core.contract import (
    DOC_TO_QUERY,
    HARDNESS_IN_BATCH,
    HARDNESS_NONE,
    QUERY_TO_DOC,
)
from embedloss_kernels.ops import backend_ops

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")

SYMMETRIC = QUERY_TO_DOC | DOC_TO_QUERY
PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_")  # the leaves: aten::matmul runs aten::mm, counted once


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    reason = dispatch.why_not(request.param, "cpu")
    if reason is not None:
        pytest.skip(f"backend {request.param} unavailable on cpu: {reason}")
    return request.param


def count_products(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.name in PRODUCTS for event in prof.events())


def test_four_products_per_row_block(backend):
    op = backend_ops(backend)["infonce"]
    gen = torch.Generator().manual_seed(0)
    q, a = torch.randn(13, 8, generator=gen, dtype=torch.float64), torch.randn(26, 8, generator=gen,
                                                                                 dtype=torch.float64)
    for joint in (True, False):
        for cosine in (True, False):
            # 13 rows in blocks of 4: 4 blocks, 2 products each pass
            assert count_products(lambda: op(q, a, 0, 13, 20.0, cosine, SYMMETRIC, joint, HARDNESS_NONE, 0.0, True,
                                             4)) == 4 * 4
    # the general schedule where the symmetric one does not apply: a row range (3 blocks), a hardness penalty
    assert count_products(lambda: op(q, a, 1, 12, 20.0, True, SYMMETRIC, False, HARDNESS_NONE, 0.0, True, 4)) == 6 * 3
    assert count_products(lambda: op(q, a, 0, 13, 20.0, True, SYMMETRIC, True, HARDNESS_IN_BATCH, 0.5, True,
                                     4)) == 6 * 4
    # a zero strength is no penalty: the symmetric schedule again
    assert count_products(lambda: op(q, a, 0, 13, 20.0, True, SYMMETRIC, True, HARDNESS_IN_BATCH, 0.0, True,
                                     4)) == 4 * 4


# (batch, hard-negative columns, dim, block_rows); block_rows 0: the backend's own choice (one block here)
CASES = [(1, 2, 7, 0), (1, 1, 5, 4), (13, 0, 9, 4), (13, 2, 9, 4), (8, 1, 16, 3), (9, 0, 24, 0), (33, 1, 31, 8)]


def make_columns(batch, n_neg, dim, seed, spread=1.0):
    """CPU float64 columns, offset by 0.1 (the schedule runs on the plain CPU path; see the module docstring)."""
    return [c + 0.1 for c in seeded_columns(seed, 2 + n_neg, batch, dim, spread=spread, device="cpu")]


def st_loss(columns, scale, cosine, partition_mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_fn = st_losses.MultipleNegativesRankingLoss(
            None, scale=scale, similarity_fct=st_util.cos_sim if cosine else st_util.dot_score,
            directions=("query_to_doc", "doc_to_query"), partition_mode=partition_mode)
    return loss_fn.compute_loss_from_embeddings(columns, None)


def our_loss(columns, scale, cosine, partition_mode, backend, block_rows):
    return functional.multiple_negatives_ranking_loss(
        *columns, scale=scale, similarity="cosine" if cosine else "dot",
        directions=("query_to_doc", "doc_to_query"), partition_mode=partition_mode, backend=backend,
        block_rows=block_rows)


@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-neg{c[1]}-D{c[2]}-rows{c[3]}" for c in CASES])
@pytest.mark.parametrize("partition_mode", ["joint", "per_direction"])
@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
def test_float64_matches_sentence_transformers(backend, case, partition_mode, cosine):
    batch, n_neg, dim, block_rows = case
    scale = 20.0 if cosine else 1.5
    columns = make_columns(batch, n_neg, dim, seed=batch * 10 + n_neg, spread=1.0 if cosine else 0.5)
    ref_loss, ref_grads = loss_and_grads(lambda c: st_loss(c, scale, cosine, partition_mode), columns)
    loss, grads = loss_and_grads(lambda c: our_loss(c, scale, cosine, partition_mode, backend, block_rows), columns)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-12)
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert rel_err(g, ref) <= 1e-8, f"column {i}: {rel_err(g, ref)}"


@pytest.mark.parametrize("joint", [True, False], ids=["joint", "per_direction"])
@pytest.mark.parametrize("cosine", [True, False], ids=["cosine", "dot"])
def test_scale_gradient_matches_reference(backend, joint, cosine):
    op = backend_ops(backend)["infonce"]
    q, p, n = make_columns(13, 1, 9, seed=7)
    a = torch.cat([p, n])
    scale = 20.0 if cosine else 1.5
    loss, gq, ga, g_scale = op(q, a, 0, 13, scale, cosine, SYMMETRIC, joint, HARDNESS_NONE, 0.0, True, 4)
    q64, a64 = q.clone().requires_grad_(), a.clone().requires_grad_()
    s64 = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    ref = reference.infonce_reference(q64, list(a64.split(13)), s64, reference.cos_sim if cosine else
                                      reference.dot_score, ("query_to_doc", "doc_to_query"),
                                      "joint" if joint else "per_direction")
    for ours, want in zip((loss, gq, ga, g_scale), (ref.detach(), *torch.autograd.grad(ref, (q64, a64, s64)))):
        assert rel_err(ours, want) <= 1e-8


@pytest.mark.parametrize("joint", [True, False], ids=["joint", "per_direction"])
def test_rows_far_apart_stay_exact(backend, joint):
    """Dot products whose rows and columns live on very different scales (logits from about -300 to 300): every
    exponential is shifted by the exact max of its own row or column, so none overflows or loses the terms that
    matter, in float64 and in float32 (where exp underflows below -87)."""
    columns = make_columns(13, 1, 9, seed=3, spread=0.5)
    columns[0][2] *= 40.0  # a query far larger than the rest: its row dominates the docs' columns
    columns[1][5] *= 30.0  # a positive far larger: its column dominates, its own row is far from the others
    ref_loss, ref_grads = loss_and_grads(lambda c: st_loss(c, 2.0, False, "joint" if joint else "per_direction"),
                                         columns)
    mode = "joint" if joint else "per_direction"
    loss, grads = loss_and_grads(lambda c: our_loss(c, 2.0, False, mode, backend, 4), columns)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-12)
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) <= 1e-8
    cols32 = [c.float() for c in columns]
    st32_loss, st32_grads = loss_and_grads(lambda c: st_loss(c, 2.0, False, mode), cols32)
    loss32, grads32 = loss_and_grads(lambda c: our_loss(c, 2.0, False, mode, backend, 4), cols32)
    assert torch.isfinite(loss32) and all(torch.isfinite(g).all() for g in grads32)
    assert_within_measured_error(loss32, ref_loss, st32_loss, dtype=torch.float32, what="loss")
    for i, (g, g_st, ref) in enumerate(zip(grads32, st32_grads, ref_grads)):
        assert_within_measured_error(g, ref, g_st, dtype=torch.float32, what=f"column {i}")


@pytest.mark.parametrize("case", CASES[2:], ids=[f"B{c[0]}-neg{c[1]}-D{c[2]}-rows{c[3]}" for c in CASES[2:]])
@pytest.mark.parametrize("partition_mode", ["joint", "per_direction"])
@pytest.mark.parametrize("cosine,scale", [(True, 20.0), (True, 100.0), (False, 1.5)], ids=["cos20", "cos100", "dot"])
def test_float32_within_4x_sentence_transformers(backend, case, partition_mode, cosine, scale):
    batch, n_neg, dim, block_rows = case
    columns64 = make_columns(batch, n_neg, dim, seed=batch * 10 + n_neg + 1, spread=1.0 if cosine else 0.5)
    columns32 = [c.float() for c in columns64]
    exact_loss, exact_grads = loss_and_grads(lambda c: st_loss(c, scale, cosine, partition_mode), columns64)
    st32_loss, st32_grads = loss_and_grads(lambda c: st_loss(c, scale, cosine, partition_mode), columns32)
    loss, grads = loss_and_grads(lambda c: our_loss(c, scale, cosine, partition_mode, backend, block_rows),
                                 columns32)
    assert loss.dtype == torch.float64  # loss_and_grads returns float64 copies; the op's own dtype:
    assert our_loss(columns32, scale, cosine, partition_mode, backend, block_rows).dtype == torch.float32
    assert_within_measured_error(loss, exact_loss, st32_loss, dtype=torch.float32, what="loss")
    for i, (g, g_st, ref) in enumerate(zip(grads, st32_grads, exact_grads)):
        assert_within_measured_error(g, ref, g_st, dtype=torch.float32, what=f"column {i}")
