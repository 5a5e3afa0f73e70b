"""Under ``torch.autocast`` every backend computes what it computes without it (README, "fp16 / bf16 embeddings";
DESIGN §3.4): the ops run in their inputs' dtypes, fp32 logits for fp32 inputs, whatever autocast would pick."""

import pytest
import torch
from conftest import DEVICE

from embedloss_kernels import functional


def _columns(seed=0, batch=9, dim=24):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=gen).to(DEVICE).requires_grad_() for _ in range(3)]


def _losses(backend):
    gen = torch.Generator().manual_seed(7)
    mix = torch.randn(24, 12, generator=gen).to(DEVICE)
    labels = torch.rand(9, generator=gen).to(DEVICE)
    return {
        "mnrl": lambda q, p, n: functional.multiple_negatives_ranking_loss(q, p, n, backend=backend),
        "mnrl_all_directions": lambda q, p, n: functional.multiple_negatives_ranking_loss(
            q, p, n, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), backend=backend),
        "matryoshka": lambda q, p, n: functional.matryoshka_mnrl_loss(q, p, n, dims=[8, 24], backend=backend),
        "cosent": lambda q, p, n: functional.cosent_loss(q, p, labels, backend=backend),
        "angle": lambda q, p, n: functional.angle_loss(q, p, labels=labels, backend=backend),
        "gist": lambda q, p, n: functional.gist_loss(
            q, p, n, guide=[t.detach() @ mix for t in (q, p, n)], temperature=0.05, backend=backend),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mnrl", "mnrl_all_directions", "matryoshka", "cosent", "angle", "gist"])
def test_autocast_gives_the_fp32_result(backend, name, dtype):
    if DEVICE.type == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast is bf16 in practice")
    loss_fn = _losses(backend)[name]
    plain_in, cast_in = _columns(), _columns()
    want = loss_fn(*plain_in)
    want.backward()
    with torch.autocast(DEVICE.type, dtype=dtype):
        got = loss_fn(*cast_in)
    got.backward()
    assert got.dtype == torch.float32
    # the same computation: equal up to fp32 round-off (bf16 logits were 4e-4 relative off on the torch backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for g, w in zip((t.grad for t in cast_in), (t.grad for t in plain_in)):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
