"""Curvature diagnostics: the largest eigenvalue of a loss Hessian by power iteration on Hessian-vector
products (pure torch, no Lightning).

Why it matters here: fixed-step proximal GD with step lr on L(phi) + lam/2 ||phi - theta||^2 is stable
only while the top eigenvalue of the support-loss Hessian stays below 2/lr - lam (18 for lr 0.1, lam 2).
Meta-training raises it ("sharpening"), so it is the number to watch when inner solves start to fail.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .implicit import grad_and_hvp

__all__ = ["hessian_top_eigenvalue"]


def _power_iteration(hvp, params, iters, seed, shift=0.0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for k, t in params.items()}
    rq = 0.0
    for _ in range(iters):
        inv_norm = 1.0 / torch.sqrt(sum(torch.sum(t * t) for t in v.values()))
        v = {k: t * inv_norm for k, t in v.items()}
        hv = hvp(v)
        if shift:
            hv = {k: h - shift * v[k] for k, h in hv.items()}
        rq = float(sum(torch.sum(v[k] * h) for k, h in hv.items()))
        v = hv
    return rq + shift


def hessian_top_eigenvalue(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    iters: int = 20,
    seed: int = 0,
) -> float:
    """Largest (algebraic) eigenvalue of H = d^2 loss_fn / d params^2 at ``params``, by power iteration.

    ``iters`` Hessian-vector products from a seeded random start give the eigenvalue of largest magnitude
    (the Rayleigh quotient of the last iterate). If that one is negative (BatchNorm networks have strongly
    negative directions), ``iters`` more on H - lambda_neg I give the largest one. A lower bound that
    tightens with ``iters``.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    hvp = grad_and_hvp(loss_fn, params)[2]
    top = _power_iteration(hvp, params, iters, seed)
    if top < 0:
        top = _power_iteration(hvp, params, iters, seed, shift=top)
    return top
