"""The GPU path of the row-block algorithm (``backends/blocked.py``: raw inputs with inverse norms as vectors, ``G~`` in
the input dtype, fp32 accumulators), run on CPU by switching it on: the torch backend's blocked forward against
sentence-transformers (float64 exact, fp32 within 4x, bf16 / fp16 within 2x of its own low-precision error), and
the helpers' fallbacks and block sizing."""

import pytest
import torch
from conftest import DEVICE
from test_equivalence import loss_and_grads, make_columns, our_loss, random_config, rel_err, st_loss

from embedloss_kernels.backends import blocked as _blocked
from embedloss_kernels.backends import common
from embedloss_kernels.backends.torch import cosent, infonce
from embedloss_kernels.heuristics.blocks import block_rows


@pytest.fixture
def blocked(monkeypatch):
    monkeypatch.setattr(_blocked, "FORCE_ON_CPU", True)
    assert _blocked.use_blocked(torch.zeros(1, device=DEVICE))


@pytest.mark.parametrize("seed", range(16))
def test_blocked_float64_matches_sentence_transformers(blocked, seed):
    cfg = random_config(seed, small=False)
    columns = make_columns(cfg, torch.float64, seed)
    ref_loss, ref_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns, grad_scale=2.0)
    loss, grads = loss_and_grads(lambda c: our_loss(cfg, c, "torch"), columns, grad_scale=2.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-8, atol=1e-10)
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert rel_err(g, ref) <= 1e-8, f"column {i}: {rel_err(g, ref)} ({cfg})"


@pytest.mark.parametrize("seed", range(100, 110))
def test_blocked_float32_within_4x_sentence_transformers(blocked, seed):
    cfg = random_config(seed, small=False)
    columns64 = make_columns(cfg, torch.float64, seed)
    exact_loss, exact_grads = loss_and_grads(lambda c: st_loss(cfg, c), columns64)
    st32_loss, st32_grads = loss_and_grads(lambda c: st_loss(cfg, c), [c.float() for c in columns64])
    loss, grads = loss_and_grads(lambda c: our_loss(cfg, c, "torch"), [c.float() for c in columns64])
    assert rel_err(loss, exact_loss) <= 4 * rel_err(st32_loss, exact_loss) + 2e-6, cfg
    for g, g_st, ref in zip(grads, st32_grads, exact_grads):
        assert rel_err(g, ref) <= 4 * rel_err(g_st, ref) + 2e-6, cfg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("directions", [("query_to_doc",), ("query_to_doc", "doc_to_query")])
def test_blocked_half_within_2x_sentence_transformers(blocked, dtype, directions):
    """16-bit inputs: our error against float64 (on the same rounded inputs) is at most twice sentence-transformers'
    own error at that dtype; gradients come back in the input dtype."""
    cfg = dict(random_config(1, small=False), batch=96, dim=40, n_neg=1, cosine=True, scale=20.0,
               directions=directions, partition_mode="per_direction" if len(directions) > 1 else "joint",
               hardness_mode=None, block_rows=17)
    low = [c.to(dtype) for c in make_columns(cfg, torch.float64, 3)]
    exact_loss, exact_grads = loss_and_grads(lambda c: st_loss(cfg, c), [c.double() for c in low])
    st_loss_low, st_grads = loss_and_grads(lambda c: st_loss(cfg, c), low)
    leaves = [c.clone().requires_grad_() for c in low]
    loss = our_loss(cfg, leaves, "torch")
    loss.backward()
    assert loss.dtype == torch.float32
    assert rel_err(loss.double(), exact_loss) <= 2 * rel_err(st_loss_low, exact_loss) + 1e-6
    for leaf, g_st, ref in zip(leaves, st_grads, exact_grads):
        assert leaf.grad.dtype == dtype
        assert rel_err(leaf.grad.double(), ref) <= 2 * rel_err(g_st, ref), (rel_err(leaf.grad.double(), ref),
                                                                           rel_err(g_st, ref))


def test_blocked_zero_rows_and_no_grad(blocked):
    q, a = torch.randn(6, 9, dtype=torch.float64, device=DEVICE), torch.randn(12, 9, dtype=torch.float64,
                                                                             device=DEVICE)
    q[2] = 0.0
    a[7] = 0.0
    _blocked.FORCE_ON_CPU = False
    want = infonce.infonce_forward(q, a, 1, 4, 20.0, True, 1, True, 0, 0.0, True, 0)
    _blocked.FORCE_ON_CPU = True
    got = infonce.infonce_forward(q, a, 1, 4, 20.0, True, 1, True, 0, 0.0, True, 3)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    loss, gq, ga = infonce.infonce_forward(q, a, 1, 4, 20.0, True, 1, True, 0, 0.0, False, 3)[:3]
    assert gq.numel() == 0 and ga.numel() == 0
    torch.testing.assert_close(loss, want[0])


def test_products_accumulate_in_fp32():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 20, generator=gen).to(torch.bfloat16)
    y = torch.randn(20, 17, generator=gen).to(torch.bfloat16)
    exact = x.double() @ y.double()
    out = _blocked.mm_acc(x, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)
    acc = torch.ones(33, 17)
    _blocked.addmm_acc_(acc, x, y, 0.25)
    torch.testing.assert_close(acc.double(), 1 + 0.25 * exact, rtol=1e-6, atol=1e-6)
    s = torch.empty(33, 17)
    _blocked.mm_acc(x, y, out=s)
    torch.testing.assert_close(s, out)


def test_norms_and_finish_in_chunks(monkeypatch):
    monkeypatch.setattr(_blocked, "FINISH_ELEMS", 7)  # several rows per chunk, a ragged last chunk
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    x[4] = 0.0
    rx = _blocked.inv_norms(x, True)
    torch.testing.assert_close(rx, 1 / x.norm(dim=1).clamp_min(1e-12))
    assert torch.equal(_blocked.inv_norms(x, False), torch.ones(11, dtype=torch.float64))
    v = torch.randn(11, 3, generator=gen, dtype=torch.float64)
    x_hat, norm = common.normalize_rows(x)
    want = common.normalize_rows_backward(x_hat, norm, v * norm)  # v = d/dx_hat divided by the norm
    got = _blocked.finish_grad(x, rx, v, True, torch.empty_like(x))
    torch.testing.assert_close(got, want)


def test_block_rows_from_budget_and_gpu_rules(monkeypatch):
    monkeypatch.setenv("EMBEDLOSS_BLOCK_MIB", "1")
    assert block_rows(10_000, 1024, 4.0, torch.device("cpu")) == 256  # 1 MiB / (4 B * 1024 columns)
    assert block_rows(100, 1024, 4.0, torch.device("cpu")) == 100
    monkeypatch.setenv("EMBEDLOSS_BLOCK_MIB", "0.000001")
    assert block_rows(100, 1 << 20, 4.0, torch.device("cpu")) == 1
    monkeypatch.setenv("EMBEDLOSS_BLOCK_MIB", "nope")
    with pytest.raises(ValueError, match="EMBEDLOSS_BLOCK_MIB"):
        block_rows(100, 10, 4.0, torch.device("cpu"))
    # GPU rule without a GPU: 80 GB free, 50 MB of L2
    monkeypatch.delenv("EMBEDLOSS_BLOCK_MIB")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)

    class Props:
        L2_cache_size = 50 * 10**6

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    cuda = torch.device("cuda")
    assert block_rows(16384, 16384, 4.0, cuda) == 1024  # L2 holds 610 rows: at least MIN_GEMM_ROWS
    assert block_rows(262144, 262144, 4.0, cuda) == 768  # 0.75 GiB / 1 MiB per row
    assert block_rows(4096, 1024, 4.0, cuda) == 4096  # all rows fit in L2
    assert block_rows(300, 64, 4.0, cuda) == 300


@pytest.mark.parametrize("similarity", [0, 1, 2], ids=["cosine", "dot", "angle"])
def test_blocked_cosent_in_row_slices(blocked, monkeypatch, similarity):
    """The GPU path of CoSENT / AnglE takes the similarity and its backward a few rows at a time: same result."""
    monkeypatch.setattr(_blocked, "FINISH_ELEMS", 20)  # 4 rows of D = 5 per slice, a ragged last one
    gen = torch.Generator().manual_seed(similarity)
    x, y = (torch.randn(23, 5, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    labels = (torch.randint(0, 4, (23,), generator=gen).double() / 3).to(DEVICE)
    got = cosent.cosent_forward(x, y, labels, 20.0, similarity, True)
    monkeypatch.setattr(_blocked, "FORCE_ON_CPU", False)
    want = cosent.cosent_forward(x, y, labels, 20.0, similarity, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
