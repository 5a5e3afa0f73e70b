"""The errors of ``gather_across_devices`` when the ranks disagree (issue 25, item 3), on two gloo ranks: every rank
raises the same ValueError, which names the dtypes as torch spells them, or why a rank cannot take the ring schedule
the others asked for (its similarity_fct, or its scale), instead of codes or a bare schedule mismatch; nobody
hangs (a deadline)."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from conftest import gloo_rank, spawn_gloo

import embedloss_kernels as ek

SPAWN_TIMEOUT_S = 200


def custom_sim(a, b):
    return a @ b.T


def _columns(rank, dtype=torch.float64):
    gen = torch.Generator().manual_seed(rank)
    return [torch.randn(3, 8, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2)]


def _worker(rank, world, init_file, out_dir):
    with gloo_rank(rank, world, init_file):
        results = {}
        warnings.simplefilter("ignore")
        cases = {
            "dtype": ("gather", {}, torch.float32 if rank == 0 else torch.float64),
            "dtype ring": ("ring", {}, torch.float32 if rank == 0 else torch.float64),
            "similarity": ("ring", dict(similarity_fct=custom_sim) if rank == 1 else {}, torch.float64),
            "scale": ("ring", dict(scale=math.inf) if rank == 1 else {}, torch.float64),
        }
        for key, (schedule, kwargs, dtype) in cases.items():
            os.environ["EMBEDLOSS_DISTRIBUTED_SCHEDULE"] = schedule
            loss_fn = ek.MultipleNegativesRankingLoss(None, gather_across_devices=True, **kwargs)
            try:
                loss_fn.compute_loss_from_embeddings(_columns(rank, dtype), None)
                results[key] = None
            except (ValueError, TypeError) as exc:
                results[key] = f"{type(exc).__name__}: {exc}"
        torch.save(results, os.path.join(out_dir, f"r{rank}.pt"))


@pytest.fixture(scope="module")
def messages(tmp_path_factory):

    tmp = tmp_path_factory.mktemp("dist_errors")
    spawn_gloo(_worker, 2, (2, str(tmp / "init"), str(tmp)), SPAWN_TIMEOUT_S)
    return [torch.load(tmp / f"r{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("case", ["dtype", "dtype ring"])
def test_different_dtypes_are_named_on_every_rank(messages, case):
    for rank, res in enumerate(messages):
        msg = res[case]
        assert msg is not None and msg.startswith("ValueError"), (rank, msg)
        assert "same dtype" in msg and "rank 0: torch.float32" in msg and "rank 1: torch.float64" in msg, msg


def test_ring_blocked_by_similarity_names_it_on_every_rank(messages):
    for rank, res in enumerate(messages):
        msg = res["similarity"]
        assert msg is not None and msg.startswith("ValueError"), (rank, msg)
        assert "rank 1: its similarity_fct custom_sim is not fused" in msg, msg
        assert "cosine and dot similarity only" in msg and "EMBEDLOSS_DISTRIBUTED_SCHEDULE=gather" in msg, msg
        assert "must use the same schedule" not in msg, msg


def test_ring_blocked_by_scale_names_it_on_every_rank(messages):
    for rank, res in enumerate(messages):
        msg = res["scale"]
        assert msg is not None and msg.startswith("ValueError"), (rank, msg)
        assert "rank 1: its scale inf is not finite and non-zero" in msg, msg
        assert "must use the same schedule" not in msg, msg
