"""PyTorch's autograd surface on every backend: forward mode, torch.func transforms, torch.compile as the first call
into a fresh process, refused second derivatives. The float64 reference (plain autograd) is the oracle."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, assert_float64_close, assert_within_measured_error
from torch.autograd import forward_ad

from embedloss_kernels import functional, reference

ROOT = Path(__file__).resolve().parents[1]
LABELS = [0.1, 0.9, 0.4, 0.4, 0.7]


def tensors(n, batch=5, dim=7, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=gen, dtype=dtype).to(DEVICE) for _ in range(n)]


def labels():
    return torch.tensor(LABELS, dtype=torch.float64, device=DEVICE)


# Each case: (ours(first, second, backend), the reference(first, second)); the second input gets a tangent too.
CASES = {
    "mnrl": (lambda x, y, be: functional.multiple_negatives_ranking_loss(x, y, backend=be),
             lambda x, y: reference.infonce_reference(x, [y])),
    "mnrl_all_directions_dot": (
        lambda x, y, be: functional.multiple_negatives_ranking_loss(
            x, y, similarity="dot", scale=1.5, directions=reference_directions(), backend=be),
        lambda x, y: reference.infonce_reference(x, [y], 1.5, reference.dot_score, reference_directions())),
    "cosent": (lambda x, y, be: functional.cosent_loss(x, y, labels(), backend=be),
               lambda x, y: reference.cosent_pairs_reference(x, y, labels())),
    "angle": (lambda x, y, be: functional.angle_loss(x, y, labels=labels(), backend=be),
              lambda x, y: reference.cosent_pairs_reference(x, y, labels(), 20.0, reference.pairwise_angle_sim)),
}


def reference_directions():
    return ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


# -- 1. forward mode -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_jvp_matches_reference(backend, case):
    ours, ref = CASES[case]
    x, y, tx, ty = tensors(4)
    _, tangent = torch.func.jvp(lambda a, b: ours(a, b, backend), (x, y), (tx, ty))
    _, expected = torch.func.jvp(ref, (x, y), (tx, ty))
    assert tangent.abs() > 1e-3  # never the zero tangent of a function that ignores forward mode
    torch.testing.assert_close(tangent, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["mnrl", "cosent"])
def test_forward_ad_dual_tensors_and_jacfwd(backend, case):
    ours, ref = CASES[case]
    x, y, tx = tensors(3, seed=1)
    with forward_ad.dual_level():
        loss = ours(forward_ad.make_dual(x, tx), y, backend)
        tangent = forward_ad.unpack_dual(loss).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, torch.func.jvp(lambda a: ref(a, y), (x,), (tx,))[1], rtol=1e-8, atol=1e-10)
    jac = torch.func.jacfwd(lambda a: ours(a, y, backend))(x)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda a: ref(a, y))(x), rtol=1e-8, atol=1e-10)


def test_jvp_of_low_precision_inputs_is_float32(backend):
    x, y, tx = tensors(3, seed=2, dtype=torch.bfloat16)
    ours = CASES["mnrl"][0]
    loss, tangent = torch.func.jvp(lambda a: ours(a, y, backend), (x,), (tx,))
    assert tangent.dtype == loss.dtype == torch.float32
    expected = torch.func.jvp(lambda a: CASES["mnrl"][1](a, y.double()), (x.double(),), (tx.double(),))[1]
    torch.testing.assert_close(tangent.double(), expected, rtol=0.05, atol=0.05)


# -- 6. torch.func.grad / jacrev / vmap ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_func_grad_and_jacrev_match_reference(backend, case):
    ours, ref = CASES[case]
    x, y = tensors(2, seed=3)
    grads = torch.func.grad(lambda a, b: ours(a, b, backend), argnums=(0, 1))(x, y)
    expected = torch.func.grad(ref, argnums=(0, 1))(x, y)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.func.jacrev(lambda a: ours(a, y, backend))(x),
                               torch.func.jacrev(lambda a: ref(a, y))(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", ["mnrl", "cosent"])
def test_vmap_matches_a_loop(backend, case):
    ours, ref = CASES[case]
    xs = torch.stack(tensors(3, seed=4))  # (3, B, D): three independent batches
    (y,) = tensors(1, seed=5)
    losses = torch.func.vmap(lambda a: ours(a, y, backend))(xs)
    torch.testing.assert_close(losses, torch.stack([ref(a, y) for a in xs]), rtol=1e-8, atol=1e-10)
    # per-sample gradients: vmap over grad
    grads = torch.func.vmap(torch.func.grad(lambda a: ours(a, y, backend)))(xs)
    torch.testing.assert_close(grads, torch.stack([torch.func.grad(lambda a: ref(a, y))(a) for a in xs]),
                               rtol=1e-8, atol=1e-10)


def test_vmap_skips_the_finite_check(backend, monkeypatch):
    monkeypatch.setenv("EMBEDLOSS_CHECK_FINITE", "1")
    xs = torch.stack(tensors(2, seed=6))
    (y,) = tensors(1, seed=7)
    torch.func.vmap(lambda a: functional.multiple_negatives_ranking_loss(a, y, backend=backend))(xs)
    # the check itself still runs outside transforms
    bad = xs[0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        functional.multiple_negatives_ranking_loss(bad, y, backend=backend)


SECOND_ORDER = {
    "hessian": lambda f, x, t: torch.func.hessian(f)(x),
    "jacrev(grad)": lambda f, x, t: torch.func.jacrev(torch.func.grad(f))(x),
    "grad(grad)": lambda f, x, t: torch.func.grad(lambda a: torch.func.grad(f)(a).sum())(x),
    "jvp(jvp)": lambda f, x, t: torch.func.jvp(lambda a: torch.func.jvp(f, (a,), (t,))[1], (x,), (t,)),
    "jvp(grad)": lambda f, x, t: torch.func.jvp(torch.func.grad(f), (x,), (t,)),
    "grad(jvp)": lambda f, x, t: torch.func.grad(lambda a: torch.func.jvp(f, (a,), (t,))[1])(x),
}


@pytest.mark.parametrize("how", list(SECOND_ORDER))
def test_second_derivatives_raise_instead_of_returning_zero(backend, how):
    x, y, t = tensors(3, seed=8)
    f = lambda a: functional.multiple_negatives_ranking_loss(a, y, backend=backend)  # noqa: E731
    with pytest.raises(RuntimeError, match="embedloss_kernels losses do not support double backward"):
        SECOND_ORDER[how](f, x, t)


def test_reverse_over_forward_mode_raises(backend):
    x, y, t = tensors(3, seed=9)
    x.requires_grad_()
    with forward_ad.dual_level():
        loss = functional.multiple_negatives_ranking_loss(forward_ad.make_dual(x, t), y, backend=backend)
        tangent = forward_ad.unpack_dual(loss).tangent
    with pytest.raises(RuntimeError, match="do not support double backward"):
        tangent.backward()


def test_reverse_mode_does_not_keep_the_concatenated_candidates(backend):
    """Plain reverse mode saves only the gradients: the candidates the functional API concatenates (B*K*D) are
    freed after the forward pass, not kept until backward. Forward mode and torch.func still keep the inputs."""
    x, y, z = (t.requires_grad_() for t in tensors(3, seed=11))
    for loss in (functional.multiple_negatives_ranking_loss(x, y, z, backend=backend),
                 functional.matryoshka_mnrl_loss(x, y, z, dims=[3, 7], backend=backend)):
        saved = loss.grad_fn.saved_tensors
        assert saved[-2:] == (None, None)
        loss.backward()
    want = [t.grad.clone() for t in (x, y, z)]
    for t in (x, y, z):
        t.grad = None
    for loss in (reference.infonce_reference(x, [y, z]),
                 reference.matryoshka_reference(x, [y, z], [3, 7], [1.0, 1.0], reference.cos_sim, scale=20.0)):
        loss.backward()
    torch.testing.assert_close([t.grad for t in (x, y, z)], want)


def test_backward_twice_raises_like_pytorch(backend):
    x, y = (t.requires_grad_() for t in tensors(2, seed=10))
    lab = labels()
    for loss in (functional.multiple_negatives_ranking_loss(x, y, backend=backend),
                 functional.cosent_loss(x, y, lab, backend=backend)):
        loss.backward()
        grad = x.grad.clone()
        with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
            loss.backward()
        torch.testing.assert_close(x.grad, grad)  # not doubled
        x.grad = None
    loss = functional.multiple_negatives_ranking_loss(x, y, backend=backend)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()  # with retain_graph the second one is allowed and accumulates, as PyTorch's
    torch.testing.assert_close(x.grad, 2 * once)


def _pair_labels(n):
    return torch.linspace(0.05, 0.95, n, dtype=torch.float64, device=DEVICE).roll(n // 3)


def _guide(x, y, z):
    """A separate guide model's embeddings of the same rows (fixed, so its masks are the same on every call)."""
    gen = torch.Generator().manual_seed(99)
    mix = torch.randn(x.shape[1], 5, generator=gen, dtype=torch.float64).to(DEVICE)
    return [t.detach() @ mix for t in (x, y, z)]


def _loss_of(name, x, y, z, backend):
    """One loss of each op family (CoSENT's takes x and y only); only ``name``'s is computed."""
    if name == "mnrl":
        return functional.multiple_negatives_ranking_loss(x, y, z, backend=backend)
    if name == "matryoshka":
        return functional.matryoshka_mnrl_loss(x, y, z, dims=[3, 7], weights=[0.5, 2.0], backend=backend)
    if name == "cosent":
        return functional.cosent_loss(x, y, _pair_labels(x.shape[0]), backend=backend)
    assert name == "gist", name
    return functional.gist_loss(x, y, z, guide=_guide(x, y, z), temperature=0.1, backend=backend)


def _reference_of(name, x, y, z):
    if name == "mnrl":
        return reference.infonce_reference(x, [y, z])
    if name == "matryoshka":
        return reference.matryoshka_reference(x, [y, z], [3, 7], [0.5, 2.0], reference.cos_sim, scale=20.0)
    if name == "cosent":
        return reference.cosent_pairs_reference(x, y, _pair_labels(x.shape[0]))
    assert name == "gist", name
    guide = _guide(x, y, z)
    return reference.gist_reference(x, [y, z], guide[0], guide[1:], temperature=0.1)


def _reference_grads(name, factor, batch=5, dim=7):
    x, y, z = (t.requires_grad_() for t in tensors(3, batch=batch, dim=dim, seed=12))
    (factor * _reference_of(name, x, y, z)).backward()
    return _grads(x, y, z)


def _grads(*tensors):
    return [t.grad for t in tensors if t.grad is not None]


@pytest.mark.parametrize("name", ["mnrl", "matryoshka", "cosent", "gist"])
def test_retained_graph_gradients_never_share_the_saved_ones(backend, name):
    # Without retain_graph, backward hands the saved gradients on (scaled in place) instead of copying them. With it,
    # they must stay private: an in-place change of .grad (optimizer.zero_grad(set_to_none=False), clipping) between
    # two backwards must not reach the second, and a grad_output other than 1 must not rescale them.
    want = _reference_grads(name, 3.0, batch=5)
    x, y, z = (t.requires_grad_() for t in tensors(3, seed=12))
    loss = _loss_of(name, x, y, z, backend)
    (3.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(_grads(x, y, z), want, rtol=1e-8, atol=1e-12)
    for t in (x, y):
        t.grad.zero_()
    if z.grad is not None:
        z.grad.zero_()
    (3.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(_grads(x, y, z), want, rtol=1e-8, atol=1e-12)
    for t in (x, y, z):
        t.grad = None
    loss.backward(torch.tensor(3.0, dtype=loss.dtype, device=DEVICE))  # the last one releases and may reuse
    torch.testing.assert_close(_grads(x, y, z), want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["mnrl", "matryoshka", "cosent", "gist"])
def test_batched_gradients_match_the_reference(backend, name):
    # is_grads_batched and jacobian(vectorize=True) run backward under the legacy vmap with a batched grad_output:
    # backward must neither sync on it (.item()) nor scale the saved gradients in place by it.
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=DEVICE)
    want = _reference_grads(name, 1.0)
    x, y, z = (t.requires_grad_() for t in tensors(3, seed=12))
    loss = _loss_of(name, x, y, z, backend)
    got = torch.autograd.grad(loss, (x, y), v, is_grads_batched=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, v[:, None, None] * w, rtol=1e-10, atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda a: _loss_of(name, a, y, z, backend), x, vectorize=True)
    torch.testing.assert_close(jac, want[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mnrl", "matryoshka", "cosent", "gist"])
def test_saved_tensor_hooks_see_their_tensors_unchanged(backend, name):
    # A pack hook may keep what it packs (offloading, checkpoint tools): those tensors must never change afterwards.
    packed = []

    def pack(t):
        packed.append(t)
        return t

    x, y, z = (t.requires_grad_() for t in tensors(3, seed=12))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss_of(name, x, y, z, backend)
    before = [t.clone() for t in packed]
    (3.0 * loss).backward()
    assert packed and all(torch.equal(a, b) for a, b in zip(packed, before))
    torch.testing.assert_close(_grads(x, y, z), _reference_grads(name, 3.0), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("factor", [1.0, 0.25])
@pytest.mark.parametrize("name", ["mnrl", "matryoshka", "cosent", "gist"])
def test_backward_allocates_no_gradient_sized_tensor(backend, name, factor):
    # The op computed the gradients in its forward; a backward that releases the graph scales them in place and
    # hands them to .grad (no copy, no zero-filled gradients for the gradient outputs). A retained graph copies.
    x, y, z = (t.requires_grad_() for t in tensors(3, batch=64, dim=24, seed=12))
    one_gradient = x.numel() * x.element_size()
    for retain in (True, False):
        for t in (x, y, z):
            t.grad = None
        loss = _loss_of(name, x, y, z, backend)
        allocated = _bytes_allocated_during(lambda: (factor * loss).backward(retain_graph=retain))
        if retain:
            assert allocated >= one_gradient, allocated  # the measurement sees a copy when there is one
        else:
            assert allocated < one_gradient, allocated
    want = _reference_grads(name, factor, batch=64, dim=24)
    torch.testing.assert_close(_grads(x, y, z), want, rtol=1e-8, atol=1e-12)


def _bytes_allocated_during(fn) -> int:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


# -- 2. torch.compile(fullgraph=True) as the first call into the package, in a fresh process ------------------------
COMPILE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import embedloss_kernels as ek

    backend, plan, device = sys.argv[1], sys.argv[2].split(","), torch.device(sys.argv[3])
    os.environ["EMBEDLOSS_BACKEND"] = backend  # the modules read it; the functional calls pass backend=
    gen = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(6, 8, generator=gen).to(device) for _ in range(3))
    labels = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.7, 0.2], device=device)

    def functional_calls(q, p, n, scale):
        mnrl = ek.multiple_negatives_ranking_loss(q, p, n, scale=scale, backend=backend)
        sym = ek.multiple_negatives_ranking_loss(q, p, scale=scale, directions=("query_to_doc", "doc_to_query"),
                                                 partition_mode="per_direction", hardness_mode="all_negatives",
                                                 hardness_strength=0.5, backend=backend)
        cos = ek.cosent_loss(q, p, labels, scale=scale, backend=backend)
        return mnrl + 2 * sym + 3 * cos + 4 * ek.angle_loss(q, p, n, scale=scale, backend=backend)

    modules = [ek.MultipleNegativesRankingLoss(None), ek.MultipleNegativesSymmetricRankingLoss(None),
               ek.CoSENTLoss(None), ek.AnglELoss(None)]

    def module_calls(q, p, n, scale):
        total = 0
        for i, m in enumerate(modules):
            m.scale = scale
            columns = [q, p, n] if i != 1 else [q, p]
            lab = labels if isinstance(m, ek.CoSENTLoss) and not isinstance(m, ek.AnglELoss) else None
            total = total + (i + 1) * m.compute_loss_from_embeddings(columns, lab)
        return total

    steps = {"functional": functional_calls, "modules": module_calls}
    results = {}
    for item in plan:  # "static-functional": static shapes, the functional entry compiled first; and so on
        mode, first = item.split("-")
        order = [first] + [k for k in steps if k != first]
        for name in order:  # every compiled call runs before any eager one
            compiled = torch.compile(steps[name], fullgraph=True, dynamic=mode == "dynamic", backend="aot_eager")
            for scale in (20.0, 7.5):  # a second scale: dynamic=True traces it as a symbolic float
                ins = [t.clone().requires_grad_() for t in (q, p, n)]
                out = compiled(*ins, scale)
                out.backward()
                results[mode, name, scale] = (out.detach(), [t.grad for t in ins])
    for (_mode, name, scale), (out, grads) in results.items():
        ins = [t.clone().requires_grad_() for t in (q, p, n)]
        expected = steps[name](*ins, scale)
        expected.backward()
        torch.testing.assert_close(out, expected.detach())
        for g, t in zip(grads, ins):
            torch.testing.assert_close(g, t.grad)
    print("compiled ok")
    """
)


# One fresh process per backend compiles both shape modes through both entries, every compiled call before any eager
# one. What comes first differs by backend, so that each backend's op and each (shape mode, entry) pair is the very
# first call into the package in some process (a fresh process costs ~10 s on 2 cores: one per backend, not four).
COMPILE_PLANS = {"torch": "static-functional,dynamic-modules", "cpp": "dynamic-modules,static-functional",
                 "triton": "dynamic-modules,static-functional"}


def test_compile_fullgraph_is_the_first_call_in_a_fresh_process(backend):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if DEVICE.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, backend, COMPILE_PLANS[backend], str(DEVICE)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0 and "compiled ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.parametrize("mode", ["inputs-without-grad", "no_grad"])
def test_compile_fullgraph_without_gradients_gives_the_eager_loss(backend, mode):
    """An evaluation loss under ``torch.compile(fullgraph=True)``: inputs that require no grad, or ``torch.no_grad``
    around inputs that do, give eager's loss (dynamo cannot trace an autograd.Function no input needs: the op runs
    alone there), for every op's entry."""
    gen = torch.Generator().manual_seed(5)
    q, p, n = (torch.randn(5, 7, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))
    labels = torch.rand(5, generator=gen, dtype=torch.float64).to(DEVICE)

    def losses(q, p, n):
        return torch.stack([
            functional.multiple_negatives_ranking_loss(q, p, n, scale=20.0, backend=backend),
            functional.cosent_loss(q, p, labels, scale=20.0, backend=backend),
            functional.siglip_loss(q, p, 10.0, -3.0, backend=backend),
            functional.clip_loss(q, p, 10.0, backend=backend),
        ])

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    if mode == "no_grad":
        q, p, n = (t.clone().requires_grad_() for t in (q, p, n))
        with torch.no_grad():
            got = compiled(q, p, n)
    else:
        got = compiled(q, p, n)
    assert got.grad_fn is None
    assert_float64_close(got, losses(q, p, n).detach(), what=f"{backend} {mode}")


# -- 4. the cpp op's own autograd (direct calls of torch.ops.embedloss_cpp.*) ----------------------------------------
def test_cpp_op_backward_twice_raises_like_pytorch():
    # the C++ extension computes on CPU: this test runs on CPU on purpose, whatever DEVICE is
    from embedloss_kernels import dispatch

    reason = dispatch.why_not("cpp", "cpu")
    if reason is not None:
        pytest.skip(f"cpp backend unavailable: {reason}")
    from embedloss_kernels.core.contract import QUERY_TO_DOC, SIM_COSINE

    q, a = (torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    labels = torch.tensor([0.1, 0.5, 0.2, 0.9], dtype=torch.float64)
    for out in (torch.ops.embedloss_cpp.infonce(q, a, 0, 4, 20.0, True, QUERY_TO_DOC, True, 0, 0.0, True, 0),
                torch.ops.embedloss_cpp.cosent(q, a, labels, 20.0, SIM_COSINE, True)):
        loss = out[0]
        loss.backward()
        grad = q.grad.clone()
        with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
            loss.backward()
        torch.testing.assert_close(q.grad, grad)  # not doubled
        torch.testing.assert_close(grad, out[1])
        q.grad = None


# -- 5. very large norms: normalized before the products, as F.normalize (sentence-transformers) does ----------------
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e19), (torch.float32, 3e18), (torch.bfloat16, 1e30),
                                             (torch.float32, 1.5e19), (torch.float64, 1e150)])
def test_large_norms_do_not_overflow(backend, dtype, magnitude):
    gen = torch.Generator().manual_seed(11)
    cols = [(torch.randn(5, 3, generator=gen, dtype=torch.float64) * magnitude).to(dtype).to(DEVICE)
            for _ in range(3)]
    ours = [c.clone().requires_grad_() for c in cols]
    loss = functional.multiple_negatives_ranking_loss(*ours, directions=reference_directions(), backend=backend)
    loss.backward()
    ref_cols = [c.clone().requires_grad_() for c in cols]  # the reference normalizes in the input dtype, as ST
    ref = reference.infonce_reference(ref_cols[0], ref_cols[1:], directions=reference_directions())
    ref.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(c.grad).all() for c in ours)
    exact_cols = [c.double().requires_grad_() for c in cols]
    exact = reference.infonce_reference(exact_cols[0], exact_cols[1:], directions=reference_directions())
    exact.backward()
    if dtype == torch.float64:
        assert_float64_close(loss, exact, what="loss")
        for c, e in zip(ours, exact_cols):
            assert_float64_close(c.grad * magnitude, e.grad * magnitude, what="gradient")
        return
    # the reference in the input dtype is the plain low-precision computation: ours within 4x its measured error
    assert_within_measured_error(loss, exact, ref.float(), dtype=dtype, what="loss")
    for c, r, e in zip(ours, ref_cols, exact_cols):
        assert_within_measured_error(c.grad.double() * magnitude, e.grad * magnitude, r.grad.double() * magnitude,
                                     dtype=dtype, what="gradient")
