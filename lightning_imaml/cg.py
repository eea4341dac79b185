"""Truncated conjugate gradient for A x = b, A symmetric, given only x -> A x; T systems at once.

Pure torch. The engine solves one system per task of a batch: ``b`` is ``[T, N]`` and every scalar of the
recurrence (step sizes, residual norms, stopping flags) is ``[T]``, so each task keeps its own CG while every
update is one kernel over the batch. :func:`conjugate_gradient` solves a single system whose unknown is a
tensor of any shape or a dict name -> Tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .params import ParamSpec, check_same_structure, rowdot, select_rows

__all__ = ["CG", "CGInfo", "batched_conjugate_gradient", "conjugate_gradient", "default_curvature_eps"]


class CGInfo(NamedTuple):
    """What conjugate gradient did, per system (``[T]`` tensors; 0-d from :func:`conjugate_gradient`).

    steps: CG updates of x taken (int64; matvecs spent = steps, +1 if stopped on curvature, +1 if x0 given).
    residual_norm: ||b - A x|| at the last iterate, as tracked by the recurrence (after the first-step
        negative-curvature fallback x = x0 + r0 it is ||r0||, the residual of x0).
    negative_curvature: stopped because some direction had p^T A p <= eps ||p||^2.
    converged: ||b - A x|| <= rtol * ||b|| at exit.
    """

    steps: Tensor
    residual_norm: Tensor
    negative_curvature: Tensor
    converged: Tensor


def _check(max_steps: int, rtol: float, name: str = "max_steps") -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"{name} must be an integer >= 1, got {name}={max_steps!r}; CG needs at least one step"
        )
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")


def default_curvature_eps(dtype: torch.dtype) -> float:
    """sqrt(machine eps) of float32, or of ``dtype`` where that is coarser (float16, bfloat16)."""
    return math.sqrt(max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps))


def batched_conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    max_steps: int,
    rtol: float = 1e-10,
    x0: Tensor | None = None,
    curvature_eps: float | None = None,
) -> tuple[Tensor, CGInfo]:
    """T independent systems A_t x_t = b_t: ``b`` and x ``[T, N]``, ``matvec`` maps ``[T, N]`` to ``[T, N]``
    row by row. Each row minimises q(x) = 1/2 x^T A x - b^T x over its Krylov space K_k(A, b - A x0),
    k <= max_steps.

    - From x0 = None it starts at x = 0 with r = b, spending no matvec on b - A x0 (one if x0 is given).
    - A row stops when ||r|| <= rtol ||b|| (``converged``); the loop ends when every row has stopped or
      after ``max_steps`` updates (finished rows are left as they are while the others go on).
    - Truncation (Steihaug): a row whose search direction has p^T A p <= curvature_eps ||p||^2 (negative or
      vanishing curvature, or a non-finite matvec) stops with its last iterate, ``negative_curvature=True``.
      On the very first direction there is no iterate yet; rather than x0 (= 0, a useless meta-gradient) the
      row returns x0 + r0 (= b from zero): the solution with A replaced by I. For iMAML that is the
      first-order meta-gradient, for a Newton system (H + lam I) d = -g steepest descent.
    - ``curvature_eps`` defaults to sqrt(machine eps) of float32 or of b's dtype if coarser (3.45e-4 in
      float32 and float64): below that a Rayleigh quotient of an O(1)-scaled A such as I + H/lam is rounding
      noise in float32, and float64 judges the same way, so a float64 run checks a float32 one (with
      float64's own 1.5e-8, a task whose I + H/lam had a quotient of 2.7e-4 returned x 500 times longer).
    Output never contains NaN/inf unless b or x0 did.
    """
    _check(max_steps, rtol)
    if not b.is_floating_point():
        raise ValueError(f"CG needs floating-point tensors, but b is {b.dtype}; cast it, e.g. b.double()")
    if b.dim() != 2:
        raise ValueError(f"b must be [T, N] (one system per row), got shape {tuple(b.shape)}")
    eps = default_curvature_eps(b.dtype) if curvature_eps is None else curvature_eps
    if x0 is None:
        x, r = torch.zeros_like(b), b
    else:
        check_same_structure(b, x0, ("b", "x0"))
        x, r = x0, b - matvec(x0)
    rs = rowdot(r, r)
    r_norm = rs.sqrt()
    tol = rtol * rowdot(b, b).sqrt()
    # per row: still iterating (a NaN b stays active, so the NaN reaches x and the caller's guards)
    active = ~((r_norm <= tol) | (r_norm == 0))
    negative = torch.zeros_like(active)
    steps = torch.zeros_like(r_norm, dtype=torch.int64)
    p = r
    for k in range(max_steps):
        if not bool(active.any()):
            break
        Ap = matvec(p)
        pAp = rowdot(p, Ap)
        bad = active & ~(torch.isfinite(pAp) & (pAp > eps * rowdot(p, p)))
        negative = negative | bad
        if k == 0:  # truncated before any step: x0 + r0, i.e. A taken as I (see docstring)
            x = select_rows(bad, x + r, x)
        active = active & ~bad
        alpha = torch.where(active, rs / torch.where(active, pAp, 1.0), 0.0)
        x = torch.addcmul(x, alpha[:, None], p)  # rows that stopped have alpha 0
        r = select_rows(active, torch.addcmul(r, -alpha[:, None], Ap), r)
        steps = steps + active.to(steps.dtype)
        rs_new = torch.where(active, rowdot(r, r), rs)
        r_norm = torch.where(active, rs_new.sqrt(), r_norm)
        active = active & (r_norm > tol)
        beta = torch.where(active, rs_new / rs, 0.0)
        p = select_rows(active, torch.addcmul(r, beta[:, None], p), p)  # p <- r + beta p
        rs = rs_new
    return x, CGInfo(steps, r_norm, negative, r_norm <= tol)


def conjugate_gradient(
    matvec: Callable,
    b: Tensor | Mapping[str, Tensor],
    max_steps: int,
    rtol: float = 1e-10,
    x0: Tensor | Mapping[str, Tensor] | None = None,
    curvature_eps: float | None = None,
):
    """One system A x = b where x, b are a tensor (any shape) or a dict name -> Tensor and ``matvec`` maps
    that structure to itself: :func:`batched_conjugate_gradient` with T = 1. Returns ``(x, CGInfo)`` with
    0-d fields."""
    _check(max_steps, rtol)
    single = isinstance(b, Tensor)
    items = {"b": b} if single else dict(b)
    for name, leaf in items.items():
        if not leaf.is_floating_point():
            raise ValueError(
                f"CG needs floating-point tensors, but {name} is {leaf.dtype}; cast it, e.g. b.double()"
            )
    spec = ParamSpec.of(items)

    def to_row(t):
        return spec.flatten({"b": t} if single else t).unsqueeze(0)

    def from_row(row):
        out = spec.unflatten(row[0])
        return out["b"] if single else out

    if x0 is not None:
        check_same_structure(b, x0, ("b", "x0"))
    x, info = batched_conjugate_gradient(
        lambda v: to_row(matvec(from_row(v))), to_row(b), max_steps, rtol,
        None if x0 is None else to_row(x0), curvature_eps,
    )  # fmt: skip
    return from_row(x), CGInfo(*(f[0] for f in info))


@dataclass(frozen=True)
class CG:
    """Conjugate gradient with its options bound: ``CG(steps=5)(matvec, b) -> (x, CGInfo)`` on ``[T, N]``."""

    steps: int = 5
    rtol: float = 1e-10
    curvature_eps: float | None = None  # None: default_curvature_eps of b's dtype

    def __post_init__(self):
        _check(self.steps, self.rtol, "steps")

    def __call__(self, matvec: Callable[[Tensor], Tensor], b: Tensor) -> tuple[Tensor, CGInfo]:
        return batched_conjugate_gradient(matvec, b, self.steps, self.rtol, curvature_eps=self.curvature_eps)
