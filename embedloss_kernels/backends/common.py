"""Pieces every backend shares: the work dtype, the cosine normalization and its backward, the scale's gradient
identity, the op's outputs without gradients, and the row-wise pair similarities of CoSENT / AnglE."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.contract import EPS, SIM_ANGLE, SIM_COSINE


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, LSE and softmax precision: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x / max(||x||, EPS)`` and the clamped norms (n, 1), as ``F.normalize``."""
    norm = x.norm(dim=1, keepdim=True).clamp_min_(EPS)
    return x / norm, norm


def normalize_rows_backward(x_hat: Tensor, norm: Tensor, grad_hat: Tensor) -> Tensor:
    """Map d/dx_hat back to d/dx: ``(g - x_hat <x_hat, g>) / ||x||``; rows clamped at EPS get ``g / EPS``."""
    radial = (x_hat * grad_hat).sum(dim=1, keepdim=True)
    radial = radial.masked_fill_(norm <= EPS, 0.0)
    return grad_hat.addcmul(x_hat, radial, value=-1.0).div_(norm)


def scale_grad_from_radial(x: Tensor, dx: Tensor, y: Tensor, dy: Tensor, scale: float) -> Tensor:
    """d loss / d scale of a loss of the logits ``s * <x_i, y_j>`` (plus stop-gradient terms), from the gradients
    ``dx``, ``dy`` with respect to the vectors that entered the products (the normalized ones under cosine, before
    the normalization's backward): every logit's ``d/ds = sim`` reaches both of its vectors as ``s * G * sim``, so
    ``sum <x, dx> + sum <y, dy> = 2 s sum(G * sim) = 2 s dL/ds``. ``scale`` must not be 0 (callers route it to the
    direct computation)."""
    radial = torch.vdot(x.reshape(-1), dx.reshape(-1)) + torch.vdot(y.reshape(-1), dy.reshape(-1))
    return radial / (2.0 * scale)


def no_grads(loss: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's outputs without gradients: three distinct empty tensors (outputs of an op must not alias)."""
    return loss, like.new_empty((0,)), like.new_empty((0,)), loss.new_empty((0,))


def _swap_halves(x: Tensor, sign_first: float) -> Tensor:
    """``[sign_first * x_im, -sign_first * x_re]``: d/dx of the AnglE sine term, up to the partner's factor."""
    re, im = x.chunk(2, dim=1)
    return torch.cat([sign_first * im, -sign_first * re], dim=1)


def pair_similarity(x: Tensor, y: Tensor, similarity: int):
    """Row-wise similarity of ``x``, ``y`` (work dtype) and a function mapping d loss / d sim back to (d x, d y).
    Row-local: callers may apply it to any slice of rows."""
    d = x.shape[1]
    if similarity == SIM_ANGLE and d % 2:
        x, y = torch.nn.functional.pad(x, (0, 1)), torch.nn.functional.pad(y, (0, 1))
    if similarity in (SIM_COSINE, SIM_ANGLE):
        x, x_norm = normalize_rows(x)
        y, y_norm = normalize_rows(y)
    if similarity == SIM_ANGLE:
        y_rot = y + _swap_halves(y, -1.0)
        z = (x * y_rot).sum(1)  # cos + sin
        sim = z.abs()
    else:
        sim = (x * y).sum(1)

    def backward(dsim: Tensor) -> tuple[Tensor, Tensor]:
        if similarity == SIM_ANGLE:
            dz = (dsim * z.sign())[:, None]
            dx, dy = dz * y_rot, dz * (x + _swap_halves(x, 1.0))
        else:
            dx, dy = dsim[:, None] * y, dsim[:, None] * x
        if similarity in (SIM_COSINE, SIM_ANGLE):
            dx = normalize_rows_backward(x, x_norm, dx)[:, :d]
            dy = normalize_rows_backward(y, y_norm, dy)[:, :d]
        return dx, dy

    return sim, backward
