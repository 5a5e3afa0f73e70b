"""The OpenCLIP drop-ins (:mod:`embedloss_kernels.open_clip`) against OpenCLIP 3.3.0's own ``loss.py`` (loaded by
path, tests/open_clip_oracle.py): one process, and gloo process groups of 2 and 3 CPU ranks for every SigLIP
``dist_impl`` and every CLIP ``local_loss`` x ``gather_with_grad`` combination; and ``patch_open_clip`` on stand-in
``open_clip`` modules (``import open_clip`` itself needs a torchvision built for this torch)."""

import json
import os
import sys
import types

import pytest
import torch
from conftest import DEVICE, gloo_rank, spawn_gloo
from open_clip_oracle import load as load_open_clip

from embedloss_kernels import dispatch
from embedloss_kernels.open_clip import ClipLoss, SigLipLoss

OC = load_open_clip()
pytestmark = pytest.mark.skipif(isinstance(OC, str), reason=OC if isinstance(OC, str) else "")
SPAWN_TIMEOUT_S = 240


def _rel(a, ref) -> float:
    scale = ref.detach().abs().max().item() or 1.0
    return (a.detach().double() - ref.detach().double()).abs().max().item() / scale


def _grads(module, x, y, s, b, **kw):
    """Loss and the gradients of both features, the scale and the bias (leaf copies)."""
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    sr = s.clone().requires_grad_()
    br = None if b is None else b.clone().requires_grad_()
    out = module(xr, yr, sr, br, **kw)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    loss.backward()
    return [loss, xr.grad, yr.grad, sr.grad] + ([] if br is None else [br.grad if br.grad is not None
                                                                        else torch.zeros_like(br)])


def _features(seed, rows, dim=12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)
    return x, y


def _scalars(dtype=torch.float64):
    return torch.tensor(8.5, dtype=dtype), torch.tensor(-4.25, dtype=dtype)


@pytest.mark.parametrize("output_dict", [False, True])
def test_single_process_matches_open_clip(backend, output_dict):
    os.environ["EMBEDLOSS_BACKEND"] = backend
    try:
        x, y = _features(1, 7)
        x, y = x.to(DEVICE), y.to(DEVICE)
        s, b = (t.to(DEVICE) for t in _scalars())
        for ours, theirs, bias in ((SigLipLoss(), OC.SigLipLoss(), b), (ClipLoss(), OC.ClipLoss(), None),
                                   (ClipLoss(cache_labels=True), OC.ClipLoss(cache_labels=True), b)):
            got = _grads(ours, x, y, s, bias, output_dict=output_dict)
            want = _grads(theirs, x, y, s, bias, output_dict=output_dict)
            if output_dict:
                assert isinstance(ours(x, y, s, bias, output_dict=True), dict)
            for g, w in zip(got, want):
                assert g.shape == w.shape
                assert _rel(g, w) < 1e-8 or (w.abs().max() < 1e-12 and g.abs().max() == 0)
    finally:
        del os.environ["EMBEDLOSS_BACKEND"]


def test_constructor_surface():
    assert SigLipLoss(chunk_size=128).dist_impl == "bidir"
    assert ClipLoss(chunk_size=64).local_loss is False
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    x, y = _features(2, 3)
    with pytest.raises(RuntimeError, match="not initialized"):
        SigLipLoss(world_size=2)(x, y, 1.0, 0.0)


def _combos():
    out = [("siglip", impl) for impl in ("bidir", "shift", "reduce", "gather")]
    return out + [("clip", (local, with_grad)) for local in (False, True) for with_grad in (False, True)]


def _worker(rank, world, init_file, out_dir, backends_):
    errors = {}
    with gloo_rank(rank, world, init_file):
        b_rows = 4
        x_world, y_world = _features(10 + world, b_rows * world)
        x, y = x_world[rank * b_rows : (rank + 1) * b_rows], y_world[rank * b_rows : (rank + 1) * b_rows]
        s, bias = _scalars()
        import embedloss_kernels.functional.siglip as functional_siglip

        ring_calls = []
        real_ring = functional_siglip.siglip_ring

        def counted_ring(*args, **kwargs):
            ring_calls.append(1)
            return real_ring(*args, **kwargs)

        functional_siglip.siglip_ring = counted_ring  # this worker process only
        for kind, opt in _combos():
            for name, schedule in [(n, sch) for n in backends_ for sch in ("ring", "gather")]:
                if kind == "clip" and schedule == "ring":
                    continue  # CLIP runs on the gather schedule only
                os.environ["EMBEDLOSS_BACKEND"] = name
                os.environ["EMBEDLOSS_DISTRIBUTED_SCHEDULE"] = schedule
                if kind == "siglip":
                    ours = SigLipLoss(rank=rank, world_size=world, dist_impl=opt)
                    theirs = OC.SigLipLoss(rank=rank, world_size=world, dist_impl=opt)
                else:
                    kw = dict(local_loss=opt[0], gather_with_grad=opt[1], rank=rank, world_size=world)
                    ours, theirs = ClipLoss(**kw), OC.ClipLoss(**kw)
                got = _grads(ours, x, y, s, bias)
                want = _grads(theirs, x, y, s, bias)
                key = f"{kind}-{opt}-{name}-{schedule}"
                errors[key] = [_rel(g, w) if w.abs().max() > 1e-12 else g.abs().max().item()
                               for g, w in zip(got, want)]
        errors["ring_calls"] = [float(len(ring_calls))]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_open_clip_on_every_rank(world, tmp_path):
    backends_ = [n for n in ("torch", "cpp", "triton") if dispatch.why_not(n, "cpu") is None]  # triton: interpreter
    spawn_gloo(_worker, world, (world, str(tmp_path / "init"), str(tmp_path), backends_), SPAWN_TIMEOUT_S,
               f"world size {world}")
    for rank in range(world):
        with open(tmp_path / f"rank{rank}.json") as f:
            errors = json.load(f)
        assert errors.pop("ring_calls") == [4.0 * len(backends_)]  # every SigLIP dist_impl took the ring once
        assert len(errors) == (4 * 2 + 4) * len(backends_)  # SigLIP on both schedules, CLIP on the gather
        for key, errs in errors.items():
            assert max(errs) < 1e-8, (world, rank, key, errs)


def _stand_in_open_clip():
    """``open_clip``, ``open_clip.loss`` (OpenCLIP's own loss.py) and ``open_clip.factory`` (a ``create_loss`` that
    reads the loss classes from its module's globals, as OpenCLIP's does) as modules in ``sys.modules``."""
    package = types.ModuleType("open_clip")
    factory = types.ModuleType("open_clip.factory")
    factory.ClipLoss, factory.SigLipLoss = OC.ClipLoss, OC.SigLipLoss

    def create_loss(args):
        if args.siglip:
            return factory.SigLipLoss(rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl)
        return factory.ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                cache_labels=True, rank=args.rank, world_size=args.world_size,
                                use_horovod=args.horovod)

    factory.create_loss = create_loss
    package.loss, package.factory = OC, factory
    package.ClipLoss, package.create_loss = OC.ClipLoss, create_loss
    return {"open_clip": package, "open_clip.loss": OC, "open_clip.factory": factory}


def test_patch_open_clip_on_stand_in_modules(monkeypatch):
    from embedloss_kernels import open_clip as ours
    from embedloss_kernels.patching import patch_open_clip, unpatch_open_clip

    modules = _stand_in_open_clip()
    originals = (OC.ClipLoss, OC.SigLipLoss)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    args = types.SimpleNamespace(siglip=True, rank=0, world_size=1, loss_dist_impl=None, local_loss=False,
                                 gather_with_grad=False, horovod=False)
    x, y = _features(3, 6)
    s, b = _scalars()
    want = _grads(modules["open_clip.factory"].create_loss(args), x, y, s, b)
    try:
        patch_open_clip()
        patch_open_clip()  # idempotent
        import open_clip  # the stand-in

        assert open_clip.loss.SigLipLoss is ours.SigLipLoss and open_clip.loss.ClipLoss is ours.ClipLoss
        assert open_clip.ClipLoss is ours.ClipLoss
        built = open_clip.create_loss(args)
        assert isinstance(built, ours.SigLipLoss)
        got = _grads(built, x, y, s, b)
        for g, w in zip(got, want):
            assert _rel(g, w) < 1e-8
        args.siglip = False
        assert isinstance(open_clip.create_loss(args), ours.ClipLoss)
    finally:
        unpatch_open_clip()
    assert (OC.ClipLoss, OC.SigLipLoss) == originals
    assert modules["open_clip.factory"].SigLipLoss is originals[1] and modules["open_clip"].ClipLoss is originals[0]
    unpatch_open_clip()  # a no-op when nothing is patched


class _TinyClip(torch.nn.Module):
    """An OpenCLIP-style model: two encoders, normalized features, a learnable ``logit_scale`` (log) and
    ``logit_bias``; ``forward`` returns what OpenCLIP's models return to the loss."""

    def __init__(self, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.image = torch.nn.Linear(10, 6)
        self.text = torch.nn.Linear(7, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))

    def forward(self, images, texts):
        x = torch.nn.functional.normalize(self.image(images), dim=-1)
        y = torch.nn.functional.normalize(self.text(texts), dim=-1)
        return x, y, self.logit_scale.exp(), self.logit_bias


@pytest.mark.parametrize("siglip", [True, False])
def test_patched_training_step_matches_unpatched(monkeypatch, siglip):
    """Unmodified OpenCLIP-style training code (create_loss, then loss(*model(batch)).backward()) gives the same loss
    and parameter gradients, patched or not, in fp32 (1e-6)."""
    from embedloss_kernels.patching import patch_open_clip, unpatch_open_clip

    modules = _stand_in_open_clip()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    args = types.SimpleNamespace(siglip=siglip, rank=0, world_size=1, loss_dist_impl=None, local_loss=False,
                                 gather_with_grad=False, horovod=False)
    gen = torch.Generator().manual_seed(9)
    images, texts = torch.randn(12, 10, generator=gen), torch.randn(12, 7, generator=gen)

    def train_step():
        import open_clip  # the stand-in

        model = _TinyClip(seed=1)
        loss = open_clip.create_loss(args)(*model(images, texts), output_dict=True)["contrastive_loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                               for n, p in model.named_parameters()}, type(open_clip.create_loss(args)).__module__

    want_loss, want_grads, want_module = train_step()
    try:
        patch_open_clip()
        got_loss, got_grads, got_module = train_step()
    finally:
        unpatch_open_clip()
    assert got_module == "embedloss_kernels.open_clip" and want_module != got_module
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-6, atol=1e-6)
