"""The ring schedule of ``gather_across_devices`` (Inf-CL style): no rank ever holds the world's columns.

Rank ``l`` owns ``B_l`` rows of ``C = 1 + K`` columns (queries ``Q_l``, docs ``A_l = [P_l; N1_l; ...]``). Each rank
normalizes (cosine) its columns once into one transfer block laid out ``[Q (B_max rows); A (K * B_max rows)]``, the
queries at rows ``0 .. B_l - 1`` and ``A_l`` contiguous from row ``B_max`` (so both are views, whatever the rank's
size); padding rows travel but are never scored. Blocks move around the ring ``l -> l + 1``; the next block's
send/receive (one ``batch_isend_irecv`` pair, so the same code runs on gloo and NCCL) is posted before the current
block is computed on, so communication can overlap compute (not measured yet: only gloo on one CPU host has
run).

Pass 1 (forward): for the local anchor rows against each visiting block, the logits of every selected direction come
from the torch backend's block primitive :func:`~embedloss_kernels.backends.torch.infonce.direction_logits` (the
same maths as the fused op; the rank's own block carries the masks, the positives and the "own" columns of the
hardness modes, a foreign block none of them), folded into running per-row max / sum-exp (one per row in ``joint``
mode, one per direction in ``per_direction`` mode).
Saved for backward: the local normalized block, its norms and the per-row log-sum-exps, ``O(B_l)`` (for 16-bit
inputs also the raw 16-bit block, which is what travels).

Pass 2 (autograd backward, so each rank's ``grad_output`` scales its own contributions): the blocks go round again,
each rank recomputing its logits with the visiting block, ``G = (softmax - onehot) * s / B_l * grad_output`` per
direction (the hardness penalty is stop-gradient), adding ``G . block`` to its row gradients and ``G^T . rows`` to a
gradient accumulator of the block's columns. Accumulators follow their block one rank behind: rank ``l`` computes its
share into a fresh buffer while the partial sum from ``l - 1`` is in flight, adds it, and sends the sum to ``l + 1``;
after a full circle the sum reaches its owner (one extra hop), which adds its row gradients and maps them through the
cosine normalization backward.

Blocks travel in the input dtype: float32 / float64 blocks normalized by their owner; 16-bit blocks raw, each rank
upcasting and normalizing a visiting block as the fused op does with gathered columns. Gradient accumulators travel
in the working precision (float32 for 16-bit inputs). Per rank and step, with blocks of ``C * B_max * D`` elements,
``s`` bytes per input element and ``s'`` per working one: forward ``(W - 1)`` block hops, backward ``(W - 1)`` block
hops and ``W`` accumulator hops, ``(2W - 2) s + W s'`` per block element in all (the gather schedule:
``(2W - 2) s``). Column memory is a few blocks (own, in flight, accumulators) instead of ``2 W`` of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends.common import normalize_rows, normalize_rows_backward, work_dtype
from ..backends.torch.infonce import accumulate_block_grads, direction_logits
from ..core.contract import DIRECTION_BITS, HARDNESS_CODES, HARDNESS_NONE
from ..core.validate import scale_value
from ..heuristics.blocks import budget_rows

_TAG_COLUMNS, _TAG_GRADS = 11, 12  # gloo matches messages on (peer, tag); NCCL on issue order, the same everywhere
_HAS_GROUP_PEER = "group_peer" in inspect.signature(dist.P2POp.__init__).parameters


@dataclass(frozen=True)
class _Ring:
    sizes: tuple[int, ...]
    rank: int
    group: object
    scale: float
    cosine: bool
    directions: int
    joint: bool
    hardness_mode: int
    alpha: float
    block_rows: int

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def n_blocks(self) -> int:
        return bin(self.directions).count("1")

    def rows_per_chunk(self, docs: int, elem: int) -> int:
        """Anchor rows per chunk: ``block_rows``, or as many as the block budget allows against one visiting block."""
        if self.block_rows > 0:
            return self.block_rows
        bmax = max(self.sizes)
        use_dd = bool(self.directions & DIRECTION_BITS["doc_to_doc"])
        narrow = bin(self.directions & (DIRECTION_BITS["query_to_query"] | DIRECTION_BITS["doc_to_query"])).count("1")
        return budget_rows(docs * bmax * (1 + use_dd) + bmax * narrow, elem, 4)  # as the torch backend's infonce


def _views(buf: Tensor, rows: int, bmax: int, docs: int) -> tuple[Tensor, Tensor]:
    """The queries (rows, D) and the docs (docs * rows, D) of a transfer block, as views."""
    return buf[:rows], buf[bmax : bmax + docs * rows]


def _working(buf: Tensor, rows: int, bmax: int, docs: int, cosine: bool, wd: torch.dtype, *, owner: bool,
             scratch: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A transfer block as the maths takes it, and (``owner``, cosine) the norms of its rows.

    A block in the working precision travels normalized: its owner normalizes it here, in place, once; the other
    ranks use it as it comes. A 16-bit block travels as the raw input (half the bytes): every rank upcasts it (into
    ``scratch`` when given) and normalizes it, which is exactly what the fused op does with gathered columns.
    """
    if buf.dtype == wd and not owner:
        return buf, None, None
    work = buf if buf.dtype == wd else (buf.to(wd) if scratch is None else scratch.copy_(buf))
    if not cosine:
        return work, work.new_empty(0), work.new_empty(0)
    norms = []
    for view in _views(work, rows, bmax, docs):
        normalized, norm = normalize_rows(view)
        view.copy_(normalized)
        norms.append(norm)
    return work, norms[0], norms[1]


def _shift(send: Tensor, recv: Tensor, ring: _Ring, tag: int) -> list:
    """Post ``send -> rank + 1`` and ``recv <- rank - 1`` together; returns the requests to wait on."""
    nxt, prv = (ring.rank + 1) % ring.world, (ring.rank - 1) % ring.world
    if _HAS_GROUP_PEER:
        ops = [dist.P2POp(dist.isend, send, group=ring.group, tag=tag, group_peer=nxt),
               dist.P2POp(dist.irecv, recv, group=ring.group, tag=tag, group_peer=prv)]
    else:  # older torch: peers are global ranks
        glob = (lambda r: r) if ring.group is None else (lambda r: dist.get_global_rank(ring.group, r))
        ops = [dist.P2POp(dist.isend, send, glob(nxt), ring.group, tag),
               dist.P2POp(dist.irecv, recv, glob(prv), ring.group, tag)]
    return dist.batch_isend_irecv(ops)


def _wait(reqs: list) -> None:
    for req in reqs:
        req.wait()


def _visiting_blocks(ring: _Ring, own: Tensor, send_own: Tensor | None, docs: int, wd: torch.dtype):
    """One circle of the ring: yields ``(t, rows, block)`` for the block of rank ``rank - t`` (``t = 0``: this rank's
    own, in the working precision), as the maths takes it. The next block's transfer is posted before each yield and
    waited on after the caller's step, so it overlaps that step; two receive buffers alternate."""
    bmax, world = max(ring.sizes), ring.world
    cur = own if send_own is None else send_own
    bufs: list[Tensor] = []
    scratch = None  # the working copy of a visiting 16-bit block
    for t in range(world):
        rows = ring.sizes[(ring.rank - t) % world]
        reqs = []
        if t < world - 1:
            if len(bufs) < 2:
                bufs.append(torch.empty_like(cur))
            nxt = bufs[t % 2]
            reqs = _shift(cur, nxt, ring, _TAG_COLUMNS)
        work = own
        if t > 0:
            work = scratch = _working(cur, rows, bmax, docs, ring.cosine, wd, owner=False, scratch=scratch)[0]
        yield t, rows, work
        _wait(reqs)
        if t < world - 1:
            cur = nxt


class _RingInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ring: _Ring, scale: Tensor | None, *columns: Tensor) -> Tensor:
        b, d = columns[0].shape
        docs = len(columns) - 1
        bmax = max(ring.sizes)
        wd = work_dtype(columns[0].dtype)
        send_own = columns[0].new_zeros((1 + docs) * bmax, d)
        q_send, a_send = _views(send_own, b, bmax, docs)
        q_send.copy_(columns[0])
        torch.cat(list(columns[1:]), dim=0, out=a_send)
        own, q_norm, a_norm = _working(send_own, b, bmax, docs, ring.cosine, wd, owner=True)
        if own is send_own:
            send_own = None  # the working block is what travels
        q_own, a_own = _views(own, b, bmax, docs)
        p_own = a_own[:b]
        need_p = bool(ring.directions & (DIRECTION_BITS["doc_to_query"] | DIRECTION_BITS["doc_to_doc"]))
        chunk = ring.rows_per_chunk(docs, torch.finfo(wd).bits // 8)

        # running statistics: one (max, sum-exp) per row (joint) or per row and direction (per_direction)
        n_stats = 1 if ring.joint else ring.n_blocks
        row_max = own.new_full((n_stats, b), float("-inf"))
        row_sum = own.new_zeros((n_stats, b))
        positive = own.new_empty(b)
        for t, rows, work in _visiting_blocks(ring, own, send_own, docs, wd):
            q_cols, a_cols = _views(work, rows, bmax, docs)
            for i0 in range(0, b, chunk):
                i1 = min(i0 + chunk, b)
                logits, pos = direction_logits(
                    q_own[i0:i1], p_own[i0:i1] if need_p else None, q_cols, a_cols, ring.scale, ring.directions,
                    ring.hardness_mode, ring.alpha, i0 if t == 0 else None,
                )
                if pos is not None:
                    positive[i0:i1] = pos
                blocks = list(logits.values())
                if ring.joint:
                    maxes = torch.stack([blk.amax(dim=1) for blk in blocks]).amax(0, keepdim=True)
                else:
                    maxes = torch.stack([blk.amax(dim=1) for blk in blocks])
                new_max = torch.maximum(row_max[:, i0:i1], maxes)
                row_sum[:, i0:i1].mul_((row_max[:, i0:i1] - new_max).exp_())
                for k, blk in enumerate(blocks):
                    s = 0 if ring.joint else k
                    row_sum[s, i0:i1] += blk.sub_(new_max[s, :, None]).exp_().sum(1)
                row_max[:, i0:i1] = new_max
                del logits, blocks
        lse = row_max + row_sum.log()  # (n_stats, b)
        loss = ((lse.mean(0) - positive).sum() / b).to(wd)
        ctx.ring, ctx.dims = ring, (b, d, docs)
        ctx.in_dtype = columns[0].dtype
        ctx.scale_like = None if scale is None else (scale.dtype, scale.shape)
        ctx.save_for_backward(own, send_own, q_norm, a_norm, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "embedloss_kernels losses do not support double backward (create_graph=True): the ring schedule "
                "computes its gradient in a second pass. Use embedloss_kernels.reference for higher-order derivatives."
            )
        ring: _Ring = ctx.ring
        b, d, docs = ctx.dims
        own, send_own, q_norm, a_norm, lse = ctx.saved_tensors
        bmax, world = max(ring.sizes), ring.world
        q_own, a_own = _views(own, b, bmax, docs)
        p_own = a_own[:b]
        need_p = bool(ring.directions & (DIRECTION_BITS["doc_to_query"] | DIRECTION_BITS["doc_to_doc"]))
        chunk = ring.rows_per_chunk(docs, torch.finfo(own.dtype).bits // 8)
        g_out = grad_loss.to(own.dtype)
        weight = g_out * (ring.scale / b / (1 if ring.joint else ring.n_blocks))
        onehot = g_out * (ring.scale / b)

        dq_rows = torch.zeros_like(q_own)
        da_rows = torch.zeros_like(a_own)  # the anchors' positives are its first b rows
        # d loss / d scale: sum <v, dv> over every vector this rank's logits touched (its rows, and each visiting
        # block's columns with this rank's share of their gradient) is 2 s grad_output dL/ds (core/contract.py)
        want_scale = ctx.scale_like is not None and ctx.needs_input_grad[1]
        radial = own.new_zeros(())
        accs: list[Tensor] = []
        acc_in = torch.empty_like(own) if world > 1 else None
        acc_reqs: list = []
        for t, rows, work in _visiting_blocks(ring, own, send_own, docs, own.dtype):
            if len(accs) < 2:
                accs.append(torch.zeros_like(own))
            acc = accs[t % 2]  # its send (two steps ago) was waited on at the end of the last step
            if t >= 2:
                acc.zero_()
            q_cols, a_cols = _views(work, rows, bmax, docs)
            dq_cols, da_cols = _views(acc, rows, bmax, docs)
            for i0 in range(0, b, chunk):
                i1 = min(i0 + chunk, b)
                p_rows = p_own[i0:i1] if need_p else None
                logits, _ = direction_logits(
                    q_own[i0:i1], p_rows, q_cols, a_cols, ring.scale, ring.directions, ring.hardness_mode,
                    ring.alpha, i0 if t == 0 else None,
                )
                for k, blk in enumerate(logits.values()):
                    blk.sub_(lse[0 if ring.joint else k, i0:i1, None]).exp_().mul_(weight)
                if t == 0:
                    ar = torch.arange(i1 - i0, device=own.device)
                    logits["qd"][ar, ar + i0] -= onehot
                accumulate_block_grads(logits, q_own[i0:i1], p_rows, q_cols, a_cols, dq_rows[i0:i1],
                                                 da_rows[i0:i1], dq_cols, da_cols)
                del logits
            if want_scale:  # this rank's share only: the partial sum from rank - 1 is added below
                radial += torch.vdot(work.reshape(-1), acc.reshape(-1))
            if world > 1:
                if t > 0:
                    _wait(acc_reqs)
                    acc += acc_in
                acc_reqs = _shift(acc, acc_in, ring, _TAG_GRADS)
        if world > 1:
            _wait(acc_reqs)  # acc_in: every rank's contributions to this rank's columns
            total = acc_in
        else:
            total = accs[0]
        d_scale = None
        if want_scale:
            radial += torch.vdot(q_own.reshape(-1), dq_rows.reshape(-1))
            radial += torch.vdot(a_own.reshape(-1), da_rows.reshape(-1))
            dtype, shape = ctx.scale_like
            d_scale = (radial / (2.0 * ring.scale)).to(dtype).reshape(shape)
        dq_cols, da_cols = _views(total, b, bmax, docs)
        dq = dq_rows.add_(dq_cols)
        da = da_rows.add_(da_cols)
        if ring.cosine:
            dq = normalize_rows_backward(q_own, q_norm, dq)
            da = normalize_rows_backward(a_own, a_norm, da)
        grads = [dq, *da.view(docs, b, d).unbind(0)]
        return None, d_scale, *(g.to(ctx.in_dtype) for g in grads)


def infonce_ring(
    columns: Sequence[Tensor],
    sizes: Sequence[int],
    group=None,
    *,
    scale: float | Tensor,
    cosine: bool,
    directions: Sequence[str],
    partition_mode: str,
    hardness_mode: str | None,
    hardness_strength: float,
    block_rows: int = 0,
) -> Tensor:
    """MNRL of this rank's rows against every rank's columns by the ring schedule (cosine or dot similarity).

    ``columns``: this rank's (queries, positives, negatives...), each (B_l, D), already validated; ``sizes``: every
    rank's B (from :func:`embedloss_kernels.distributed.collectives.gather_metadata`). Returns the mean loss over this
    rank's rows (float32; float64 for float64 inputs); its backward is a second pass round the ring, so every rank must
    call it.
    """
    bits = 0
    for name in directions:
        bits |= DIRECTION_BITS[name]
    hardness = HARDNESS_CODES[hardness_mode] if hardness_strength > 0 else HARDNESS_NONE
    ring = _Ring(
        sizes=tuple(int(s) for s in sizes), rank=dist.get_rank(group), group=group, scale=scale_value(scale),
        cosine=bool(cosine), directions=bits, joint=partition_mode == "joint", hardness_mode=hardness,
        alpha=float(hardness_strength) if hardness != HARDNESS_NONE else 0.0, block_rows=int(block_rows),
    )
    return _RingInfoNCE.apply(ring, scale if isinstance(scale, Tensor) else None, *columns)
