"""SigLIP and CLIP: the ``siglip`` op and ``siglip_loss`` / ``clip_loss`` against OpenCLIP 3.3.0's own ``loss.py``
(loaded by path, ``tests/open_clip_oracle.py``), on every backend."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_within_measured_error, is_interpreted
from open_clip_oracle import load as load_open_clip

from embedloss_kernels import clip_loss, reference, siglip_loss
from embedloss_kernels.ops import backend_ops

OC = load_open_clip()
needs_oc = pytest.mark.skipif(isinstance(OC, str), reason=OC if isinstance(OC, str) else "")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest entry (exact zeros compare absolutely)."""
    scale = ref.detach().abs().max().item() or 1.0
    return (a.detach().double() - ref.detach().double()).abs().max().item() / scale


def draw(gen, b, d, normalized, dtype=torch.float64):
    x = torch.randn(b, d, generator=gen, dtype=torch.float64)
    y = torch.randn(b, d, generator=gen, dtype=torch.float64)
    if normalized:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype)


def configs(n, interpreted, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        hi_b, hi_d = (9, 24) if interpreted else (130, 64)
        b = 1 + int(torch.randint(hi_b, (1,), generator=gen)) if k else 1
        d = 1 + int(torch.randint(hi_d, (1,), generator=gen))
        s = math.exp(float(torch.rand(1, generator=gen)) * math.log(100.0))  # 1 .. 100
        bias = -10.0 + 13.5 * float(torch.rand(1, generator=gen))  # -10 .. 3.5
        out.append((b, d, s, bias, bool(k % 2)))
    return out, gen


def run(fn, x, y, s, b, **kw):
    """Loss and gradients of x, y, logit_scale, logit_bias (leaf copies, work dtype for the scalars)."""
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    wd = torch.float64 if x.dtype == torch.float64 else torch.float32
    sr = torch.tensor(s, dtype=wd, device=x.device, requires_grad=True)
    br = None if b is None else torch.tensor(b, dtype=wd, device=x.device, requires_grad=True)
    loss = fn(xr, yr, sr, br, **kw)
    loss.backward()
    return [loss, xr.grad, yr.grad, sr.grad] + ([] if br is None else [br.grad])


def oc_siglip(x, y, s, b):
    return OC.SigLipLoss()(x, y, s, b)


def oc_clip(x, y, s, b):
    return OC.ClipLoss()(x, y, s, b)


@needs_oc
def test_siglip_float64_matches_open_clip(backend):
    interpreted = is_interpreted(backend)
    cases, _ = configs(6 if interpreted else 200, interpreted, seed=22)
    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    for b_rows, d, s, bias, normalized in cases:
        x, y = draw(gen, b_rows, d, normalized)
        ours = run(lambda *a: siglip_loss(*a, backend=backend), x, y, s, bias)
        want = run(oc_siglip, x, y, s, bias)
        for name, o, w in zip(("loss", "dx", "dy", "dscale", "dbias"), ours, want):
            err = rel(o, w)
            worst = max(worst, err)
            assert err < 1e-8, (backend, b_rows, d, s, bias, normalized, name, err)


@needs_oc
def test_clip_float64_matches_open_clip(backend):
    interpreted = is_interpreted(backend)
    cases, _ = configs(6 if interpreted else 200, interpreted, seed=23)
    gen = torch.Generator().manual_seed(6)
    for k, (b_rows, d, s, bias, normalized) in enumerate(cases):
        x, y = draw(gen, b_rows, d, normalized)
        use_bias = bias if k % 3 else None
        ours = run(lambda *a: clip_loss(*a, backend=backend), x, y, s, use_bias)
        want = run(oc_clip, x, y, s, use_bias)
        for name, o, w in zip(("loss", "dx", "dy", "dscale"), ours[:4], want[:4]):
            assert rel(o, w) < 1e-8, (backend, b_rows, d, s, use_bias, name, rel(o, w))
        if use_bias is not None:  # the bias cancels in every softmax: ours is exactly 0, OpenCLIP's round-off
            assert ours[4].item() == 0.0 and abs(want[4].item()) < 1e-12


@needs_oc
@pytest.mark.parametrize("loss", ["siglip", "clip"])
@pytest.mark.parametrize("dtype, factor", [(torch.float32, 4.0), (torch.bfloat16, 2.0)], ids=["fp32", "bf16"])
def test_low_precision_within_open_clip_error(backend, loss, dtype, factor):
    """fp32 / bf16 features (scale and bias fp32 tensors, as OpenCLIP's parameters are): our loss and gradients
    within 4x (fp32) / 2x (bf16) of OpenCLIP's own error at that precision, both measured against float64 OpenCLIP
    on the same rounded inputs, per config and quantity (``conftest.assert_within_measured_error``: a lucky, nearly
    exact OpenCLIP result is floored at a few units of round-off)."""
    interpreted = is_interpreted(backend)
    cases, _ = configs(3 if interpreted else 24, interpreted, seed=24)
    gen = torch.Generator().manual_seed(7)
    ours_fn = siglip_loss if loss == "siglip" else clip_loss
    oc_fn = oc_siglip if loss == "siglip" else oc_clip
    names = ("loss", "dx", "dy", "dscale", "dbias")[: (5 if loss == "siglip" else 4)]
    for b_rows, d, s, bias, normalized in cases:
        x64, y64 = draw(gen, b_rows, d, normalized)
        xl, yl = x64.to(dtype), y64.to(dtype)
        want = run(oc_fn, xl.double(), yl.double(), s, bias)  # exact on the rounded inputs
        ours = run(lambda *a: ours_fn(*a, backend=backend), xl, yl, s, bias)
        theirs = run(oc_fn, xl, yl, s, bias)
        assert ours[1].dtype == dtype and ours[2].dtype == dtype
        for i, name in enumerate(names):
            what = f"{backend} {loss} {dtype} B={b_rows} D={d} s={s:.3g} b={bias:.3g} {name}"
            if not want[i].any():  # CLIP at B = 1: every gradient is exactly 0 (a one-entry softmax); round-off only
                size = s * xl.double().norm().item() * yl.double().norm().item()
                assert ours[i].double().norm().item() <= 4 * torch.finfo(dtype).eps * size, what
                continue
            assert_within_measured_error(ours[i], want[i], theirs[i], factor=factor, dtype=dtype, what=what)


def _term_scale(x, y, s, b):
    """(1/B) sum_ij |G_ij| and (1/B) sum_ij |G_ij <x_i, y_j>| in float64: the size of the terms d loss / d bias and
    d loss / d scale add up (they cancel to far less where the positives and negatives balance, so a working-precision
    sum is only accurate to eps times these)."""
    z = s * (x.double() @ y.double().T) + b
    g = torch.sigmoid(z) - torch.eye(*z.shape, dtype=z.dtype, device=z.device)
    return g.abs().sum().item() / x.shape[0], (g * (x.double() @ y.double().T)).abs().sum().item() / x.shape[0]


def _check_close(got, want, x, y, s, b, rel_tol, sum_tol):
    for o in got:
        assert torch.isfinite(o).all()
    for o, w in zip(got[:3], want[:3]):
        assert rel(o, w) < rel_tol, (s, b, o, w)
    g_size, gs_size = _term_scale(x, y, s, b)
    assert abs(got[3].item() - want[3].item()) <= sum_tol * gs_size, (s, b, got[3], want[3])
    assert abs(got[4].item() - want[4].item()) <= sum_tol * g_size, (s, b, got[4], want[4])


def test_siglip_extremes_are_finite_and_exact(backend):
    """|z| = 1e4 in fp32 (no overflow: each wrong-signed pair costs |z|), s = 100 / b = -10 in fp32 and bf16: finite
    and as exact as the working precision allows (fp32: 1e-6; the bias and scale gradients to eps times the size of
    the terms they sum, see _term_scale)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], device=DEVICE)
    y = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [0.8, -0.6]], device=DEVICE)
    for s, b in ((1e4, 0.0), (1e4, -1e4), (100.0, -10.0)):
        got = run(lambda *a: siglip_loss(*a, backend=backend), x, y, s, b)
        want = run(lambda *a: reference.siglip_reference(*a), x.double(), y.double(), s, b)
        _check_close(got, want, x, y, s, b, 1e-6, 1e-6)
    gen = torch.Generator().manual_seed(3)
    xb, yb = draw(gen, 7, 16, True, torch.bfloat16)
    got = run(lambda *a: siglip_loss(*a, backend=backend), xb, yb, 100.0, -10.0)
    want = run(lambda *a: reference.siglip_reference(*a), xb.double(), yb.double(), 100.0, -10.0)
    assert rel(got[0], want[0]) < 1e-5  # the loss sums in fp32
    for o, w in zip(got[1:3], want[1:3]):
        assert rel(o, w) < 2 ** -8  # bf16 gradients: rounded once
    _check_close(got[:1] + want[1:3] + got[3:], want, xb, yb, 100.0, -10.0, 1e-5, 1e-5)


def test_op_negative_blocks_and_offsets(backend):
    """Columns wider than the rows, the positives at an offset, a negative-only block, small row blocks."""
    gen = torch.Generator().manual_seed(11)
    op = backend_ops(backend)["siglip"]
    for b_rows, n_cols, off, has_pos, rows in ((3, 8, 5, True, 2), (4, 6, 0, False, 3), (5, 5, 0, True, 1)):
        x = torch.randn(b_rows, 6, generator=gen, dtype=torch.float64).to(DEVICE)
        y = torch.randn(n_cols, 6, generator=gen, dtype=torch.float64).to(DEVICE)
        s = torch.tensor(4.0, dtype=torch.float64, device=DEVICE, requires_grad=True)
        b = torch.tensor(-1.5, dtype=torch.float64, device=DEVICE, requires_grad=True)
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = op(xr, yr, s, b, off, has_pos, True, rows)
        out[0].backward()  # the direct op call's own autograd: the scale and bias get theirs too
        xw, yw = x.clone().requires_grad_(), y.clone().requires_grad_()
        sw, bw = s.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        want = reference.siglip_reference(xw, yw, sw, bw, off, has_pos)
        want.backward()
        for o, w in zip((out[0], xr.grad, yr.grad, s.grad, b.grad), (want, xw.grad, yw.grad, sw.grad, bw.grad)):
            assert rel(o, w) < 1e-12
        for o, w in zip(out[1:], (xw.grad, yw.grad, sw.grad, bw.grad)):
            assert rel(o, w) < 1e-12


def test_siglip_scalar_forms_and_no_grad(backend):
    gen = torch.Generator().manual_seed(12)
    x, y = draw(gen, 5, 7, True)
    want = reference.siglip_reference(x, y, 10.0, -3.0)
    for s, b in ((10.0, -3.0), (torch.tensor([10.0], dtype=torch.float64), torch.tensor(-3.0)),
                 (torch.tensor(10.0, dtype=torch.float64), None)):
        got = siglip_loss(x, y, s, b, backend=backend)
        ref = want if b is not None else reference.siglip_reference(x, y, 10.0, 0.0)
        assert rel(got, ref) < 1e-12
    # a (1,)-shaped learnable scale gets a (1,) gradient
    s = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
    siglip_loss(x, y, s, -3.0, backend=backend).backward()
    assert s.grad.shape == (1,)


def test_siglip_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="logit_scale"):
        siglip_loss(x, x, torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="logit_bias"):
        siglip_loss(x, x, 10.0, float("nan"))
    with pytest.raises(ValueError, match="batch size"):
        siglip_loss(x, torch.randn(5, 3), 10.0, 0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(x, x, 0.0)


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck(backend, compute_grad):
    """Schema, fake (the four gradient outputs' shapes), autograd registration of the registered op."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(compute_grad)
    y = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(compute_grad)
    s = torch.tensor(3.0, dtype=torch.float64, device=DEVICE)
    b = torch.tensor(-1.0, dtype=torch.float64, device=DEVICE)
    op = backend_ops(backend)["siglip"]
    torch.library.opcheck(op.default, (x, y, s, b, 1, True, compute_grad, 2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
