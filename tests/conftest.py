"""Shared fixtures: the backend parametrization every equivalence test runs over."""

import contextlib
import os

import pytest
import torch

# On a machine without CUDA, the Triton backend runs through the interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import embedloss_kernels.dispatch as backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Under pytest-xdist (the README's command runs ``-n 2``) each worker takes its share of the cores for intra-op
# threads: two workers of two threads each on two cores would oversubscribe every BLAS-heavy test.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def backend_params():
    return [pytest.param(name, id=name) for name in backends.BACKEND_NAMES]


@pytest.fixture(params=backend_params())
def backend(request):
    """Each backend in turn, skipped (with the reason) where it cannot run on DEVICE."""
    reason = backends.why_not(request.param, DEVICE)
    if reason is not None:
        pytest.skip(f"backend {request.param} unavailable on {DEVICE}: {reason}")
    return request.param


def is_interpreted(backend_name: str) -> bool:
    """Triton through the interpreter is slow: tests keep its shapes small."""
    return backend_name == "triton" and DEVICE.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers (issue 24): written once here, imported by the test files (``from conftest import ...``).
# ---------------------------------------------------------------------------------------------------------------------

# MNRL option tables, the same for every fuzz generator (MNRL, Matryoshka).
DIRECTION_SETS = [
    ("query_to_doc",),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "query_to_query"),
    ("query_to_doc", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]

# Below this fraction of its scale a gradient is "~0": a relative-error assertion on it checks nothing.
INFORMATIVE_FRACTION = 1e-3


def randn64(seed_or_gen, *shape, spread: float = 1.0, device=None) -> torch.Tensor:
    """Seeded float64 standard normal of ``shape`` (times ``spread``) on ``device`` (DEVICE by default): the same
    numbers on every device, since they are drawn on the CPU."""
    gen = seed_or_gen if isinstance(seed_or_gen, torch.Generator) else torch.Generator().manual_seed(seed_or_gen)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * spread).to(DEVICE if device is None else device)


def seeded_columns(seed: int, n: int, batch: int, dim: int, dtype=torch.float64, spread: float = 1.0, device=None):
    """``n`` seeded (batch, dim) columns drawn in float64 from one generator, then cast to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    return [randn64(gen, batch, dim, spread=spread, device=device).to(dtype) for _ in range(n)]


def loss_and_grads(fn, columns, grad_scale: float = 1.0):
    """``fn`` on fresh leaf copies of ``columns``; backward of ``loss * grad_scale``. Returns the loss and the
    gradients, in float64."""
    leaves = [c.detach().clone().requires_grad_() for c in columns]
    loss = fn(leaves)
    (loss * grad_scale).backward()
    return loss.detach().double(), [leaf.grad.double() for leaf in leaves]


def rel_err(ours, ref, floor: float = 1e-12) -> float:
    """Norm-relative error of ``ours`` against ``ref``; a difference at most ``floor`` counts as zero (1e-12: the
    round-off left on a gradient that is zero by symmetry, e.g. an attention key bias; far below any gradient the
    fuzz configurations check, which are at least ``INFORMATIVE_FRACTION`` of their scale)."""
    ours, ref = torch.as_tensor(ours).double(), torch.as_tensor(ref).double()
    diff = (ours - ref).norm().item()
    if diff <= floor:
        return 0.0
    return diff / max(ref.norm().item(), 1e-300)


def assert_float64_close(ours, ref, rtol: float = 1e-8, what: str = "") -> None:
    """float64 exactness: norm-relative error at most ``rtol`` (1e-8), exactly zero where the reference is."""
    err = rel_err(ours, ref)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def assert_within_measured_error(ours, ref64, plain, factor: float = 4.0, what: str = "", dtype=None,
                                 ulps: float | None = None) -> None:
    """Low-precision tolerance from measured error, as FlashAttention's tests do: ``ours``' error against the float64
    ``ref64`` is at most ``factor`` times the error of ``plain``, the plain low-precision computation of the same
    quantity (sentence-transformers or the reference in that dtype), measured by the caller on the same inputs.

    The plain error is one sample of round-off and is sometimes lucky (nearly exact): it is floored at ``ulps`` units
    of round-off of the low-precision dtype (``dtype``, by default ``plain``'s) on the reference's norm. ``ulps`` is
    4 in float32 (an accumulation of a few roundings, which can cancel: the bound is then 16 ulps, 1.9e-6 relative)
    and 1 in float16/bfloat16 (there the plain error is the final rounding to the dtype, ~0.3 ulp, never lucky: the
    bound is then 4 ulps, 3% relative in bfloat16, so a gradient 10% off fails)."""
    ours_t, ref_t, plain_t = torch.as_tensor(ours), torch.as_tensor(ref64).double(), torch.as_tensor(plain)
    low = dtype or plain_t.dtype
    eps = torch.finfo(low).eps
    if ulps is None:
        ulps = 1.0 if low in (torch.float16, torch.bfloat16) else 4.0
    err = (ours_t.double() - ref_t).norm().item()
    plain_err = (plain_t.double() - ref_t).norm().item()
    bound = factor * max(plain_err, ulps * eps * ref_t.norm().item())
    assert err <= bound, (f"{what}: error {err:.3g} (relative {err / max(ref_t.norm().item(), 1e-300):.3g}) > "
                          f"{factor:g} x the plain {low} computation's {plain_err:.3g}")


def is_informative(grad, magnitude: float) -> bool:
    """Whether ``grad`` carries signal a relative-error assertion can check: norm at least
    ``INFORMATIVE_FRACTION`` of ``magnitude`` (the size such a gradient has, e.g. the loss's scale)."""
    return torch.as_tensor(grad).double().norm().item() >= INFORMATIVE_FRACTION * magnitude


def spawn_gloo(worker, world: int, args=(), timeout_s: float = 120.0, what: str = "") -> None:
    """``torch.multiprocessing.spawn`` of ``world`` ranks of ``worker(rank, *args)`` with a deadline: ranks that
    have not all finished after ``timeout_s`` are killed and the test fails (a deadlock never hangs CI). A rank's
    exception is raised here."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=tuple(args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{what or worker.__name__}: {world} gloo ranks did not finish within {timeout_s:g} s (hang?)")


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, init_file, timeout_s: float = 60.0):
    """In a worker of :func:`spawn_gloo`: one CPU thread, rank ``rank`` of a ``world``-rank gloo group (file init,
    collectives time out after ``timeout_s``), left on the way out whatever happens. The body needs no try/except:
    a rank's exception propagates, and ``spawn_gloo`` raises it in the test with the rank's traceback."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def param_grads(model) -> dict:
    """A copy of every parameter gradient of ``model``, by name (parameters without one left out)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_param_grads_close(grads: dict, ref: dict, rtol: float = 1e-8, zero_floor: float | None = None) -> None:
    """Every parameter's gradient within ``rtol`` of the reference's norm, plus ``zero_floor`` (by default ``rtol``
    times 1e-4) of the whole gradient's norm for parameters whose gradient is zero by symmetry (an attention key
    bias: round-off only)."""
    assert grads.keys() == ref.keys() and grads
    total = torch.cat([g.flatten() for g in ref.values()]).double().norm()
    floor = rtol * 1e-4 if zero_floor is None else zero_floor
    for name in grads:
        diff = (grads[name].double() - ref[name].double()).norm()
        bound = rtol * ref[name].double().norm() + floor * total
        assert diff <= bound, f"{name}: {diff:.3e} > {bound:.3e}"


def trainer_updates(model, make_loss, train_dataset, output_dir, **args):
    """A ``SentenceTransformerTrainer`` run on a copy of ``model`` with ``make_loss(copy)``: plain SGD (the update is
    ``-lr`` times the summed gradients, so comparing updates compares gradients; Adam's normalization would turn the
    round-off on a zero-by-symmetry gradient into a full step), the trainer's fixed seed, no saving. Returns the
    train result, the trained copy and each parameter's update (after - before)."""
    import copy

    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = copy.deepcopy(model)
    options = dict(output_dir=str(output_dir), num_train_epochs=1, report_to=[], save_strategy="no",
                   use_cpu=DEVICE.type == "cpu", optim="sgd", learning_rate=1e-2, seed=7, data_seed=7)
    options.update(args)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = SentenceTransformerTrainer(model=model, args=SentenceTransformerTrainingArguments(**options),
                                        train_dataset=train_dataset, loss=make_loss(model)).train()
    updates = {k: v.detach() - before[k] for k, v in model.named_parameters()}
    return result, model, updates


@pytest.fixture(scope="session")
def tiny_st(tmp_path_factory):
    """A factory of tiny SentenceTransformers (``tiny_model.make_tiny_sentence_transformer``: a 2-layer random BERT on
    DEVICE): ``tiny_st(seed=0, dropout=0.1, hidden=32)`` builds one model per argument set per session and returns a
    deep copy of it on each call, so no test sees what another did to its model."""
    import copy

    from tiny_model import make_tiny_sentence_transformer

    built = {}

    def make(seed: int = 0, dropout: float = 0.1, hidden: int = 32):
        key = (seed, dropout, hidden)
        if key not in built:
            built[key] = make_tiny_sentence_transformer(tmp_path_factory.mktemp("tiny_st"), seed, dropout, hidden)
        return copy.deepcopy(built[key])

    return make


@pytest.fixture(scope="module")
def tiny_model(tiny_st):
    """The default tiny SentenceTransformer (dropout 0.1, train mode), one copy per test module."""
    return tiny_st()


WATCHED_ENV_PREFIXES = ("EMBEDLOSS_", "HF_", "TRITON_", "TOKENIZERS_")


@pytest.fixture(autouse=True)
def no_environment_leak():
    """No test leaks an environment variable of the package or the libraries it configures into the next test (set
    them with ``monkeypatch.setenv``): the variables with these prefixes are compared before and after."""
    def watched():
        return {k: v for k, v in os.environ.items() if k.startswith(WATCHED_ENV_PREFIXES)}

    before = watched()
    yield
    after = watched()
    if after != before:
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        for k in changed:  # restore, so that one leak fails one test only
            if k in before:
                os.environ[k] = before[k]
            else:
                os.environ.pop(k, None)
        pytest.fail(f"the test leaked environment variables {changed}: use monkeypatch.setenv")


class PassThroughModel(torch.nn.Module):
    """A stand-in SentenceTransformer whose "features" are the embeddings themselves: ``{"embedding": x}``. With a
    ``tokenizer`` it is also all that sentence-transformers' GIST constructors read of a model or guide (a tokenizer
    and a max length)."""

    def __init__(self, dim: int | None = None, tokenizer=None):
        super().__init__()
        self.dim = dim
        self.tokenizer = tokenizer
        self.max_seq_length = 64

    def get_embedding_dimension(self) -> int:
        return self.dim

    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}
