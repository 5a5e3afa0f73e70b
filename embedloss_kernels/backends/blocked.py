"""Row-block gradient products on the GPU, shared by the ``torch`` and ``triton`` backends (DESIGN.md, "Precision").

The inputs are never copied whole: cosine normalization is two vectors of inverse norms ``rx``, ``ry`` (applied to
the logits, and folded into ``G~ = G * rx_i * ry_c``); ``G~`` is stored in the input dtype, so every product runs
on tensor cores (16-bit, or tf32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it for fp32 inputs;
float64 stays float64) with fp32 accumulation. With raw inputs ``X``, ``Y``::

    G~ Y   = dX^ / |x|      (row side)        G~^T X = dY^ / |y|      (column side)

``dX^`` being d loss / d x-hat; the normalization backward then needs no other division:
``dx = v - x^ <x^, v>`` with ``v = dX^ / |x|`` (``v`` itself for dot products).

Accumulators: the column side of every block adds into a float32 ``(N, D)`` buffer (``addmm`` with an fp32 output);
with query_to_doc alone, a row block's ``dQ`` is complete after its one product and is written straight into the
16-bit gradient; other directions also add into the query side, which then gets a float32 ``(Bq, D)`` buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.contract import EPS, QUERY_TO_DOC

HALF = (torch.float16, torch.bfloat16)
FORCE_ON_CPU = False  # tests switch the blocked path on for CPU tensors (its products then run in fp32 / fp64)
FINISH_ELEMS = 1 << 24  # rows at a time when the accumulators are turned into gradients (64 MiB of fp32)


def use_blocked(x: Tensor) -> bool:
    """The blocked path runs on CUDA tensors (and on CPU when tests ask for it)."""
    return x.device.type == "cuda" or FORCE_ON_CPU


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _has_out_dtype(x: Tensor) -> bool:
    # aten::mm.dtype / addmm.dtype (torch >= 2.9) run on CUDA only; elsewhere the products upcast their operands,
    # which is the same arithmetic (16-bit operands, fp32 sums).
    return x.is_cuda and hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


def mm_acc(x: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """``x @ y`` in the accumulator precision: 16-bit operands give an fp32 result from the tensor cores."""
    acc = acc_dtype(x.dtype)
    if x.dtype == acc:
        return torch.mm(x, y, out=out)
    if _has_out_dtype(x):
        return torch.mm(x, y, out_dtype=acc, out=out) if out is not None else torch.mm(x, y, out_dtype=acc)
    return torch.mm(x.to(acc), y.to(acc), out=out)


_INPLACE_OK: dict = {}


def _inplace_addmm_ok(device: torch.device) -> bool:
    """``torch.addmm(acc, a, b, out_dtype=fp32, out=acc)`` checked once per device on a small product (an aliasing
    output is what ``addmm_`` does, but the out_dtype overload is newer: verify before relying on it)."""
    key = str(device)
    if key not in _INPLACE_OK:
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            a = torch.randn(96, 80, generator=gen).to(device, torch.bfloat16)
            b = torch.randn(80, 72, generator=gen).to(device, torch.bfloat16)
            acc = torch.randn(96, 72, generator=gen).to(device)
            want = acc + 0.5 * (a.float() @ b.float())
            torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=0.5, out=acc)
            _INPLACE_OK[key] = bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
        except (RuntimeError, TypeError, NotImplementedError):
            _INPLACE_OK[key] = False
    return _INPLACE_OK[key]


def addmm_acc_(acc: Tensor, x: Tensor, y: Tensor, alpha: float) -> None:
    """``acc += alpha * x @ y`` with ``acc`` float32 (float64) and ``x``, ``y`` in the input dtype."""
    if x.dtype == acc.dtype:
        acc.addmm_(x, y, alpha=alpha)
    elif _has_out_dtype(x) and _inplace_addmm_ok(x.device):
        torch.addmm(acc, x, y, out_dtype=acc.dtype, alpha=alpha, out=acc)
    elif x.is_cuda:  # no fp32-output product: a 16-bit block product, then an fp32 add
        acc.add_(torch.mm(x, y), alpha=alpha)
    else:
        acc.addmm_(x.to(acc.dtype), y.to(acc.dtype), alpha=alpha)


def _row_chunks(x: Tensor):
    step = max(1, FINISH_ELEMS // max(x.shape[1], 1))
    for r0 in range(0, x.shape[0], step):
        yield r0, min(r0 + step, x.shape[0])


def radial_sum(x: Tensor, v: Tensor) -> Tensor:
    """``sum_i <x_i, v_i>`` in ``v``'s dtype, a few rows at a time (no full-size upcast copy of ``x``)."""
    total = torch.zeros((), dtype=v.dtype, device=v.device)
    for r0, r1 in _row_chunks(x):
        total += torch.vdot(x[r0:r1].to(v.dtype).reshape(-1), v[r0:r1].reshape(-1))
    return total


def inv_norms(x: Tensor, cosine: bool) -> Tensor:
    """``1 / max(||x_i||, EPS)`` per row in the accumulator dtype (ones for dot products), a few rows at a time
    so that no full-size upcast copy of ``x`` exists."""
    acc = acc_dtype(x.dtype)
    if not cosine:
        return torch.ones(x.shape[0], dtype=acc, device=x.device)
    out = torch.empty(x.shape[0], dtype=acc, device=x.device)
    for r0, r1 in _row_chunks(x):
        torch.linalg.vector_norm(x[r0:r1], dim=1, dtype=acc, out=out[r0:r1])
    return out.clamp_min_(EPS).reciprocal_()


def shorten_long_rows(q: Tensor, a: Tensor, rq: Tensor, ra: Tensor, cosine: bool):
    """Cosine on raw rows multiplies by the inverse norms after the products, so rows so long that a raw product
    could overflow the accumulator (``|q| |a|`` near its max: 1e19 in fp32, bf16 values near 1e30) are divided by
    their norm first, as ``F.normalize`` (sentence-transformers) does; a norm that itself overflows gives zeros,
    as there. Returns ``(q, a, rq, ra, cq, ca)``: the rows the kernels read, their inverse norms, and the factors
    (``None`` when nothing was divided) that the final gradients are divided by (``d/dx = d/du / c``). One host
    sync (the largest norm) per cosine call; the copies exist only when rows are that long."""
    if not cosine:
        return q, a, rq, ra, None, None
    limit = (torch.finfo(acc_dtype(q.dtype)).max / 16) ** 0.5
    if float(torch.minimum(rq.min(), ra.min())) * limit >= 1.0:  # every norm <= limit: no raw product overflows
        return q, a, rq, ra, None, None
    # rows longer than 1 become unit rows; the others (rows clamped at EPS included) are left as they are
    cq, ca = rq.reciprocal().clamp_min_(1.0), ra.reciprocal().clamp_min_(1.0)
    q = (q.to(cq.dtype) / cq[:, None]).to(q.dtype)
    a = (a.to(ca.dtype) / ca[:, None]).to(a.dtype)
    return q, a, inv_norms(q, cosine), inv_norms(a, cosine), cq, ca


def unshorten(grad: Tensor, c: Tensor | None) -> Tensor:
    """The gradient of the original rows from that of the rows :func:`shorten_long_rows` divided by ``c``."""
    return grad if c is None else (grad.to(c.dtype) / c[:, None]).to(grad.dtype)


def finish_grad(x: Tensor, rx: Tensor, v: Tensor, cosine: bool, out: Tensor) -> Tensor:
    """``out = v - x^ <x^, v>`` (``x^ = x * rx``; ``v`` itself for dot products or rows clamped at EPS), in
    ``out``'s dtype, a few rows at a time."""
    for r0, r1 in _row_chunks(x):
        vr = v[r0:r1]
        if cosine:
            # x / max(|x|, EPS), divided as F.normalize does: x * rx rounds twice, and a row whose gradient is
            # exactly zero (D=1, or v parallel to x) would keep a round-off residue of v's size.
            xr = x[r0:r1].to(v.dtype)
            xh = xr / torch.linalg.vector_norm(xr, dim=1, keepdim=True).clamp_min_(EPS)
            clamped = rx[r0:r1, None] >= (1 - 1e-6) / EPS  # norm <= EPS (rx rounded in fp32)
            radial = (xh * vr).sum(1, keepdim=True).masked_fill_(clamped, 0.0)
            vr = vr - xh * radial
        out[r0:r1] = vr
    return out


class BlockGrads:
    """Gradient products of the row blocks of one call, in "v" units (``dX^ / |x|``), and the final gradients.

    ``add(name, r0, r1, g)``: ``g`` (rows ``r0 .. r1 - 1`` global, all columns of direction ``name``) holds
    ``G~ = (softmax - onehot) * rx * ry`` (per-direction weights included, ``scale / row_count`` not: it is the
    products' ``alpha``, which keeps 16-bit ``G~`` entries near 1 instead of underflowing fp16).
    """

    def __init__(self, q: Tensor, a: Tensor, rq: Tensor, ra: Tensor, directions: int, cosine: bool, alpha: float):
        self.q, self.a, self.rq, self.ra, self.cosine, self.alpha = q, a, rq, ra, cosine, alpha
        acc = acc_dtype(q.dtype)
        self.direct_q = directions == QUERY_TO_DOC
        self.dq = torch.zeros_like(q)
        self.vq = None if self.direct_q else torch.zeros(q.shape, dtype=acc, device=q.device)
        self.va = torch.zeros(a.shape, dtype=acc, device=a.device)
        # sum <x, v> over every row of q and a: <x, dX^ / |x|> = <x^, dX^>, what d loss / d scale is made of
        self.radial = torch.zeros((), dtype=acc, device=q.device)

    def _sides(self, name: str):
        """(row inputs, their v accumulator, column inputs, their v accumulator) of a direction block."""
        q_side, a_side = (self.q, self.vq), (self.a, self.va)
        return {"qd": (q_side, a_side), "qq": (q_side, q_side), "dq": (a_side, q_side), "dd": (a_side, a_side)}[name]

    def add(self, name: str, r0: int, r1: int, g: Tensor) -> None:
        (x, vx), (y, vy) = self._sides(name)
        if name == "qd" and self.direct_q:  # dQ of these rows is complete after this one product
            u = mm_acc(g, y)
            u.mul_(self.alpha)
            self.radial += radial_sum(x[r0:r1], u)
            finish_grad(x[r0:r1], self.rq[r0:r1], u, self.cosine, self.dq[r0:r1])
        else:
            addmm_acc_(vx[r0:r1], g, y, self.alpha)
        addmm_acc_(vy, g.T, x[r0:r1], self.alpha)

    def add_products(self, name: str, r0: int, r1: int, gy: Tensor, gtx: Tensor) -> None:
        """The same as :meth:`add` with the two products already formed (the flash kernels): ``gy = G~ Y`` for
        rows ``r0 .. r1 - 1`` and ``gtx = G~^T X`` for every column, both without ``alpha``."""
        (x, vx), (_, vy) = self._sides(name)
        if name == "qd" and self.direct_q:
            gy.mul_(self.alpha)
            self.radial += radial_sum(x[r0:r1], gy)
            finish_grad(x[r0:r1], self.rq[r0:r1], gy, self.cosine, self.dq[r0:r1])
        else:
            vx[r0:r1].add_(gy, alpha=self.alpha)
        vy.add_(gtx, alpha=self.alpha)

    def finish(self) -> tuple[Tensor, Tensor]:
        if self.vq is not None:
            self.radial += radial_sum(self.q, self.vq)
            finish_grad(self.q, self.rq, self.vq, self.cosine, self.dq)
            self.vq = None
        self.radial += radial_sum(self.a, self.va)
        da = finish_grad(self.a, self.ra, self.va, self.cosine, torch.empty_like(self.a))
        self.va = None
        return self.dq, da

    def scale_grad(self, scale: float) -> Tensor:
        """d loss / d scale after :meth:`finish`: ``sum <x^, dX^> / (2 scale)`` (core/contract.py); scale != 0."""
        return self.radial / (2.0 * scale)
