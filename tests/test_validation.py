"""Bad input is a clear ValueError/TypeError before any kernel runs; the backend API says why a backend is out."""

import math
import warnings

import pytest
import torch
from conftest import DEVICE

import embedloss_kernels as ek
from embedloss_kernels import functional

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")


def cols(n=3, batch=4, dim=6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, dim, generator=gen, dtype=dtype).to(DEVICE) for _ in range(n)]


MNRL = functional.multiple_negatives_ranking_loss


@pytest.mark.parametrize(
    "columns, error, match",
    [
        (lambda: [cols(1)[0], cols(1, batch=5)[0]], ValueError, "batch size 5"),
        (lambda: [cols(1)[0], cols(1, dim=7)[0]], ValueError, "dim 7"),
        (lambda: [cols(1)[0], cols(1)[0], cols(1, batch=3)[0]], ValueError, r"negatives\[0\] has batch size 3"),
        (lambda: cols(1), TypeError, "positives"),
        (lambda: [c[:0] for c in cols(2)], ValueError, "empty batch"),
        (lambda: [cols(1)[0][0], cols(1)[0][0]], ValueError, "must be 2-D"),
        (lambda: [cols(1)[0], cols(1)[0].double()], TypeError, "dtype"),
        (lambda: [cols(1)[0], cols(1)[0].to("meta")], ValueError, "meta"),
        (lambda: [torch.ones(4, 6, dtype=torch.int64, device=DEVICE)] * 2, TypeError, "floating"),
        (lambda: [cols(1)[0], cols(1)[0].index_fill(0, torch.tensor([2], device=DEVICE), math.nan)], ValueError,
         "NaN or Inf"),
        (lambda: [cols(1)[0].index_fill(1, torch.tensor([0], device=DEVICE), math.inf), cols(1)[0]], ValueError,
         "NaN or Inf"),
        (lambda: [cols(1)[0], [[1.0] * 6] * 4], TypeError, "torch.Tensor"),
    ],
)
def test_functional_bad_columns(columns, error, match):
    with pytest.raises(error, match=match):
        MNRL(*columns())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_finite_check_is_exact_when_a_sum_overflows(dtype):
    # The check sums each tensor first (no tensor-sized temporary); a sum that overflows from finite values must not
    # be taken for a NaN or Inf, and one bad element among huge finite ones must still be found.
    big = torch.finfo(dtype).max / 4
    huge = [torch.full((4, 6), big, dtype=dtype, device=DEVICE) * torch.tensor([1.0, 0.5, 0.9, 0.7], dtype=dtype,
                                                                                device=DEVICE)[:, None]
            for _ in range(2)]
    assert not bool(torch.isfinite(huge[0].sum()))  # the sum overflows: the exact check decides
    loss = MNRL(*huge, similarity="cos_sim")
    assert bool(torch.isfinite(loss))  # cosine of parallel rows: log(4)
    for value in (math.nan, math.inf, -math.inf):
        bad = huge[1].index_fill(0, torch.tensor([3], device=DEVICE), value)
        with pytest.raises(ValueError, match="positives contains NaN or Inf"):
            MNRL(huge[0], bad)
    plus_minus = cols(2)[1].index_fill(1, torch.tensor([0], device=DEVICE), math.inf)
    plus_minus[0, 1] = -math.inf  # +Inf and -Inf: the sum is NaN, still caught
    with pytest.raises(ValueError, match="NaN or Inf"):
        MNRL(cols(2)[0], plus_minus)


def test_module_needs_two_columns():
    with pytest.raises(ValueError, match="Expected at least 2 embeddings, got 1"):
        ek.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(cols(1), None)


@pytest.mark.parametrize("scale", [0.0, -1.0, math.inf, math.nan])
def test_bad_scale(scale):
    # As sentence-transformers 6.2: MNRL's module wants scale > 0 (inf is accepted and gives its NaN), CoSENT's
    # module takes any number but NaN; the functional API also wants a finite scale (tests/test_scale.py).
    if not scale == math.inf:
        with pytest.raises(ValueError, match="Scale must be a positive value"):
            ek.MultipleNegativesRankingLoss(None, scale=scale)
    with pytest.raises(ValueError, match="scale"):
        MNRL(*cols(2), scale=scale)
    if scale != scale:
        with pytest.raises(ValueError, match="scale"):
            ek.CoSENTLoss(None, scale=scale)
    if scale != scale or scale == math.inf:
        with pytest.raises(ValueError, match="scale"):
            functional.cosent_loss(*cols(2), torch.rand(4, device=DEVICE), scale=scale)


def test_scale_wrong_type():
    with pytest.raises(TypeError, match="scale must be a real number"):
        ek.MultipleNegativesRankingLoss(None, scale="20")


def test_bad_hardness():
    with pytest.raises(ValueError, match="hardness_strength must be non-negative"):
        ek.MultipleNegativesRankingLoss(None, hardness_mode="hard_negatives", hardness_strength=-1.0)
    with pytest.raises(ValueError, match="hardness_mode must be one of"):
        ek.MultipleNegativesRankingLoss(None, hardness_mode="hardest")
    with pytest.raises(ValueError, match="hardness_strength must be finite"):
        MNRL(*cols(2), hardness_mode="all_negatives", hardness_strength=math.inf)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(directions=()), "At least one direction"),
        (dict(directions=("query_to_doc", "doc_to_nothing")), "Invalid directions"),
        (dict(directions=("doc_to_query",)), "'query_to_doc' direction is required"),
        (dict(directions="query_to_doc"), "tuple of direction names"),
        (dict(partition_mode="separate"), "partition_mode must be 'joint' or 'per_direction'"),
        (dict(directions=("query_to_doc", "query_to_query"), partition_mode="per_direction"), "per_direction"),
    ],
)
def test_bad_directions_and_modes(kwargs, match):
    error = TypeError if isinstance(kwargs.get("directions"), str) else ValueError
    with pytest.raises(error, match=match):
        ek.MultipleNegativesRankingLoss(None, **kwargs)
    with pytest.raises(error, match=match):
        MNRL(*cols(2), **kwargs)
    if error is ValueError:  # sentence-transformers raises the same error for the same argument
        with warnings.catch_warnings(), pytest.raises(ValueError):
            warnings.simplefilter("ignore")
            st_losses.MultipleNegativesRankingLoss(None, **kwargs)


def test_wrong_number_of_labels():
    x, y = cols(2)
    with pytest.raises(ValueError, match="expects 4 labels"):
        ek.CoSENTLoss(None).compute_loss_from_embeddings([x, y], torch.rand(5, device=DEVICE))
    with pytest.raises(ValueError, match="expects 4 labels"):
        functional.cosent_loss(x, y, torch.rand(3, device=DEVICE))
    with pytest.raises(ValueError, match="expects 4 labels"):
        ek.AnglELoss(None).compute_loss_from_embeddings([x, y, x.flip(0)], torch.rand(2, device=DEVICE))
    with pytest.raises(ValueError, match="requires labels"):
        ek.AnglELoss(None).compute_loss_from_embeddings([x, y], None)
    with pytest.raises(ValueError, match="NaN or Inf"):
        functional.cosent_loss(x, y, torch.tensor([0.1, math.nan, 0.2, 0.3], device=DEVICE))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        functional.cosent_loss(x, y, [0.1, 0.2, 0.3, 0.4])


def test_bad_similarity_and_block_rows():
    with pytest.raises(ValueError, match="similarity must be"):
        MNRL(*cols(2), similarity="euclid")
    loss_fn = ek.MultipleNegativesRankingLoss(None, similarity_fct=3)  # accepted, as sentence-transformers does
    with pytest.raises(TypeError, match="similarity_fct must be callable"):  # which fails when it calls it
        loss_fn.compute_loss_from_embeddings(cols(2), None)
    with pytest.raises(ValueError, match="block_rows"):
        MNRL(*cols(2), block_rows=-1)


@pytest.mark.parametrize("value", ["abc", "0", "-4", "nan", "inf"])
def test_bad_block_budget_env(monkeypatch, backend, value):
    """EMBEDLOSS_BLOCK_MIB sizes every backend's automatic row blocks: a bad value is one clear error, on every
    backend, before any kernel; an explicit block_rows does not read it."""
    monkeypatch.setenv("EMBEDLOSS_BLOCK_MIB", value)
    with pytest.raises(ValueError, match=f"EMBEDLOSS_BLOCK_MIB must be a positive number of MiB, got '{value}'"):
        MNRL(*cols(2), backend=backend)
    assert torch.isfinite(MNRL(*cols(2), backend=backend, block_rows=2))


def largest_allocation(fn) -> int:
    """Bytes of the largest single allocation ``fn`` makes on DEVICE (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    key = "device_memory_usage" if DEVICE.type == "cuda" else "cpu_memory_usage"
    return max((getattr(e, key) for e in prof.events()), default=0)


def test_block_budget_env_sizes_the_blocks(monkeypatch, backend):
    """A tiny EMBEDLOSS_BLOCK_MIB gives the same loss as the default, and really shrinks the blocks: B=512 rows of
    float32 logits (1 MiB at once under the default 32 MiB) are never allocated whole (issue 24: this test used to
    pass with the variable ignored)."""
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("the Triton kernels are tiled: no (rows x N) logits to size outside a GPU")
    columns = cols(2, batch=512, dim=8)
    monkeypatch.setenv("EMBEDLOSS_BLOCK_MIB", "0.0001")  # one row per block
    small = MNRL(*columns, backend=backend)
    small_peak = largest_allocation(lambda: MNRL(*columns, backend=backend))
    monkeypatch.delenv("EMBEDLOSS_BLOCK_MIB")
    torch.testing.assert_close(small, MNRL(*columns, backend=backend))
    default_peak = largest_allocation(lambda: MNRL(*columns, backend=backend))
    assert default_peak >= 512 * 512 * 4 > 16 * small_peak, (small_peak, default_peak)


def test_model_none_forward_is_clear():
    with pytest.raises(ValueError, match="model=None"):
        ek.MultipleNegativesRankingLoss(None)([{"input_ids": torch.ones(2, 3, device=DEVICE)}] * 2, None)


# -- backend selection ------------------------------------------------------------------------------------------
def test_backend_api(monkeypatch):
    assert "torch" in ek.available_backends()
    assert ek.current_backend("cpu") in ek.available_backends("cpu")
    assert ek.current_backend(DEVICE) in ek.available_backends(DEVICE)
    monkeypatch.setenv("EMBEDLOSS_BACKEND", "torch")
    assert ek.current_backend("cpu") == "torch"
    monkeypatch.setenv("EMBEDLOSS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="EMBEDLOSS_BACKEND must be one of"):
        ek.current_backend("cpu")
    with pytest.raises(ValueError, match="EMBEDLOSS_BACKEND must be one of"):
        MNRL(*cols(2))


def test_forcing_unavailable_backend_names_the_reason(monkeypatch):
    monkeypatch.setenv("EMBEDLOSS_BACKEND", "cpp")
    with pytest.raises(ek.BackendUnavailableError, match="backend 'cpp' was requested but cannot run on meta"):
        ek.current_backend("meta")
    with pytest.raises(ValueError, match="backend must be one of"):
        ek.current_backend("cpu", backend="cuda")


def test_unknown_similarity_runs_plain_with_one_warning(caplog):
    def neg_l1(a, b):
        return -(a[:, None, :] - b[None, :, :]).abs().sum(-1)

    columns = [c.double().requires_grad_() for c in cols(3)]
    loss_fn = ek.MultipleNegativesRankingLoss(None, similarity_fct=neg_l1, scale=2.0)
    with caplog.at_level("WARNING", logger="embedloss_kernels"):
        loss = loss_fn.compute_loss_from_embeddings(columns, None)
        loss_fn.compute_loss_from_embeddings(columns, None)
    assert sum("is not fused" in r.message for r in caplog.records) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = st_losses.MultipleNegativesRankingLoss(None, similarity_fct=neg_l1, scale=2.0)
    torch.testing.assert_close(loss, st.compute_loss_from_embeddings(columns, None), rtol=1e-10, atol=0)
