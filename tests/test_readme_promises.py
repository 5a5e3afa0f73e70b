"""README promises that had no test (issue 24, list 5)."""

import copy
import warnings

import pytest
import torch
from conftest import (
    DEVICE,
    PassThroughModel,
    assert_float64_close,
    assert_param_grads_close,
    gloo_rank,
    loss_and_grads,
    param_grads,
    seeded_columns,
    spawn_gloo,
)

import embedloss_kernels as ek
from embedloss_kernels import functional

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")


def test_tensor_hardness_strength_is_a_type_error():
    """README: hardness_strength is a number; a tensor is a TypeError naming the argument (functional and module)."""
    q, p = seeded_columns(0, 2, 4, 6)
    with pytest.raises(TypeError, match="hardness_strength"):
        functional.multiple_negatives_ranking_loss(q, p, hardness_mode="in_batch_negatives",
                                                   hardness_strength=torch.tensor(2.0))
    with pytest.raises(TypeError, match="hardness_strength"):
        ek.MultipleNegativesRankingLoss(None, hardness_mode="in_batch_negatives",
                                        hardness_strength=torch.tensor(2.0)).compute_loss_from_embeddings([q, p], None)


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["GISTEmbedLoss", "CachedGISTEmbedLoss"])
def test_gist_modules_raise_on_non_finite_margin(tiny_model, name, margin):
    """README: a non-finite margin is a ValueError of the GIST modules (not only of the functional API)."""
    from embedloss_kernels import losses

    cls = getattr(losses, name)


    with pytest.raises(ValueError, match="margin"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(tiny_model, tiny_model, margin=margin)


@pytest.mark.parametrize("dims,weights", [([12, 6, 3], [1.0, 0.5, 2.0]), ([12, 4], None)])
def test_matryoshka_over_plain_symmetric_mnrl_matches_sentence_transformers(dims, weights):
    """README: plain MultipleNegativesSymmetricRankingLoss as the inner loss (one fused call), float64 within 1e-8
    of sentence-transformers' MatryoshkaLoss over its MNSRL."""
    model = PassThroughModel(12)
    columns = seeded_columns(3, 2, 7, 12)
    results = []
    for lib in (ek, st_losses):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = lib.MatryoshkaLoss(model, lib.MultipleNegativesSymmetricRankingLoss(model, scale=15.0), dims,
                                      weights)
        results.append(loss_and_grads(lambda c, loss=loss: loss([{"embedding": x} for x in c], None), columns))
    (loss, grads), (ref, ref_grads) = results
    assert_float64_close(loss, ref, what="loss")
    for g, r in zip(grads, ref_grads):
        assert_float64_close(g, r, what="gradient")


def test_losses_built_before_patching_keep_their_class():
    """README: patching replaces the classes in sentence-transformers' namespace; a loss built before keeps its
    class (and after unpatching, one built while patched keeps ours)."""
    from embedloss_kernels import patching

    was_patched = patching.is_patched()
    patching.unpatch_sentence_transformers()
    try:
        before = st_losses.MultipleNegativesRankingLoss(None)
        patching.patch_sentence_transformers()
        during = st_losses.MultipleNegativesRankingLoss(None)
        patching.unpatch_sentence_transformers()
        assert not isinstance(before, ek.MultipleNegativesRankingLoss)
        assert type(before).__module__.startswith("sentence_transformers")
        assert isinstance(during, ek.MultipleNegativesRankingLoss)
        assert type(during) is ek.MultipleNegativesRankingLoss
    finally:
        (patching.patch_sentence_transformers if was_patched else patching.unpatch_sentence_transformers)()


# -- the gradient cache: mini_batch_num_tokens and DDP's no-sync handling ---------------------------------------------
def _cached_run(loss, model, feats):
    """Loss and every parameter gradient of one step, with the number of embedding calls of the model (with and
    without grad: the cached losses embed each mini-batch twice)."""
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        model.zero_grad()
        value = loss(feats, None)
        value.backward()
    finally:
        handle.remove()
    return value.detach(), param_grads(model), len(calls)


def _mixed_sentences(n, seed):
    """``n`` sentences of 1 to 10 words (3 to 12 tokens)."""
    from tiny_model import sentences

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 11, (n,), generator=gen).tolist()
    return [" ".join(s.split()[:k]) for s, k in zip(sentences(n, seed, length=10), lengths)]


def test_mini_batch_num_tokens_matches_sentence_transformers(tiny_model):
    """README: the cached losses take sentence-transformers' ``mini_batch_num_tokens`` (mini-batches cut by token
    count): float64 loss and every parameter gradient within 1e-8 of its CachedMultipleNegativesRankingLoss with the
    same budget (rows in their order, and length-sorted), and the budget is what cuts the mini-batches: in row order
    as many as sentence-transformers', more than ``mini_batch_size`` alone makes."""
    from tiny_model import on_device

    model = copy.deepcopy(tiny_model).eval().double()
    feats = [on_device(model.preprocess(_mixed_sentences(8, seed)), model.device) for seed in (1, 2)]
    opts = dict(mini_batch_size=8, hardness_mode="in_batch_negatives", hardness_strength=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _cached_run(st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=12, **opts),
                             model, feats)
    ours = {sort: _cached_run(ek.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=12,
                                                                    sort_by_length=sort, **opts), model, feats)
            for sort in (False, True)}
    by_size = _cached_run(ek.CachedMultipleNegativesRankingLoss(model, sort_by_length=False, **opts), model, feats)
    for sort, (loss, grads, _) in ours.items():
        assert_float64_close(loss, theirs[0], what=f"loss, sort_by_length={sort}")
        assert_param_grads_close(grads, theirs[1])
    assert by_size[2] == 2 * len(feats)  # one mini-batch per column, embedded twice
    assert ours[False][2] == theirs[2] > by_size[2], (ours[False][2], theirs[2], by_size[2])
    assert ours[True][2] > by_size[2]


def test_ddp_no_sync_handling_synchronizes_once(tiny_model, tmp_path):
    """README: the cached losses keep sentence-transformers' DDP no-sync handling: under DistributedDataParallel the
    replay of the mini-batches (5 here) runs under ``no_sync`` but the last, so the gradients are all-reduced once
    per step, as for a plain (non-cached) step and as sentence-transformers' cached loss does; the gradients are
    its own (float64, 1e-8). A gloo group of one rank in this process, its all-reduce counted by a comm hook."""
    import torch.distributed as dist
    from tiny_model import on_device, sentences
    from torch.nn.parallel import DistributedDataParallel

    model = copy.deepcopy(tiny_model).eval().double().cpu()
    for p in model[0].auto_model.pooler.parameters():
        p.requires_grad_(False)  # unused by the mean pooling: DDP would wait for its gradient
    feats = [on_device(model.preprocess(sentences(10, seed)), "cpu") for seed in (1, 2)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model, bucket_cap_mb=1000)  # one bucket: one all-reduce per synchronization
        reduced = []

        def count(state, bucket):
            reduced.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, count)
        results = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses = {"st": st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4),
                      "ours": ek.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4),
                      "plain": ek.MultipleNegativesRankingLoss(model)}
        for name, loss in losses.items():
            loss.model = ddp  # what SentenceTransformerTrainer does under DDP
            reduced.clear()
            model.zero_grad()
            value = loss(feats, None)
            value.backward()
            results[name] = value.detach(), param_grads(model), len(reduced)
    finally:
        dist.destroy_process_group()
    assert results["plain"][2] == 1
    assert results["st"][2] == 1 and results["ours"][2] == 1, {k: v[2] for k, v in results.items()}
    assert_float64_close(results["ours"][0], results["st"][0], what="loss")
    assert_param_grads_close(results["ours"][1], results["st"][1])


# -- version warnings -----------------------------------------------------------------------------------------------
def _import_warnings(module, containing: str) -> list[str]:
    """The warnings, containing ``containing``, of executing ``module``'s source again as a fresh module beside it in
    its package (its import-time checks run again; nothing in ``sys.modules`` is replaced)."""
    import importlib.util

    name = f"{module.__name__.rpartition('.')[0] or module.__name__}._import_probe"
    spec = importlib.util.spec_from_file_location(name, module.__file__, submodule_search_locations=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return [str(w.message) for w in caught if containing in str(w.message)]


@pytest.mark.parametrize("version,warns", [("2.10.2", True), ("1.13.0", True), ("2.11.0", False),
                                           ("2.13.0+cpu", False)])
def test_old_torch_warns_at_import(monkeypatch, version, warns):
    """README: torch >= 2.11, "a warning at import below it" (naming both versions), none from 2.11 on."""
    monkeypatch.setattr(torch, "__version__", version)
    assert _import_warnings(ek, "embedloss_kernels supports torch") == (
        [f"embedloss_kernels supports torch >= 2.11; found torch {version}."] if warns else [])


@pytest.mark.parametrize("version,warns", [("6.3.0", True), ("5.1.2", True), ("6.2.0", False), ("6.2.7", False)])
def test_other_sentence_transformers_warns(monkeypatch, version, warns):
    """README: sentence-transformers 6.2.x; "a warning when the drop-in modules meet another version"."""
    import sentence_transformers

    from embedloss_kernels.losses import _common

    monkeypatch.setattr(sentence_transformers, "__version__", version)
    messages = _import_warnings(_common, "mirror sentence-transformers")
    assert len(messages) == warns, messages
    if warns:
        assert "6.2.x" in messages[0] and f"found sentence-transformers {version}" in messages[0]


@pytest.mark.parametrize("version,inside", [("3.5.1", False), ("3.10.0", False), ("4.0.0", False), ("3.6.0", True),
                                            ("3.9.9", True)])
def test_triton_outside_the_supported_range_is_unavailable(monkeypatch, version, inside):
    """README: triton 3.6 - 3.9; "the triton backend reports itself unavailable outside that range": why_not names
    the version and the range, the backend leaves available_backends(), and forcing it raises with the reason."""
    from embedloss_kernels import dispatch
    from embedloss_kernels.backends import triton as triton_backend

    if triton_backend.triton is None:
        pytest.skip(f"triton is not importable: {triton_backend._IMPORT_ERROR}")
    monkeypatch.setattr(triton_backend.triton, "__version__", "3.6.0")  # the installed version does not matter
    if dispatch.why_not("triton", DEVICE) is not None:
        pytest.skip(f"triton cannot run on {DEVICE}: {dispatch.why_not('triton', DEVICE)}")
    monkeypatch.setattr(triton_backend.triton, "__version__", version)
    reason = dispatch.why_not("triton", DEVICE)
    if inside:
        assert reason is None and "triton" in ek.available_backends(DEVICE)
        return
    assert reason == f"triton {version} is outside the supported 3.6-3.9", reason
    assert "triton" not in ek.available_backends(DEVICE)
    q, p = seeded_columns(0, 2, 3, 4)
    with pytest.raises(ek.BackendUnavailableError, match=f"triton {version} is outside the supported 3.6-3.9"):
        functional.multiple_negatives_ranking_loss(q, p, backend="triton")


# -- the C++ extension missing --------------------------------------------------------------------------------------
_NO_EXTENSION = r"""
import json, logging, sys
sys.modules["embedloss_kernels._C"] = None  # the import of the extension fails, as when its build failed
said = []
class Collect(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())
logging.getLogger("embedloss_kernels").addHandler(Collect())
import torch
import embedloss_kernels as ek
from embedloss_kernels import dispatch, functional
gen = torch.Generator().manual_seed(0)
q, p = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(2))
losses = [functional.multiple_negatives_ranking_loss(q, p).item() for _ in range(3)]
losses.append(ek.MultipleNegativesRankingLoss(None).compute_loss_from_embeddings([q, p], None).item())
torch_loss = functional.multiple_negatives_ranking_loss(q, p, backend="torch").item()
print(json.dumps(dict(said=said, backend=dispatch.current_backend("cpu"), available=ek.available_backends("cpu"),
                      losses=losses, torch_loss=torch_loss)))
"""


def test_failed_cpp_build_is_said_once_and_runs_on_torch():
    """README: "If the build fails, pip install still succeeds and the package says once, with the reason, that it
    runs on the torch backend." A fresh process where importing embedloss_kernels._C fails: four CPU losses (three
    functional, one module) log exactly one message, naming the extension and the import's error, and give the
    torch backend's loss."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("EMBEDLOSS_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", _NO_EXTENSION], capture_output=True, text=True, env=env, cwd=root,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    said = [m for m in res["said"] if "cpp backend is unavailable" in m]
    assert len(said) == 1, res["said"]
    assert "running on the torch backend" in said[0] and "embedloss_kernels._C is not built" in said[0]
    assert "import of embedloss_kernels._C halted" in said[0]  # the import's own error: the reason
    assert res["backend"] == "torch" and "cpp" not in res["available"]
    assert all(loss == res["torch_loss"] for loss in res["losses"]), res


# -- the Triton environment variables -------------------------------------------------------------------------------
class _CountingKernel:
    """A stand-in ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` records the tile config it was given."""

    def __init__(self):
        self.launched = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launched.append(meta["BM"])


@pytest.mark.parametrize("autotune", [None, "1", "0"])
def test_triton_autotune_zero_takes_the_first_config(monkeypatch, autotune):
    """README: ``EMBEDLOSS_TRITON_AUTOTUNE=0`` takes the first tile config instead of timing the candidates once per
    key. The launcher on a stand-in kernel with a stand-in timer that makes the second config the fastest, as on a
    GPU (the interpreter never tunes): tuned, every config is timed once for a key and the fastest launched (from
    the cache the second time); with 0, nothing is timed and the first is launched."""
    from embedloss_kernels.backends import triton as triton_backend

    if triton_backend.triton is None:
        pytest.skip(f"triton is not importable: {triton_backend._IMPORT_ERROR}")
    import triton.testing

    if autotune is None:
        monkeypatch.delenv("EMBEDLOSS_TRITON_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("EMBEDLOSS_TRITON_AUTOTUNE", autotune)
    monkeypatch.setattr(triton_backend, "is_interpreted", lambda: False)
    monkeypatch.setattr(triton_backend, "_TUNED", {})
    configs = [dict(BM=16), dict(BM=32), dict(BM=64)]
    timed = []

    def do_bench(fn, warmup, rep):
        fn()
        timed.append(kernel.launched.pop())
        return {16: 3.0, 32: 1.0, 64: 2.0}[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    kernel = _CountingKernel()
    for _ in range(2):
        triton_backend.launch(kernel, lambda cfg: (1,), (), {}, configs, key=("probe", 24, torch.float32, 90))
    if autotune == "0":
        assert timed == [] and kernel.launched == [16, 16]
    else:
        assert timed == [16, 32, 64] and kernel.launched == [32, 32]


def test_triton_streams_setting():
    """README: ``EMBEDLOSS_TRITON_STREAMS=2|1``: the fused strategy's streams, 2 by default on CUDA, 1 when set to
    1 (on CPU, through the interpreter, always 1); any other value is a ValueError naming the variable. (The launcher
    with two streams on a GPU: ``test_triton_two_streams_on_cuda``.)"""
    from embedloss_kernels.heuristics import triton as heuristics

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("EMBEDLOSS_TRITON_STREAMS", raising=False)
        assert heuristics.fused_streams(cuda) == 2 and heuristics.fused_streams(cpu) == 1
        for value, streams in (("1", 1), ("2", 2), (" 1 ", 1)):
            mp.setenv("EMBEDLOSS_TRITON_STREAMS", value)
            assert heuristics.fused_streams(cuda) == streams and heuristics.fused_streams(cpu) == 1
        mp.setenv("EMBEDLOSS_TRITON_STREAMS", "0")
        with pytest.raises(ValueError, match="EMBEDLOSS_TRITON_STREAMS must be 1 or 2, got '0'"):
            heuristics.fused_streams(cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="two streams need CUDA")
def test_triton_two_streams_on_cuda(monkeypatch):
    """On a GPU, the fused strategy with several row blocks: ``EMBEDLOSS_TRITON_STREAMS=2`` makes one side stream,
    1 makes none, and the numbers are the same (float64, 1e-12)."""
    from embedloss_kernels import dispatch

    if dispatch.why_not("triton", DEVICE) is not None:
        pytest.skip(dispatch.why_not("triton", DEVICE))
    monkeypatch.setenv("EMBEDLOSS_TRITON_STRATEGY", "fused")
    monkeypatch.setenv("EMBEDLOSS_TRITON_AUTOTUNE", "0")  # no timing runs: only the launcher makes streams
    made = []
    real_stream = torch.cuda.Stream
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: made.append(1) or real_stream(*a, **k))
    columns = seeded_columns(4, 3, 64, 80)
    results = {}
    for streams in ("1", "2"):
        monkeypatch.setenv("EMBEDLOSS_TRITON_STREAMS", streams)
        made.clear()
        results[streams] = loss_and_grads(lambda c: functional.multiple_negatives_ranking_loss(
            *c, backend="triton", block_rows=16), columns), len(made)
    assert results["1"][1] == 0 and results["2"][1] == 1
    (loss1, grads1), (loss2, grads2) = results["1"][0], results["2"][0]
    assert_float64_close(loss2, loss1, rtol=1e-12, what="loss")
    for g2, g1 in zip(grads2, grads1):
        assert_float64_close(g2, g1, rtol=1e-12, what="gradient")


# -- torch.compile ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capture_scalar_outputs", [False, True])
def test_tensor_scale_under_compile(backend, monkeypatch, capture_scalar_outputs):
    """README: reading a tensor scale's value is one host sync, which torch.compile cannot put in a graph: with a
    tensor scale, ``fullgraph=True`` raises dynamo's error, whether or not ``capture_scalar_outputs`` is set; without
    fullgraph (and without that flag) the call compiles with a graph break and the loss and the gradients (the
    scale's included) are eager's (float64, 1e-12)."""
    import torch._dynamo

    q, p = seeded_columns(6, 2, 5, 8)

    def step(q, p, scale):
        return functional.multiple_negatives_ranking_loss(q, p, scale=scale, backend=backend)

    def run(fn):
        leaves = [q.clone().requires_grad_(), p.clone().requires_grad_(),
                  torch.tensor(12.0, dtype=torch.float64, device=DEVICE, requires_grad=True)]
        loss = fn(*leaves)
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    monkeypatch.setattr(torch._dynamo.config, "capture_scalar_outputs", capture_scalar_outputs)
    torch._dynamo.reset()
    try:
        with pytest.raises(torch._dynamo.exc.TorchDynamoException):
            run(torch.compile(step, fullgraph=True, backend="aot_eager"))
        if capture_scalar_outputs:
            return
        torch._dynamo.reset()
        loss, grads = run(torch.compile(step, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    eager_loss, eager_grads = run(step)
    assert_float64_close(loss, eager_loss, rtol=1e-12, what="loss")
    for g, r in zip(grads, eager_grads):
        assert_float64_close(g, r, rtol=1e-12, what="gradient")


def test_no_finite_check_under_compile(backend):
    """README: "The NaN/Inf input check is skipped under torch.compile": eager, a NaN embedding is the functional
    API's ValueError; compiled (fullgraph, so a host sync would fail the compile), the same call returns a NaN
    loss and NaN gradients."""
    import torch._dynamo

    q, p = seeded_columns(7, 2, 4, 6)
    q[1, 2] = float("nan")

    def step(q, p):
        return functional.multiple_negatives_ranking_loss(q, p, backend=backend)

    with pytest.raises(ValueError, match="NaN or Inf"):
        step(q, p)
    torch._dynamo.reset()
    try:
        leaves = [q.clone().requires_grad_(), p.clone().requires_grad_()]
        loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
        loss.backward()
    finally:
        torch._dynamo.reset()
    assert loss.isnan() and leaves[0].grad.isnan().any()


# -- CachedGISTEmbedLoss: float64, with gather_across_devices -------------------------------------------------------
def _cached_gist_worker(rank, world, init_file, model_dir, guide_dir, out_dir):
    from sentence_transformers import SentenceTransformer

    from embedloss_kernels.losses import CachedGISTEmbedLoss

    with gloo_rank(rank, world, init_file):
        model = SentenceTransformer(model_dir, device="cpu").eval().double()
        guide = SentenceTransformer(guide_dir, device="cpu").eval().double()
        feats = [model.preprocess(_mixed_sentences(4, 20 + 3 * rank + c)) for c in range(3)]
        results = {}
        for name, cls, gather in (("st", st_losses.CachedGISTEmbedLoss, True), ("ours", CachedGISTEmbedLoss, True),
                                  ("ours, local", CachedGISTEmbedLoss, False)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = cls(model, guide, mini_batch_size=3, temperature=0.05, margin=0.0,
                           gather_across_devices=gather)
            results[name] = _cached_run(loss, model, feats)[:2]
        torch.save(results, f"{out_dir}/rank{rank}.pt")


def test_cached_gist_float64_with_gather_matches_sentence_transformers(tiny_model, tiny_st, tmp_path):
    """README: GIST numbers are sentence-transformers' "float64 within 1e-8 over every option, both modules,
    gather_across_devices". CachedGISTEmbedLoss in float64 with gather_across_devices on two gloo ranks (CPU on
    purpose), a guide of its own: each rank's loss and every parameter gradient within 1e-8 of
    sentence-transformers' CachedGISTEmbedLoss under the same setup (and the gathered candidates matter: each
    rank's loss is not the local-batch loss)."""
    dirs = {"model": tmp_path / "model", "guide": tmp_path / "guide"}
    tiny_model.save(str(dirs["model"]))
    tiny_st(seed=3, hidden=24).save(str(dirs["guide"]))
    spawn_gloo(_cached_gist_worker, 2, (2, str(tmp_path / "init"), str(dirs["model"]), str(dirs["guide"]),
                                        str(tmp_path)), 240)
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert_float64_close(res["ours"][0], res["st"][0], what=f"rank {rank} loss")
        assert_param_grads_close(res["ours"][1], res["st"][1])
        local, gathered = res["ours, local"][0].item(), res["ours"][0].item()
        assert abs(local - gathered) > 1e-3 * abs(gathered), (rank, local, gathered)


# -- the oldest-versions CI job -------------------------------------------------------------------------------------
def test_oldest_versions_job_runs_the_matryoshka_and_gist_triton_tests():
    """README: the oldest-versions job (.ci/oldest_versions.sh) runs the Triton interpreter tests, the Matryoshka and
    GIST ops' included: its -k selection of test_matryoshka.py and test_gist.py matches Triton cases of both files
    (evaluated with pytest's own -k matcher on their test functions, named as their triton cases are)."""
    import ast
    import re
    from pathlib import Path

    from _pytest.mark.expression import Expression

    root = Path(__file__).resolve().parent.parent
    script = (root / ".ci" / "oldest_versions.sh").read_text()
    files = re.search(r'^MG_TESTS=\((.*)\)$', script, re.M).group(1)
    selection = "".join(re.findall(r'^MG_SELECTION\+?="(.*)"$', script, re.M))
    assert re.search(r'pytest "\$\{MG_TESTS\[@\]\}" -k "\$MG_SELECTION"', script)
    expr = Expression.compile(selection)
    every_test = []
    for name in ("test_matryoshka.py", "test_gist.py"):
        assert f"tests/{name}" in files
        tree = ast.parse((root / "tests" / name).read_text())
        tests = [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]
        selected = [t for t in tests if expr.evaluate(lambda word, t=t, **_: word in t or word == "triton")]
        assert selected, f"{name}: the selection {selection!r} matches none of its tests"
        every_test += tests
    for word in re.findall(r"test_\w+", selection):  # a renamed test would silently leave the job
        assert any(word in t for t in every_test), f"{word!r} of the selection names no test"
        assert not expr.evaluate(lambda word, **_: word in "test_something_else[torch]"), "not Triton's only"
