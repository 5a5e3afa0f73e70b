"""The C++ extension (``cpp`` backend): op registration (opcheck), float64 gradcheck, torch.compile, double
backward, odd shapes and every option against the float64 oracle, thread-count independence.

The cpp backend runs on CPU only: these tests build CPU tensors on purpose, on a CUDA machine too."""

from __future__ import annotations

import itertools

import pytest
import torch

from embedloss_kernels import dispatch, functional, reference
from embedloss_kernels.core.contract import (
    DOC_TO_DOC,
    DOC_TO_QUERY,
    HARDNESS_ALL,
    HARDNESS_HARD,
    HARDNESS_IN_BATCH,
    HARDNESS_NONE,
    QUERY_TO_DOC,
    QUERY_TO_QUERY,
    SIM_ANGLE,
    SIM_COSINE,
    SIM_DOT,
)

_REASON = dispatch.why_not("cpp", "cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpp backend unavailable: {_REASON}")

HARDNESS_NAMES = {HARDNESS_NONE: None, HARDNESS_IN_BATCH: "in_batch_negatives", HARDNESS_HARD: "hard_negatives",
                  HARDNESS_ALL: "all_negatives"}
DIRECTION_NAMES = {QUERY_TO_DOC: "query_to_doc", QUERY_TO_QUERY: "query_to_query", DOC_TO_QUERY: "doc_to_query",
                   DOC_TO_DOC: "doc_to_doc"}


def ops():
    """The cpp backend's ops (``torch.ops.embedloss_cpp.*``) and its ``why_not``."""
    from types import SimpleNamespace

    from embedloss_kernels.backends import cpp
    from embedloss_kernels.ops import backend_ops

    return SimpleNamespace(**backend_ops("cpp"), why_not=cpp.why_not)


def rand(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) + 0.3  # a shared offset: cosines away from 0


def oracle(q, a, row_start, row_count, scale, cosine, directions, joint, hardness, strength):
    """Loss and gradients of the materialized float64 reference for the op's arguments."""
    q64 = q.detach().double().requires_grad_()
    a64 = a.detach().double().requires_grad_()
    docs = list(a64.split(q.shape[0]))
    names = [name for bit, name in DIRECTION_NAMES.items() if directions & bit]
    sim = reference.cos_sim if cosine else reference.dot_score
    loss = reference.infonce_reference(q64, docs, scale, sim, names, "joint" if joint else "per_direction",
                                       HARDNESS_NAMES[hardness], strength, row_start, row_count)
    gq, ga = torch.autograd.grad(loss, (q64, a64))
    return loss.detach(), gq, ga


# -- every option of the InfoNCE op against the oracle, odd shapes, explicit small blocks --------------------------
DIRECTION_SETS = [QUERY_TO_DOC, QUERY_TO_DOC | DOC_TO_QUERY, QUERY_TO_DOC | QUERY_TO_QUERY | DOC_TO_QUERY | DOC_TO_DOC,
                  QUERY_TO_DOC | DOC_TO_DOC]


@pytest.mark.parametrize("bq,k,d", [(1, 2, 7), (5, 1, 13), (11, 3, 33)])
@pytest.mark.parametrize("directions", DIRECTION_SETS)
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("hardness", [HARDNESS_NONE, HARDNESS_IN_BATCH, HARDNESS_HARD, HARDNESS_ALL])
def test_infonce_matches_oracle(bq, k, d, directions, joint, hardness):
    if not joint and directions & (QUERY_TO_QUERY | DOC_TO_DOC):
        pytest.skip("per_direction excludes query_to_query and doc_to_doc")
    if bq == 1 and directions & (QUERY_TO_QUERY | DOC_TO_DOC) and k == 1:
        pytest.skip("B=1 with only self-masked blocks has no negatives there")
    q, a = rand(bq, d, seed=1), rand(k * bq, d, seed=2)
    row_start, row_count = (1, bq - 2) if bq > 4 else (0, bq)
    for cosine, dtype in [(True, torch.float64), (False, torch.float64), (True, torch.float32)]:
        args = (row_start, row_count, 2.5 if not cosine else 20.0, cosine, directions, joint, hardness, 0.7)
        loss, gq, ga = ops().infonce(q.to(dtype), a.to(dtype), *args[:6], hardness, 0.7, True, 3)[:3]
        ref_loss, ref_gq, ref_ga = oracle(q, a, *args)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert gq.dtype == dtype and ga.dtype == dtype
        tol = {} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
        torch.testing.assert_close(loss.double(), ref_loss, **tol)
        torch.testing.assert_close(gq.double(), ref_gq, **tol)
        torch.testing.assert_close(ga.double(), ref_ga, **tol)


@pytest.mark.parametrize("joint", [True, False])
def test_zero_norm_row_is_clamped_like_f_normalize(joint):
    q, a = rand(6, 9, seed=24), rand(12, 9, seed=25)
    q[2] = 0.0  # its norm clamps at EPS: cosine 0 with everything, gradient g / EPS without the radial part
    a[7] = 0.0
    dirs = QUERY_TO_DOC | DOC_TO_QUERY
    out = ops().infonce(q, a, 0, 6, 20.0, True, dirs, joint, HARDNESS_NONE, 0.0, True, 2)
    for x, y in zip(out, oracle(q, a, 0, 6, 20.0, True, dirs, joint, HARDNESS_NONE, 0.0)):
        torch.testing.assert_close(x, y)


def test_block_size_and_no_grad_paths():
    q, a = rand(37, 19, seed=3), rand(74, 19, seed=4)
    base = ops().infonce(q, a, 0, 37, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, True, 0)
    for block_rows in (1, 4, 10, 37, 100):
        out = ops().infonce(q, a, 0, 37, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, True, block_rows)
        for x, y in zip(out, base):
            torch.testing.assert_close(x, y)
    loss, gq, ga = ops().infonce(q, a, 0, 37, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, False, 0)[:3]
    torch.testing.assert_close(loss, base[0])
    assert gq.shape == (0,) and ga.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    q, a = rand(24, 40, seed=5), rand(48, 40, seed=6)
    ql, al = q.to(dtype), a.to(dtype)
    loss, gq, ga = ops().infonce(ql, al, 0, 24, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, True, 0)[:3]
    assert loss.dtype == torch.float32 and gq.dtype == dtype and ga.dtype == dtype
    ref_loss, ref_gq, ref_ga = oracle(ql, al, 0, 24, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0)
    # Only the inputs' rounding to `dtype` should matter: compare with the oracle on those rounded inputs.
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gq.double(), ref_gq, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(ga.double(), ref_ga, rtol=2e-2, atol=2e-3)


# -- CoSENT / AnglE ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("similarity", [SIM_COSINE, SIM_DOT, SIM_ANGLE])
@pytest.mark.parametrize("b,d", [(1, 5), (9, 16), (30, 7)])
def test_cosent_matches_oracle(similarity, b, d):
    x, y = rand(b, d, seed=7), rand(b, d, seed=8)
    labels = torch.randint(0, 4, (b,), generator=torch.Generator().manual_seed(9)).double()  # ties included
    loss, gx, gy = ops().cosent(x, y, labels, 3.0, similarity, True)[:3]
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    sim = {SIM_COSINE: reference.pairwise_cos_sim, SIM_DOT: reference.pairwise_dot_score,
           SIM_ANGLE: reference.pairwise_angle_sim}[similarity]
    ref = reference.cosent_reference(3.0 * sim(xr, yr), labels)
    ref_gx, ref_gy = torch.autograd.grad(ref, (xr, yr))
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gy, ref_gy)


# -- registration: opcheck, gradcheck, compile, double backward -------------------------------------------------
OPCHECK_ARGS = [
    (0, 6, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, True, 0),
    (2, 3, 5.0, False, QUERY_TO_DOC | DOC_TO_QUERY, False, HARDNESS_HARD, 0.5, True, 2),
    (0, 6, 20.0, True, QUERY_TO_DOC | QUERY_TO_QUERY | DOC_TO_QUERY | DOC_TO_DOC, True, HARDNESS_ALL, 1.0, True, 0),
    (1, 4, 20.0, True, QUERY_TO_DOC, True, HARDNESS_IN_BATCH, 0.3, False, 0),
]


@pytest.mark.parametrize("args", OPCHECK_ARGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_infonce(args, dtype):
    # Without compute_grad the op has no gradient to give: its inputs must not ask for one.
    q = rand(6, 10, dtype=dtype, seed=10).requires_grad_(args[-2])
    a = rand(12, 10, dtype=dtype, seed=11).requires_grad_(args[-2])
    torch.library.opcheck(torch.ops.embedloss_cpp.infonce.default, (q, a, *args))


@pytest.mark.parametrize("similarity", [SIM_COSINE, SIM_DOT, SIM_ANGLE])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_cosent(similarity, compute_grad):
    x = rand(7, 9, seed=12).requires_grad_(compute_grad)
    y = rand(7, 9, seed=13).requires_grad_(compute_grad)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    torch.library.opcheck(torch.ops.embedloss_cpp.cosent.default, (x, y, labels, 4.0, similarity, compute_grad))


def test_gradcheck_through_functional_api():
    q, p, n = (rand(5, 6, seed=s).requires_grad_() for s in (14, 15, 16))

    def mnrl(q, p, n):
        return functional.multiple_negatives_ranking_loss(
            q, p, n, scale=7.0, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
            backend="cpp")  # no hardness: its stop-gradient term is invisible to finite differences

    assert torch.autograd.gradcheck(mnrl, (q, p, n))
    labels = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.7], dtype=torch.float64)
    for sim in ("cosine", "dot", "angle"):
        assert torch.autograd.gradcheck(
            lambda x, y, sim=sim: functional.cosent_loss(x, y, labels, scale=5.0, similarity=sim, backend="cpp"),
            (q, p))


def test_torch_compile_fullgraph_matches_eager():
    base = [rand(9, 12, dtype=torch.float32, seed=s) for s in (17, 18, 19)]

    def step(q, p, n):
        return functional.multiple_negatives_ranking_loss(q, p, n, backend="cpp") * 2.0  # grad_output != 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_() for t in base]
    comp_in = [t.clone().requires_grad_() for t in base]
    eager_loss, comp_loss = step(*eager_in), compiled(*comp_in)
    eager_loss.backward()
    comp_loss.backward()
    torch.testing.assert_close(comp_loss, eager_loss)
    for e, c in zip(eager_in, comp_in):
        torch.testing.assert_close(c.grad, e.grad)


def test_double_backward_raises():
    q, p = rand(4, 8, seed=20).requires_grad_(), rand(4, 8, seed=21).requires_grad_()
    loss = functional.multiple_negatives_ranking_loss(q, p, backend="cpp")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, (q, p), create_graph=True)
    # The op without gradients refuses backward rather than returning zeros.
    loss, _, _ = ops().infonce(q, p, 0, 4, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, False, 0)[:3]
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


def _direct_calls(q, a, b, labels):
    """Each op of the contract called directly, with gradients: (name, the call, its two differentiable inputs)."""
    return [
        ("infonce", lambda op: op.infonce(q, a, 0, 6, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, True, 0),
         (q, a)),
        ("cosent", lambda op: op.cosent(q, b, labels, 20.0, SIM_COSINE, True), (q, b)),
        ("matryoshka", lambda op: op.matryoshka(q, a, [3, 8], [1.0, 0.5], 0, 6, 20.0, QUERY_TO_DOC, True,
                                                HARDNESS_NONE, 0.0, True, 0), (q, a)),
        ("gist", lambda op: op.gist(q, a, q.detach(), a.detach(), 2, 0, 20.0, 0, 0.0, True, True, True, 0), (q, a)),
    ]


@pytest.mark.parametrize("backend", ["cpp", "torch", "triton"])
def test_direct_op_calls_never_change_what_they_returned(backend):
    # Issue 26: the ops called directly (torch.ops.embedloss_<backend>.<loss>) return their saved gradients; backward
    # must neither scale those in place nor hand them on as .grad, whatever the graph's fate.
    from types import SimpleNamespace

    from conftest import DEVICE

    from embedloss_kernels.ops import backend_ops

    device = torch.device("cpu") if backend == "cpp" else DEVICE  # the cpp kernels are CPU kernels
    if dispatch.why_not(backend, device) is not None:
        pytest.skip(f"{backend}: {dispatch.why_not(backend, device)}")
    op = SimpleNamespace(**backend_ops(backend))
    q = rand(6, 8, dtype=torch.float64, seed=30).to(device).requires_grad_()
    a = rand(12, 8, dtype=torch.float64, seed=31).to(device).requires_grad_()
    b = rand(6, 8, dtype=torch.float64, seed=32).to(device).requires_grad_()
    labels = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 0.7], dtype=torch.float64, device=device)
    for name, call, (x, y) in _direct_calls(q, a, b, labels):
        for retain in (False, True):
            out = call(op)
            returned = [t.clone() for t in out[1:3]]
            x.grad = y.grad = None
            (3.0 * out[0]).backward(retain_graph=retain)
            assert torch.equal(out[1], returned[0]) and torch.equal(out[2], returned[1]), (name, retain)
            torch.testing.assert_close([x.grad, y.grad], [3.0 * returned[0], 3.0 * returned[1]], rtol=1e-12,
                                       atol=1e-14)
            x.grad.zero_()
            y.grad.zero_()
            assert torch.equal(out[1], returned[0]) and torch.equal(out[2], returned[1]), (name, "zero_")


def test_bad_arguments_raise_clear_errors():
    q, a = rand(4, 8), rand(12, 8)
    with pytest.raises(RuntimeError, match=r"a must be \(K\*Bq, D\)"):
        ops().infonce(q, a[:7], 0, 4, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, True, 0)
    with pytest.raises(RuntimeError, match="row_start"):
        ops().infonce(q, a, 2, 4, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, True, 0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops().infonce(q, a.float(), 0, 4, 20.0, True, QUERY_TO_DOC, True, HARDNESS_NONE, 0.0, True, 0)
    with pytest.raises(RuntimeError, match="labels must be"):
        ops().cosent(q, q, torch.zeros(3, dtype=torch.float64), 20.0, SIM_COSINE, True)


# -- backend selection and threads ------------------------------------------------------------------------------
def test_backend_selection(monkeypatch):
    assert dispatch.current_backend("cpu") == "cpp"
    assert "cpp" in dispatch.available_backends("cpu")
    assert ops().why_not(torch.device("cuda")) == "the cpp backend runs on CPU only"
    monkeypatch.setenv("EMBEDLOSS_BACKEND", "cpp")
    assert dispatch.current_backend("cpu") == "cpp"


def test_one_thread_and_many_threads_agree():
    q, a = rand(203, 24, dtype=torch.float32, seed=22), rand(406, 24, dtype=torch.float32, seed=23)
    all_dirs = QUERY_TO_DOC | QUERY_TO_QUERY | DOC_TO_QUERY | DOC_TO_DOC
    before = torch.get_num_threads()
    results = {}
    try:
        for threads, dirs in itertools.product((1, 2, 3), (QUERY_TO_DOC, all_dirs)):
            torch.set_num_threads(threads)
            results[threads, dirs] = ops().infonce(q, a, 0, 203, 20.0, True, dirs, True, HARDNESS_NONE, 0.0, True, 16)
    finally:
        torch.set_num_threads(before)
    for (_threads, dirs), out in results.items():
        for x, y in zip(out, results[1, dirs]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
