"""The suite checks what it claims to (issue 24): every fuzz configuration it draws has an anchor gradient a
relative-error assertion can judge (norm at least ``INFORMATIVE_FRACTION`` of its scale), and the shared
measured-error tolerance rejects the wrong gradients it is meant to catch."""

import random

import pytest
import test_equivalence as eq
import test_matryoshka as mat
import torch
from conftest import assert_within_measured_error, is_informative, loss_and_grads

# (generator, the seeds the suite passes it): the parametrizations of test_equivalence and test_matryoshka
EQUIVALENCE_SEEDS = [*range(40), *range(100, 130)]
MATRYOSHKA_SEEDS = [*range(24), *range(100, 112), *range(50, 58)]


@pytest.mark.parametrize("small", [False, True], ids=["full", "interpreter"])
def test_mnrl_fuzz_configs_have_informative_anchor_gradients(small):
    weak = []
    for seed in EQUIVALENCE_SEEDS:
        cfg = eq.random_config(seed, small)
        grad = eq.anchor_gradient(cfg, seed)
        if not is_informative(grad, cfg["scale"]):
            weak.append((seed, grad.norm().item(), cfg))
    assert not weak, weak


@pytest.mark.parametrize("small", [False, True], ids=["full", "interpreter"])
def test_matryoshka_fuzz_configs_have_informative_anchor_gradients(small):
    weak = []
    for seed in MATRYOSHKA_SEEDS:
        cfg = mat.random_config(seed, small)
        grad = mat.anchor_gradient(cfg, seed)
        if not is_informative(grad, cfg["scale"]) or 1 in cfg["dims"]:
            weak.append((seed, grad.norm().item(), cfg))
    assert not weak, weak


@pytest.mark.parametrize("small", [False, True], ids=["full", "interpreter"])
def test_cosent_fuzz_configs_have_informative_gradients(small):
    """The CoSENT/AnglE fuzz of test_equivalence draws neither B=1 nor D=1 (both have a gradient of exactly 0)."""
    for seed in range(12):
        rng = random.Random(seed)
        batch = rng.choice([2, 3, 9, 16] if small else [2, 3, 9, 64, 301])
        dim = rng.choice([2, 5, 8, 17] if small else [2, 5, 8, 33, 64])
        assert batch > 1 and dim > 1


def test_measured_error_tolerance_rejects_a_scaled_gradient():
    """The shared tolerance catches what the old constants let through: a bf16 gradient 10% off, a float32 gradient
    1e-4 off (the old bf16 bound was 0.32 relative, the old float32 floor 2e-6 plus 4x)."""
    cfg = dict(eq.random_config(5, small=True), batch=9, dim=24, n_neg=1, cosine=True, scale=20.0)
    columns = eq.make_columns(cfg, torch.float64, 1)
    for dtype, wrong in [(torch.bfloat16, 0.9), (torch.float32, 1 + 1e-4)]:
        rounded = [c.to(dtype) for c in columns]
        _, exact = loss_and_grads(lambda c: eq.st_loss(cfg, c), [c.double() for c in rounded])
        _, plain = loss_and_grads(lambda c: eq.st_loss(cfg, c), [c.float() for c in rounded])
        assert_within_measured_error(plain[0].to(dtype), exact[0], plain[0].to(dtype))
        with pytest.raises(AssertionError):
            assert_within_measured_error((plain[0] * wrong).to(dtype), exact[0], plain[0].to(dtype))


def _hanging_worker(rank):
    import time

    time.sleep(600)


def test_spawn_gloo_deadline_fails_a_hang():
    """A rank that never finishes fails the test at the deadline instead of hanging the suite."""
    import time

    from conftest import spawn_gloo

    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish within"):
        spawn_gloo(_hanging_worker, 2, (), timeout_s=2)
    assert time.monotonic() - start < 60


def test_environment_leak_is_caught():
    """The autouse ``no_environment_leak`` fixture fails a test that leaves a watched variable set."""
    import os

    from conftest import no_environment_leak

    gen = no_environment_leak.__wrapped__()
    next(gen)
    os.environ["EMBEDLOSS_LEAK_PROBE"] = "1"
    with pytest.raises(pytest.fail.Exception, match="EMBEDLOSS_LEAK_PROBE"):
        next(gen)
    assert "EMBEDLOSS_LEAK_PROBE" not in os.environ
