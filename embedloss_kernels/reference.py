"""Plain-PyTorch reference of every loss: readable first, differentiable by autograd, materializes B x N.

This is the oracle of every test and benchmark, and the fallback for a ``similarity_fct`` the fused ops do not
know. tests/test_reference.py holds it to sentence-transformers 6.2 itself in float64 (loss and every gradient
within 1e-8): every MNRL option (directions, partition modes, hardness modes, cosine and dot, scales, negatives, a
learnable scale), Matryoshka against ``MatryoshkaLoss``, GIST against ``GISTEmbedLoss`` (both margin strategies),
CoSENT and AnglE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .core.contract import EPS, GIST_EPS

SimilarityFn = Callable[[Tensor, Tensor], Tensor]


def cos_sim(a: Tensor, b: Tensor) -> Tensor:
    """(n, m) cosine similarities of the rows of ``a`` and ``b``."""
    return F.normalize(a, p=2, dim=-1, eps=EPS) @ F.normalize(b, p=2, dim=-1, eps=EPS).T


def dot_score(a: Tensor, b: Tensor) -> Tensor:
    """(n, m) dot products of the rows of ``a`` and ``b``."""
    return a @ b.T


def pairwise_cos_sim(a: Tensor, b: Tensor) -> Tensor:
    """(n,) cosine similarity of ``a[i]`` and ``b[i]``."""
    return (F.normalize(a, p=2, dim=-1, eps=EPS) * F.normalize(b, p=2, dim=-1, eps=EPS)).sum(-1)


def pairwise_dot_score(a: Tensor, b: Tensor) -> Tensor:
    """(n,) dot product of ``a[i]`` and ``b[i]``."""
    return (a * b).sum(-1)


def pairwise_angle_sim(a: Tensor, b: Tensor) -> Tensor:
    """(n,) AnglE similarity ``|cos + sin|`` with dims ``i`` and ``i + D/2`` paired (odd D zero-padded)."""
    if a.shape[-1] % 2:
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
    a, b = F.normalize(a, p=2, dim=-1, eps=EPS), F.normalize(b, p=2, dim=-1, eps=EPS)
    a_re, a_im = a.chunk(2, dim=-1)
    b_re, b_im = b.chunk(2, dim=-1)
    return ((a * b).sum(-1) + (a_im * b_re - a_re * b_im).sum(-1)).abs()


def infonce_reference(
    queries: Tensor,
    docs: Sequence[Tensor],
    scale: float = 20.0,
    similarity_fct: SimilarityFn = cos_sim,
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    row_start: int = 0,
    row_count: int | None = None,
) -> Tensor:
    """MNRL / InfoNCE of the contract, materialized.

    ``queries`` (Bq, D) and each of ``docs`` (Bq, D) hold the whole (world) batch; the loss averages over anchor
    rows ``row_start .. row_start + row_count - 1`` (all rows by default).
    """
    bq = queries.shape[0]
    row_count = bq - row_start if row_count is None else row_count
    rows = torch.arange(row_start, row_start + row_count, device=queries.device)
    local = torch.arange(row_count, device=queries.device)
    cands = torch.cat(list(docs), dim=0)  # (K*Bq, D)
    own_docs = torch.eye(bq, dtype=torch.bool, device=queries.device)[rows].repeat(1, len(docs))  # (R, K*Bq)

    blocks: dict[str, Tensor] = {}
    sim_qd = similarity_fct(queries[rows], cands)  # (R, K*Bq)
    blocks["query_to_doc"] = scale * sim_qd
    if hardness_mode is not None and hardness_strength > 0:
        if hardness_mode == "in_batch_negatives":
            penalized = ~own_docs
        elif hardness_mode == "hard_negatives":
            penalized = own_docs.clone()
            penalized[:, :bq] = False
        elif hardness_mode == "all_negatives":
            penalized = torch.ones_like(own_docs)
            penalized[local, rows] = False
        else:
            raise ValueError(f"unknown hardness_mode {hardness_mode!r}")
        # the penalty is zero (not alpha * sim * 0) off the penalized columns: an infinite alpha stays +-inf there
        penalty = (hardness_strength * sim_qd.detach()).masked_fill(~penalized, 0.0)
        blocks["query_to_doc"] = blocks["query_to_doc"] + penalty
    if "query_to_query" in directions:
        sim = scale * similarity_fct(queries[rows], queries)  # (R, Bq)
        blocks["query_to_query"] = sim.masked_fill(F.one_hot(rows, bq).bool(), float("-inf"))
    if "doc_to_query" in directions:
        blocks["doc_to_query"] = scale * similarity_fct(docs[0][rows], queries)  # (R, Bq)
    if "doc_to_doc" in directions:
        sim = scale * similarity_fct(docs[0][rows], cands)  # (R, K*Bq)
        blocks["doc_to_doc"] = sim.masked_fill(own_docs, float("-inf"))

    positive = blocks["query_to_doc"][local, rows]
    if partition_mode == "joint":
        log_z = torch.logsumexp(torch.cat(list(blocks.values()), dim=1), dim=1)
    elif partition_mode == "per_direction":
        log_z = torch.stack([torch.logsumexp(b, dim=1) for b in blocks.values()]).mean(0)
    else:
        raise ValueError(f"unknown partition_mode {partition_mode!r}")
    return (log_z - positive).mean()


def cosent_reference(scores: Tensor, labels: Tensor) -> Tensor:
    """CoSENT on already-scaled pair scores ``t`` (B,): ``log(1 + sum_{y_i > y_j} exp(t_j - t_i))``.

    O(B log B): sort by label; for each element, the log-sum of ``exp(-t_i)`` over strictly higher labels is a
    suffix ``logcumsumexp`` read at the end of its tie group.
    """
    labels, order = labels.reshape(-1).sort()
    scores = scores[order]
    higher_start = torch.searchsorted(labels, labels, right=True)  # first index with a strictly higher label
    suffix = torch.logcumsumexp(-scores.flip(0), dim=0).flip(0)
    suffix = torch.cat([suffix, scores.new_full((1,), float("-inf"))])
    pair_terms = scores + suffix[higher_start]  # log sum_{i: y_i > y_j} exp(t_j - t_i), per lower element j
    return torch.logsumexp(torch.cat([scores.new_zeros(1), pair_terms]), dim=0)


def cosent_pairs_reference(
    x: Tensor, y: Tensor, labels: Tensor, scale: float = 20.0, similarity_fct: SimilarityFn = pairwise_cos_sim
) -> Tensor:
    """CoSENT / AnglE loss of pairs ``(x[i], y[i])`` with float labels; scores in float32 at least."""
    scores = similarity_fct(x, y)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    labels = labels.reshape(-1)
    if labels.dtype == torch.bool:
        labels = labels.int()
    return cosent_reference(scale * scores, labels)


def shrink(x: Tensor, dim: int) -> Tensor:
    """The first ``dim`` coordinates of each row, L2-normalized (sentence-transformers' Matryoshka truncation)."""
    return F.normalize(x[..., :dim], p=2, dim=-1, eps=EPS)


def matryoshka_reference(
    queries: Tensor,
    docs: Sequence[Tensor],
    dims: Sequence[int],
    weights: Sequence[float],
    similarity_fct: SimilarityFn = cos_sim,
    **infonce_options,
) -> Tensor:
    """``sum_k weights[k] * infonce_reference`` on every column truncated to ``dims[k]`` and L2-normalized."""
    loss = 0.0
    for dim, weight in zip(dims, weights):
        loss = loss + weight * infonce_reference(
            shrink(queries, dim), [shrink(d, dim) for d in docs], similarity_fct=similarity_fct, **infonce_options
        )
    return loss


def cosine_normalize(x: Tensor) -> Tensor:
    """``x / max(||x||, 1e-8)`` with the clamp held constant for autograd: ``nn.CosineSimilarity``'s normalization
    (its gradient keeps the radial term of a row shorter than eps, unlike ``F.normalize``)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clone()
    with torch.no_grad():
        norm.clamp_min_(GIST_EPS)
    return x / norm


def gist_reference(
    anchor: Tensor,
    docs: Sequence[Tensor],
    anchor_guide: Tensor,
    docs_guide: Sequence[Tensor],
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    row_start: int = 0,
) -> Tensor:
    """GISTEmbedLoss of the contract, materialized: ``anchor`` (B, D) this rank's anchors, ``docs`` the (Bw, D)
    columns ``[positives, negatives...]`` of the world batch (anchor ``i``'s positive is row ``row_start + i``), and
    the guide's embeddings of the same rows (no gradient reaches them)."""
    b = anchor.shape[0]
    local = torch.arange(b, device=anchor.device)
    own = local + row_start
    a, ps = cosine_normalize(anchor), [cosine_normalize(d) for d in docs]

    def guide_sim(x: Tensor, y: Tensor) -> Tensor:
        # sentence-transformers' nn.CosineSimilarity on the broadcast pairs: a repeated text gives the same bits in
        # every block, so its tie with the threshold (an entry of the anchor-positive block) is kept
        return F.cosine_similarity(x[:, None], y[None], dim=-1)

    with torch.no_grad():
        ag, pgs = anchor_guide, list(docs_guide)
        guide_ap = guide_sim(ag, pgs[0])
        t = guide_ap[local, own][:, None]  # (B, 1): each row's threshold, an entry of the same matrix
        bound = t - margin if margin_strategy == "absolute" else t - t.abs() * margin

    def masked(sim: Tensor, guide_sim: Tensor, keep_positive: bool = False) -> Tensor:
        mask = guide_sim > bound
        if keep_positive:
            mask[local, own] = False
        return sim.masked_fill(mask, float("-inf"))

    with torch.no_grad():
        guide_blocks = [guide_ap, guide_sim(ag, ag), guide_sim(pgs[0][own], pgs[0])]
        guide_blocks += [guide_sim(ag, neg_g) for neg_g in pgs[1:]]
    blocks = [masked(a @ ps[0].T, guide_blocks[0], keep_positive=True)]
    if contrast_anchors:
        blocks.append(masked(a @ a.T, guide_blocks[1]))
    if contrast_positives:
        blocks.append(masked(ps[0][own] @ ps[0].T, guide_blocks[2]))
    for neg, neg_g in zip(ps[1:], guide_blocks[3:]):
        blocks.append(masked(a @ neg.T, neg_g))
    logits = torch.cat(blocks, dim=1) / temperature
    return F.cross_entropy(logits, own)


def siglip_reference(
    x: Tensor, y: Tensor, scale, bias, positive_offset: int = 0, has_positives: bool = True
) -> Tensor:
    """SigLIP's sigmoid loss of ``x`` (B, D) against ``y`` (N, D), materialized: ``z = scale * x y^T + bias``,
    labels ``+1`` at ``(i, positive_offset + i)`` when ``has_positives``, ``-1`` elsewhere, and
    ``-logsigmoid(labels * z).sum() / B`` (OpenCLIP's ``SigLipLoss._loss``). ``scale`` and ``bias``: numbers or
    tensors (autograd differentiates them)."""
    logits = scale * (x @ y.T) + bias
    labels = -torch.ones_like(logits)
    if has_positives:
        rows = torch.arange(x.shape[0], device=x.device)
        labels[rows, rows + positive_offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]
