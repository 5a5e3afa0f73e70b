"""gather_across_devices over a real gloo process group (2 and 3 CPU processes on loopback).

One spawn per world size runs every option combination through both schedules (gather and ring); the workers save
losses and local gradients to files and the parent compares them with sentence-transformers' ``all_gather_with_grad``
path (run in the same workers) and with the float64 oracle on the whole world batch in one process.

gloo is a CPU process group: these tests run on CPU tensors on purpose, on a CUDA machine too (with the backends
that run on CPU; the triton interpreter is covered by the single-process tests).
"""

from __future__ import annotations

import itertools
import logging
import os

import pytest
import torch
import torch.distributed as dist
from conftest import gloo_rank, spawn_gloo

from embedloss_kernels import dispatch, functional, reference
from embedloss_kernels.core import log
from embedloss_kernels.distributed import collectives, ring
from embedloss_kernels.losses import MultipleNegativesRankingLoss, MultipleNegativesSymmetricRankingLoss

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


def _ours(cols, c, backend, schedule="gather"):
    loss = functional.infonce_across_devices(
        cols[0], cols[1:], scale=c["scale"], similarity=c["similarity"], directions=c["directions"],
        partition_mode=c["partition_mode"], hardness_mode=c["hardness_mode"],
        hardness_strength=c["hardness_strength"], backend=backend, block_rows=c.get("block_rows", 0),
        schedule=schedule,
    )
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in cols]


def _module(cls, cols, c):
    extra = {} if cls is MultipleNegativesSymmetricRankingLoss else dict(
        directions=c["directions"], partition_mode=c["partition_mode"], hardness_mode=c["hardness_mode"],
        hardness_strength=c["hardness_strength"])
    mod = cls(None, scale=c["scale"], similarity_fct=_st_sim(c["similarity"]), gather_across_devices=True, **extra)
    loss = mod.compute_loss_from_embeddings(cols, None)
    loss.backward()
    return loss.detach(), [t.grad.clone() for t in cols]


class _Recorder:
    """Counts the ring's entry, its shifts per tag and the sizes of the all-gathers, by wrapping them."""

    def __init__(self):
        self.ring_calls, self.shifts, self.dtypes, self.gathered = 0, [], set(), []

    def __enter__(self):
        self.saved = ring.infonce_ring, ring._shift, collectives.all_gather_flat

        def infonce_ring(*args, **kwargs):
            self.ring_calls += 1
            return self.saved[0](*args, **kwargs)

        def shift(send, recv, ring_, tag):
            self.shifts.append(tag)
            self.dtypes.add((tag, send.dtype))
            return self.saved[1](send, recv, ring_, tag)

        def gather(out, inp, group):
            self.gathered.append(out.numel())
            return self.saved[2](out, inp, group)

        ring.infonce_ring, ring._shift, collectives.all_gather_flat = infonce_ring, shift, gather
        return self

    def __exit__(self, *exc):
        ring.infonce_ring, ring._shift, collectives.all_gather_flat = self.saved


def _ring_checks(rank, world, b, combo_list, backend):
    """The ring through the environment variable and the drop-in modules, its communication pattern, its errors."""
    out = {}
    env = collectives.SCHEDULE_ENV
    c = dict(combo_list[-1], hardness_mode="in_batch_negatives", hardness_strength=0.7, negatives=1)
    cols_world = world_columns(21, b * world, 3)
    os.environ[env] = "ring"
    try:
        with _Recorder() as rec:
            out["env_mnrl"] = _module(MultipleNegativesRankingLoss, local_slice(cols_world, [b] * world, rank), c)
            out["env_sym"] = _module(MultipleNegativesSymmetricRankingLoss, local_slice(cols_world, [b] * world, rank),
                                     c)
        out["env_ring_calls"], out["env_shifts"], out["env_gathered"] = rec.ring_calls, rec.shifts, rec.gathered
        # a similarity the ring does not cover: the gather schedule, same numbers as ST
        with _Recorder() as rec:
            out["env_custom"] = _module(MultipleNegativesRankingLoss, local_slice(cols_world, [b] * world, rank),
                                        dict(c, similarity=custom_sim, scale=3.0))
        out["custom_ring_calls"] = rec.ring_calls
        for bad in ("rings", "RING " if rank == 0 else "gather"):  # a typo everywhere; then ranks that disagree
            os.environ[env] = bad
            try:
                _module(MultipleNegativesRankingLoss, local_slice(cols_world, [b] * world, rank), c)
            except ValueError as exc:
                out.setdefault("env_errors", []).append(str(exc))
            dist.barrier()
    finally:
        del os.environ[env]
    with _Recorder() as rec:  # unset: the gather schedule
        out["env_unset"] = _module(MultipleNegativesRankingLoss, local_slice(cols_world, [b] * world, rank), c)
    out["unset_ring_calls"], out["unset_gathered"] = rec.ring_calls, rec.gathered
    # without grad: the forward pass alone, the same loss
    with torch.no_grad():
        cols = local_slice(cols_world, [b] * world, rank)
        out["no_grad"] = functional.infonce_across_devices(
            cols[0], cols[1:], scale=c["scale"], similarity=c["similarity"], directions=c["directions"],
            partition_mode=c["partition_mode"], hardness_mode=c["hardness_mode"],
            hardness_strength=c["hardness_strength"], schedule="ring",
        )
    # float32: ring and gather agree to float32 round-off
    cols32 = [t.float() for t in cols_world]
    out["fp32"] = [_ours(local_slice(cols32, [b] * world, rank), c, backend, s) for s in ("ring", "gather")]
    # bfloat16 (cosine): blocks travel as raw bf16, accumulators as float32; every rank normalizes in float32 as
    # the fused op does, so ring and gather still agree to float32 round-off in the loss
    c16 = dict(c, similarity="cosine", scale=20.0)
    cols16 = [t.bfloat16() for t in cols_world]
    with _Recorder() as rec:
        ring16 = _ours(local_slice(cols16, [b] * world, rank), c16, backend, "ring")
    out["bf16"] = [ring16, _ours(local_slice(cols16, [b] * world, rank), c16, backend, "gather")]
    out["bf16_dtypes"] = rec.dtypes
    try:
        functional.infonce_across_devices(*local_slice(cols_world, [b] * world, rank)[:2], schedule="Ring")
    except ValueError as exc:
        out["kw_error"] = str(exc)
    return out


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
    logging.getLogger("sentence_transformers").setLevel(logging.ERROR)
    with gloo_rank(rank, world, init_file):
        res = {"equal": [], "unequal": None, "module": None, "error": None}
        b = {2: 5, 3: 3}[world]
        sizes = [b] * world
        for c in combo_list:
            cols_world = world_columns(c["seed"], b * world, 2 + c["negatives"])
            entry = {"ours": {}}
            for name in backends_:
                entry["ours"][name] = _ours(local_slice(cols_world, sizes, rank), c, name)
            entry["ring"] = _ours(local_slice(cols_world, sizes, rank), c, backends_[0], "ring")
            entry["st"] = _st(local_slice(cols_world, sizes, rank), c)
            res["equal"].append(entry)
        res["ring"] = _ring_checks(rank, world, b, combo_list, backends_[0])
        # the drop-in module (gather_across_devices=True) with a non-fused similarity, against ST's
        c = dict(combo_list[0], similarity=custom_sim, scale=3.0, negatives=1)
        cols_world = world_columns(7, b * world, 3)
        ours_mod = MultipleNegativesRankingLoss(
            None, scale=3.0, similarity_fct=custom_sim, gather_across_devices=True, directions=c["directions"],
            partition_mode=c["partition_mode"],
        )
        cols = local_slice(cols_world, sizes, rank)
        loss = ours_mod.compute_loss_from_embeddings(cols, None)
        loss.backward()
        res["module"] = ((loss.detach(), [t.grad.clone() for t in cols]), _st(local_slice(cols_world, sizes, rank), c))
        # a process group without reduce-scatter: the backward falls back to all_reduce + slice
        def unsupported(*args, **kwargs):
            raise RuntimeError("reduce_scatter is not supported by this backend")

        # reduce_scatter_single is not in every torch (2.11 lacks it): swap only what this torch has, as the
        # package looks it up with getattr
        saved = {name: getattr(dist, name) for name in ("reduce_scatter_single", "reduce_scatter_tensor")
                 if hasattr(dist, name)}
        for name in saved:
            setattr(dist, name, unsupported)
        try:
            c = combo_list[-1]
            res["fallback"] = _ours(local_slice(world_columns(c["seed"], b * world, 2 + c["negatives"]), sizes, rank),
                                    c, backends_[0])
        finally:
            for name, fn in saved.items():
                setattr(dist, name, fn)
        # unequal local batch sizes (one rank may hold a single row)
        c = dict(combo_list[-1])
        cols_world = world_columns(11, sum(unequal_sizes), 2 + c["negatives"])
        res["unequal"] = _ours(local_slice(cols_world, unequal_sizes, rank), c, backends_[0])
        # the ring with unequal sizes: every option combination (padding rows travel, are never scored)
        res["unequal_ring"] = []
        for c in combo_list:
            cols_world = world_columns(c["seed"] + 500, sum(unequal_sizes), 2 + c["negatives"])
            res["unequal_ring"].append(_ours(local_slice(cols_world, unequal_sizes, rank), c, backends_[0], "ring"))
        # ranks disagreeing on the embedding dim: the same ValueError on every rank, no hang
        dim = DIM if rank == 0 else DIM - 1
        cols = [t.requires_grad_(True) for t in world_columns(rank, 3, 2, dim)]
        try:
            _ours(cols, combo_list[0], backends_[0])
        except ValueError as exc:
            res["error"] = str(exc)
        dist.barrier()  # the group still works after the error
        # NaN embeddings on rank 0 only: the module returns a NaN loss on every rank, as sentence-transformers does
        # (rank 0's columns reach every rank); with EMBEDLOSS_CHECK_FINITE=1 every rank raises instead of the others
        # hanging
        cols = [t.requires_grad_(True) for t in world_columns(rank, 3, 2)]
        if rank == 0:
            cols[1].data[1, 2] = float("nan")
        loss_fn = MultipleNegativesRankingLoss(None, gather_across_devices=True)
        res["nan_loss"] = loss_fn.compute_loss_from_embeddings(cols, None).item()
        os.environ["EMBEDLOSS_CHECK_FINITE"] = "1"
        try:
            loss_fn.compute_loss_from_embeddings(cols, None)
        except ValueError as exc:
            res["nan_error"] = str(exc)
        finally:
            del os.environ["EMBEDLOSS_CHECK_FINITE"]
        dist.barrier()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


def _available_backends():
    # triton through the interpreter is too slow for 72 combos x ranks; it is covered by the single-process tests
    return [n for n in ("torch", "cpp") if dispatch.why_not(n, "cpu") is None]


def _spawn(world, tmp_path, combo_list, unequal_sizes):
    out_dir = tmp_path / f"w{world}"
    out_dir.mkdir()
    backends_ = _available_backends()
    spawn_gloo(_worker, world, (world, str(tmp_path / f"init{world}"), str(out_dir), backends_, combo_list,
                                unequal_sizes), SPAWN_TIMEOUT_S, f"world size {world}")
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
            for name in [*backends_, "ring"]:
                loss, grads = res["equal"][i]["ours"][name] if name != "ring" else res["equal"][i]["ring"]
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
    # the ring with unequal local batch sizes, every combination, against the oracle
    for i, c in enumerate(combo_list):
        ref_losses, ref_grads = _oracle(world_columns(c["seed"] + 500, sum(unequal_sizes), 2 + c["negatives"]), c,
                                        list(unequal_sizes))
        for rank, res in enumerate(results):
            loss, grads = res["unequal_ring"][i]
            msg = f"ring, sizes {unequal_sizes}, combo {c}, rank {rank}"
            assert grads[0].shape[0] == unequal_sizes[rank]
            torch.testing.assert_close(loss, ref_losses[rank], rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}: {m}")
            for g, rg in zip(grads, _local(ref_grads, list(unequal_sizes), rank)):
                torch.testing.assert_close(g, rg, rtol=RTOL, atol=ATOL, msg=lambda m: f"{msg}: {m}")
    _check_ring_extras(world, b, results)
    # mismatched embedding dims: every rank raised the same clear ValueError
    errors = [res["error"] for res in results]
    assert all(e is not None and "same embedding dim" in e for e in errors), errors
    assert all(res["nan_loss"] != res["nan_loss"] for res in results), [res["nan_loss"] for res in results]
    nan_errors = [res.get("nan_error") for res in results]
    assert "NaN or Inf" in nan_errors[0], nan_errors
    assert all("rank(s) [0] failed validation" in e for e in nan_errors[1:]), nan_errors
    assert len(set(errors)) == 1 and f"rank 0: {DIM}" in errors[0] and f"rank 1: {DIM - 1}" in errors[0]


def _check_ring_extras(world, b, results):
    c = dict(combos()[-1], hardness_mode="in_batch_negatives", hardness_strength=0.7, negatives=1)
    sizes = [b] * world
    ref_losses, ref_grads = _oracle(world_columns(21, b * world, 3), c, sizes)
    sym = dict(c, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction", hardness_mode=None,
               hardness_strength=0.0)
    sym_losses, sym_grads = _oracle(world_columns(21, b * world, 3), sym, sizes)
    custom = dict(c, similarity=custom_sim, scale=3.0)
    custom_losses, custom_grads = _oracle(world_columns(21, b * world, 3), custom, sizes)
    bf16_losses, bf16_grads = _oracle([t.bfloat16().double() for t in world_columns(21, b * world, 3)],
                                      dict(c, similarity="cosine", scale=20.0), sizes)
    for rank, res in enumerate(results):
        r = res["ring"]
        for key, (want_losses, want_grads) in (("env_mnrl", (ref_losses, ref_grads)), ("env_unset", (ref_losses,
                                               ref_grads)), ("env_sym", (sym_losses, sym_grads)),
                                               ("env_custom", (custom_losses, custom_grads))):
            loss, grads = r[key]
            torch.testing.assert_close(loss, want_losses[rank], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
            for g, rg in zip(grads, _local(want_grads, sizes, rank)):
                torch.testing.assert_close(g, rg, rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
        torch.testing.assert_close(r["no_grad"], ref_losses[rank], rtol=RTOL, atol=ATOL)
        # the environment variable chose the ring for both modules, and nothing the unfused or unset cases
        assert r["env_ring_calls"] == 2 and r["custom_ring_calls"] == 0 and r["unset_ring_calls"] == 0
        # per ring loss: (W-1) column shifts forward, (W-1) column + W accumulator shifts backward; the only
        # all-gather is the metadata (a few integers per rank), where the gather schedule gathers every column
        per_call = [ring._TAG_COLUMNS] * (world - 1) + ([ring._TAG_COLUMNS, ring._TAG_GRADS] * (world - 1)
                                                        + [ring._TAG_GRADS])
        assert sorted(r["env_shifts"]) == sorted(per_call * 2), r["env_shifts"]
        assert r["env_gathered"] == [collectives._META_FIELDS * world] * 2, r["env_gathered"]
        assert max(r["unset_gathered"]) >= b * world * DIM, r["unset_gathered"]
        (ring_loss, ring_grads), (gather_loss, gather_grads) = r["fp32"]
        assert ring_loss.dtype == torch.float32 and ring_grads[0].dtype == torch.float32
        torch.testing.assert_close(ring_loss, gather_loss, rtol=1e-5, atol=1e-6)
        for g, gg in zip(ring_grads, gather_grads):
            torch.testing.assert_close(g, gg, rtol=1e-4, atol=1e-6)
        (ring_loss, ring_grads), (gather_loss, _) = r["bf16"]
        assert ring_loss.dtype == torch.float32 and ring_grads[0].dtype == torch.bfloat16
        torch.testing.assert_close(ring_loss, gather_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ring_loss.double(), bf16_losses[rank], rtol=1e-5, atol=1e-6)
        # the ring sums column gradients in float32 and rounds once to bf16 (the gather schedule reduce-scatters
        # bf16 partial sums, a few roundings more): within one bf16 rounding of the float64 oracle
        for g, rg in zip(ring_grads, _local(bf16_grads, sizes, rank)):
            torch.testing.assert_close(g.double(), rg, rtol=2**-8, atol=1e-6)
        assert r["bf16_dtypes"] == {(ring._TAG_COLUMNS, torch.bfloat16), (ring._TAG_GRADS, torch.float32)}
        typo, disagree = r["env_errors"]
        assert "EMBEDLOSS_DISTRIBUTED_SCHEDULE" in typo and "'gather', 'ring'" in typo and "'rings'" in typo, typo
        assert "same schedule" in disagree and "rank 0: 'ring'" in disagree and "rank 1: 'gather'" in disagree
        assert "schedule must be one of 'gather', 'ring', got 'Ring'" in r["kw_error"], r["kw_error"]
    assert len({res["ring"]["env_errors"][1] for res in results}) == 1  # the same message on every rank


def test_not_initialized_is_local_with_one_warning(caplog):
    assert not dist.is_initialized()
    log._warned.discard("gather-not-distributed")
    cols = world_columns(3, 4, 3)
    opts = dict(scale=20.0, similarity="cosine", directions=("query_to_doc",), partition_mode="joint",
                hardness_mode=None, hardness_strength=0.0)
    with caplog.at_level(logging.WARNING, logger="embedloss_kernels"):
        first = functional.infonce_across_devices(cols[0], cols[1:], **opts)
        second = functional.infonce_across_devices(cols[0], cols[1:], **opts)
    expected = reference.infonce_reference(cols[0], cols[1:], 20.0)
    torch.testing.assert_close(first, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(second, expected, rtol=RTOL, atol=ATOL)
    assert sum("not initialized" in r.getMessage() for r in caplog.records) == 1


def test_ring_with_one_rank_matches_oracle(tmp_path):
    """A process group of one rank: the ring has no hop, the block's accumulator is already complete."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1)
    try:
        for c in combos()[::7]:
            cols_world = world_columns(c["seed"], 6, 2 + c["negatives"])
            cols = local_slice(cols_world, [6], 0)
            loss, grads = _ours(cols, c, "torch", "ring")
            ref_losses, ref_grads = _oracle(cols_world, c, [6])
            torch.testing.assert_close(loss, ref_losses[0], rtol=RTOL, atol=ATOL, msg=lambda m: f"{c}: {m}")
            for g, rg in zip(grads, ref_grads):
                torch.testing.assert_close(g, rg, rtol=RTOL, atol=ATOL, msg=lambda m: f"{c}: {m}")
    finally:
        dist.destroy_process_group()
