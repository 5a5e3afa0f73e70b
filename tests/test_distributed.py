"""gather_across_devices over a real gloo process group (2 and 3 CPU processes on loopback).

One spawn per world size runs every option combination; the workers save losses and local gradients to files and
the parent compares them with sentence-transformers' ``all_gather_with_grad`` path (run in the same workers) and
with the float64 oracle on the whole world batch in one process.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from embedloss_kernels import _backends, distributed, functional, reference
from embedloss_kernels.losses import MultipleNegativesRankingLoss

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_util = pytest.importorskip("sentence_transformers.util")

DIM = 19
RTOL, ATOL = 1e-8, 1e-10
SPAWN_TIMEOUT_S = 100
DIRECTION_SETS = [
    (("query_to_doc",), "joint"),
    (("query_to_doc", "query_to_query"), "joint"),
    (("query_to_doc", "doc_to_query"), "joint"),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint"),
    (("query_to_doc",), "per_direction"),
    (("query_to_doc", "doc_to_query"), "per_direction"),
]
HARDNESS = [(None, 0.0), ("in_batch_negatives", 0.7), ("hard_negatives", 0.7), ("all_negatives", 0.7)]
NEGATIVES = [0, 1, 2]


def combos():
    out = []
    for i, ((dirs, part), (hmode, hstr), k) in enumerate(itertools.product(DIRECTION_SETS, HARDNESS, NEGATIVES)):
        sim = "cosine" if i % 2 == 0 else "dot"
        out.append(dict(directions=dirs, partition_mode=part, hardness_mode=hmode, hardness_strength=hstr,
                        similarity=sim, scale=20.0 if sim == "cosine" else 0.5, negatives=k, seed=1000 + i,
                        block_rows=2 if i % 3 == 0 else 0))  # 2: several row blocks inside a rank's rows
    return out


def world_columns(seed: int, rows: int, columns: int, dim: int = DIM) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64) for _ in range(columns)]


def local_slice(cols, sizes, rank):
    start = sum(sizes[:rank])
    return [c[start : start + sizes[rank]].clone().requires_grad_(True) for c in cols]


def custom_sim(a, b):
    # not recognised as cosine/dot: exercises the materialized fallback under gather
    return torch.tanh(a @ b.T / 4.0)


def _st_sim(name):
    return {"cosine": st_util.cos_sim, "dot": st_util.dot_score}.get(name, name)


def _ours(cols, c, backend):
    loss = distributed.infonce_across_devices(
        cols[0], cols[1:], scale=c["scale"], similarity=c["similarity"], directions=c["directions"],
        partition_mode=c["partition_mode"], hardness_mode=c["hardness_mode"],
        hardness_strength=c["hardness_strength"], backend=backend, block_rows=c.get("block_rows", 0),
    )
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in cols]


def _st(cols, c):
    st = st_losses.MultipleNegativesRankingLoss(
        None, scale=c["scale"], similarity_fct=_st_sim(c["similarity"]), gather_across_devices=True,
        directions=c["directions"], partition_mode=c["partition_mode"], hardness_mode=c["hardness_mode"],
        hardness_strength=c["hardness_strength"],
    )
    loss = st.compute_loss_from_embeddings(cols, None)
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in cols]


def _worker(rank, world, init_file, out_dir, backends_, combo_list, unequal_sizes):
    torch.set_num_threads(1)
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        res = {"equal": [], "unequal": None, "module": None, "error": None}
        b = {2: 5, 3: 3}[world]
        sizes = [b] * world
        for c in combo_list:
            cols_world = world_columns(c["seed"], b * world, 2 + c["negatives"])
            entry = {"ours": {}}
            for name in backends_:
                entry["ours"][name] = _ours(local_slice(cols_world, sizes, rank), c, name)
            entry["st"] = _st(local_slice(cols_world, sizes, rank), c)
            res["equal"].append(entry)
        # the drop-in module (gather_across_devices=True) with a non-fused similarity, against ST's
        c = dict(combo_list[0], similarity=custom_sim, scale=3.0, negatives=1)
        cols_world = world_columns(7, b * world, 3)
        ours_mod = MultipleNegativesRankingLoss(
            None, scale=3.0, similarity_fct=custom_sim, gather_across_devices=True, directions=c["directions"],
            partition_mode=c["partition_mode"],
        )
        cols = local_slice(cols_world, sizes, rank)
        loss = ours_mod.compute_loss_from_embeddings(cols)
        loss.backward()
        res["module"] = ((loss.detach(), [t.grad.clone() for t in cols]), _st(local_slice(cols_world, sizes, rank), c))
        # a process group without reduce-scatter: the backward falls back to all_reduce + slice
        def unsupported(*args, **kwargs):
            raise RuntimeError("reduce_scatter is not supported by this backend")

        saved = dist.reduce_scatter_single, dist.reduce_scatter_tensor
        dist.reduce_scatter_single = dist.reduce_scatter_tensor = unsupported
        try:
            c = combo_list[-1]
            res["fallback"] = _ours(local_slice(world_columns(c["seed"], b * world, 2 + c["negatives"]), sizes, rank),
                                    c, backends_[0])
        finally:
            dist.reduce_scatter_single, dist.reduce_scatter_tensor = saved
        # unequal local batch sizes (one rank may hold a single row)
        c = dict(combo_list[-1])
        cols_world = world_columns(11, sum(unequal_sizes), 2 + c["negatives"])
        res["unequal"] = _ours(local_slice(cols_world, unequal_sizes, rank), c, backends_[0])
        # ranks disagreeing on the embedding dim: the same ValueError on every rank, no hang
        dim = DIM if rank == 0 else DIM - 1
        cols = [t.requires_grad_(True) for t in world_columns(rank, 3, 2, dim)]
        try:
            _ours(cols, combo_list[0], backends_[0])
        except ValueError as exc:
            res["error"] = str(exc)
        dist.barrier()  # the group still works after the error
        # NaN embeddings on rank 0 only: through the module, every rank raises instead of the others hanging
        cols = [t.requires_grad_(True) for t in world_columns(rank, 3, 2)]
        if rank == 0:
            cols[1].data[1, 2] = float("nan")
        try:
            MultipleNegativesRankingLoss(None, gather_across_devices=True).compute_loss_from_embeddings(cols, None)
        except ValueError as exc:
            res["nan_error"] = str(exc)
        dist.barrier()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _available_backends():
    # triton through the interpreter is too slow for 72 combos x ranks; it is covered by the single-process tests
    return [n for n in ("torch", "cpp") if _backends.why_not(n, "cpu") is None]


def _spawn(world, tmp_path, combo_list, unequal_sizes):
    out_dir = tmp_path / f"w{world}"
    out_dir.mkdir()
    backends_ = _available_backends()
    ctx = mp.spawn(_worker, args=(world, str(tmp_path / f"init{world}"), str(out_dir), backends_, combo_list,
                                  unequal_sizes), nprocs=world, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"world size {world}: workers did not finish within {SPAWN_TIMEOUT_S} s (hang?)")
    return backends_, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _oracle(cols_world, c, sizes):
    """Per-rank losses and d(sum of rank losses)/d(world columns), in one process on the whole world batch."""
    cols = [t.clone().requires_grad_(True) for t in cols_world]
    sim = {"cosine": reference.cos_sim, "dot": reference.dot_score}.get(c["similarity"], c["similarity"])
    losses = []
    for r in range(len(sizes)):
        losses.append(reference.infonce_reference(
            cols[0], cols[1:], c["scale"], sim, c["directions"], c["partition_mode"], c["hardness_mode"],
            c["hardness_strength"], sum(sizes[:r]), sizes[r],
        ))
    torch.stack(losses).sum().backward()
    return [x.detach() for x in losses], [t.grad for t in cols]


def _local(grads, sizes, rank):
    start = sum(sizes[:rank])
    return [g[start : start + sizes[rank]] for g in grads]


@pytest.mark.parametrize("world,unequal_sizes", [(2, (1, 4)), (3, (2, 5, 1))])
def test_gather_across_devices_matches_st_and_world_oracle(world, unequal_sizes, tmp_path):
    combo_list = combos()
    backends_, results = _spawn(world, tmp_path, combo_list, unequal_sizes)
    assert backends_, "no CPU backend available"
    b = {2: 5, 3: 3}[world]
    sizes = [b] * world
    for i, c in enumerate(combo_list):
        cols_world = world_columns(c["seed"], b * world, 2 + c["negatives"])
        ref_losses, ref_grads = _oracle(cols_world, c, sizes)
        # a single process on the whole world batch: mean loss = mean of rank losses, gradient = sum / world
        whole, whole_grads = _oracle(cols_world, c, [b * world])
        torch.testing.assert_close(torch.stack(ref_losses).mean(), whole[0], rtol=RTOL, atol=ATOL)
        for g, w in zip(ref_grads, whole_grads):
            torch.testing.assert_close(g / world, w, rtol=RTOL, atol=ATOL)
        for rank, res in enumerate(results):
            st_loss, st_grads = res["equal"][i]["st"]
            msg = f"combo {c}, rank {rank}"
            torch.testing.assert_close(st_loss, ref_losses[rank], rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}: {m}")
            for name in backends_:
                loss, grads = res["equal"][i]["ours"][name]
                assert loss.dtype == torch.float64
                torch.testing.assert_close(loss, st_loss, rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{name} {msg}: loss {m}")
                for j, (g, sg, rg) in enumerate(zip(grads, st_grads, _local(ref_grads, sizes, rank))):
                    torch.testing.assert_close(g, sg, rtol=RTOL, atol=ATOL,
                                               msg=lambda m: f"{name} {msg}: column {j} vs ST: {m}")
                    torch.testing.assert_close(g, rg, rtol=RTOL, atol=ATOL,
                                               msg=lambda m: f"{name} {msg}: column {j} vs oracle: {m}")
    for rank, res in enumerate(results):
        (loss, grads), (st_loss, st_grads) = res["module"]
        torch.testing.assert_close(loss, st_loss, rtol=RTOL, atol=ATOL, msg=lambda m: f"module, rank {rank}: {m}")
        for g, sg in zip(grads, st_grads):
            torch.testing.assert_close(g, sg, rtol=RTOL, atol=ATOL, msg=lambda m: f"module, rank {rank}: {m}")
    # no reduce-scatter in the process group: same numbers through all_reduce + slice
    for rank, res in enumerate(results):
        for got, want in zip(res["fallback"][1], res["equal"][-1]["st"][1]):
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"fallback rank {rank}: {m}")
    # unequal local batch sizes: row_start is the prefix sum, padding rows are never scored
    c = combo_list[-1]
    ref_losses, ref_grads = _oracle(world_columns(11, sum(unequal_sizes), 2 + c["negatives"]), c, list(unequal_sizes))
    for rank, res in enumerate(results):
        loss, grads = res["unequal"]
        assert grads[0].shape[0] == unequal_sizes[rank]
        torch.testing.assert_close(loss, ref_losses[rank], rtol=RTOL, atol=ATOL)
        for g, rg in zip(grads, _local(ref_grads, list(unequal_sizes), rank)):
            torch.testing.assert_close(g, rg, rtol=RTOL, atol=ATOL)
    # mismatched embedding dims: every rank raised the same clear ValueError
    errors = [res["error"] for res in results]
    assert all(e is not None and "same embedding dim" in e for e in errors), errors
    nan_errors = [res.get("nan_error") for res in results]
    assert "NaN or Inf" in nan_errors[0], nan_errors
    assert all("rank(s) [0] failed validation" in e for e in nan_errors[1:]), nan_errors
    assert len(set(errors)) == 1 and f"rank 0: {DIM}" in errors[0] and f"rank 1: {DIM - 1}" in errors[0]


def test_not_initialized_is_local_with_one_warning(caplog):
    assert not dist.is_initialized()
    functional._warned.discard("gather-not-distributed")
    cols = world_columns(3, 4, 3)
    opts = dict(scale=20.0, similarity="cosine", directions=("query_to_doc",), partition_mode="joint",
                hardness_mode=None, hardness_strength=0.0)
    with caplog.at_level(logging.WARNING, logger="embedloss_kernels"):
        first = distributed.infonce_across_devices(cols[0], cols[1:], **opts)
        second = distributed.infonce_across_devices(cols[0], cols[1:], **opts)
    expected = reference.infonce_reference(cols[0], cols[1:], 20.0)
    torch.testing.assert_close(first, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(second, expected, rtol=RTOL, atol=ATOL)
    assert sum("not initialized" in r.getMessage() for r in caplog.records) == 1
