"""Proximal inner solvers: phi*(theta) ~ argmin_phi L(phi) + lam/2 ||phi - theta||^2, starting at phi = theta.

iMAML's meta-gradient depends only on the solution phi*, not on the path (implicit function theorem), so any
optimiser may do the inner loop. Every solver here:
- takes ``support_loss(phi: dict) -> 0-d tensor`` (WITHOUT the proximal term) and ``theta`` (dict, may be
  nn.Parameters that require grad: they are detached - no graph to theta is ever built);
- builds at most one step's autograd graph at a time (memory is flat in the number of steps) and never
  touches ``.grad`` of anything but its own private copies;
- returns phi as a dict of detached tensors (requires_grad False);
- allows lam = 0 (plain fine-tuning, e.g. at test time).
Pure torch, no Lightning. Runs under an outer ``torch.no_grad()`` (it re-enables grad locally), but not on
inference-mode tensors (Lightning's default for validation: use ``Trainer(inference_mode=False)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .implicit import _RetainedGradHVP, conjugate_gradient
from .params import tree_axpy, tree_dot, tree_map

__all__ = [
    "proximal_adapt",
    "gd_adapt",
    "torch_optimizer_adapt",
    "lbfgs_adapt",
    "hessian_free_adapt",
    "proximal_objective",
    "OPTIMIZERS",
]

Params = dict[str, Tensor]
SupportLoss = Callable[[Params], Tensor]

_TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
OPTIMIZERS = ("gd", "sgd", "adam", "lbfgs", "hf")
# per-optimizer default step size when lr is None: the natural first step of L-BFGS / a Newton method is 1
_DEFAULT_LR = {"gd": 0.1, "sgd": 0.1, "adam": 0.1, "lbfgs": 1.0, "hf": 1.0}


def _validate(theta: Mapping[str, Tensor], lam: float, steps: int) -> float:
    if not isinstance(theta, Mapping) or not theta:
        raise ValueError(f"theta must be a non-empty dict name -> Tensor, got {type(theta).__name__}")
    lam = float(lam)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be >= 0 and finite (0 = no proximal term), got {lam}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return lam


def _fresh(theta: Mapping[str, Tensor]) -> Params:
    return {k: t.detach().clone() for k, t in theta.items()}


def proximal_objective(support_loss: SupportLoss, phi: Params, theta: Params, lam: float) -> Tensor:
    """G(phi) = L(phi) + lam/2 ||phi - theta||^2 -> 0-d tensor."""
    loss = support_loss(phi)
    if lam == 0:
        return loss
    return loss + 0.5 * lam * sum(torch.sum((phi[k] - theta[k]) ** 2) for k in phi)


def _value_and_grad(support_loss, phi, theta, lam, create_graph=False):
    """(G(phi), grad G(phi)) with a one-step graph; grads of parameters the loss ignores are zero."""
    with torch.enable_grad():
        p = {k: t.detach().requires_grad_(True) for k, t in phi.items()}
        loss = support_loss(p)
        grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True, create_graph=create_graph)
    g = {}
    for (k, t), gk in zip(p.items(), grads, strict=True):
        gk = torch.zeros_like(t) if gk is None else gk.detach()
        g[k] = gk + lam * (phi[k] - theta[k]) if lam else gk
    val = loss.detach()
    if lam:
        val = val + 0.5 * lam * sum(torch.sum((phi[k] - theta[k]) ** 2) for k in phi)
    return val, g


def gd_adapt(
    support_loss: SupportLoss, theta: Mapping[str, Tensor], lam: float, steps: int, lr: float = 0.1
) -> Params:
    """iMAML-GD: ``steps`` times phi <- phi - lr (grad L(phi) + lam (phi - theta)). Returns detached phi."""
    lam = _validate(theta, lam, steps)
    theta = _fresh(theta)
    phi = _fresh(theta)
    for _ in range(steps):
        _, g = _value_and_grad(support_loss, phi, theta, lam)
        phi = tree_axpy(-lr, g, phi)
    return phi


def torch_optimizer_adapt(
    support_loss: SupportLoss,
    theta: Mapping[str, Tensor],
    lam: float,
    steps: int,
    optimizer: str | type[torch.optim.Optimizer] = "sgd",
    lr: float = 0.1,
    **optimizer_kwargs,
) -> Params:
    """Any ``torch.optim`` optimiser on G(phi) = L(phi) + lam/2 ||phi - theta||^2, ``steps`` steps.

    optimizer: "sgd", "adam" or a ``torch.optim.Optimizer`` subclass; ``optimizer_kwargs`` go to its
    constructor (e.g. momentum=0.9). Gradients are set by hand on private copies, so ``support_loss`` may
    close over modules whose own ``.grad`` must stay untouched.
    """
    lam = _validate(theta, lam, steps)
    if isinstance(optimizer, str):
        if optimizer.lower() not in _TORCH_OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; valid names: {sorted(_TORCH_OPTIMIZERS)}, "
                "or pass a torch.optim.Optimizer subclass"
            )
        optimizer = _TORCH_OPTIMIZERS[optimizer.lower()]
    theta = _fresh(theta)
    phi = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    opt = optimizer(list(phi.values()), lr=lr, **optimizer_kwargs)
    for _ in range(steps):
        _, g = _value_and_grad(support_loss, phi, theta, lam)
        for k, t in phi.items():
            t.grad = g[k]
        opt.step()
    return {k: t.detach() for k, t in phi.items()}


def lbfgs_adapt(
    support_loss: SupportLoss,
    theta: Mapping[str, Tensor],
    lam: float,
    steps: int,
    lr: float = 1.0,
    history_size: int = 20,
    line_search_fn: str | None = "strong_wolfe",
    tolerance_grad: float = 1e-10,
    tolerance_change: float = 0.0,
    **optimizer_kwargs,
) -> Params:
    """torch.optim.LBFGS on G(phi) for up to ``steps`` iterations (one ``step(closure)`` with max_iter=steps).

    Tolerances are tighter than torch's defaults (1e-7 / 1e-9; with 1e-9 on the change of G, float64 runs stop
    near ||grad|| ~ 1e-6) so that float64 solves reach the optimum the
    implicit gradient assumes; loosen them for speed.
    """
    lam = _validate(theta, lam, steps)
    theta = _fresh(theta)
    phi = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    if steps == 0:
        return {k: t.detach() for k, t in phi.items()}
    opt = torch.optim.LBFGS(
        list(phi.values()),
        lr=lr,
        max_iter=steps,
        history_size=history_size,
        line_search_fn=line_search_fn,
        tolerance_grad=tolerance_grad,
        tolerance_change=tolerance_change,
        **optimizer_kwargs,
    )

    def closure():
        val, g = _value_and_grad(support_loss, phi, theta, lam)
        for k, t in phi.items():
            t.grad = g[k]
        return val

    opt.step(closure)
    return {k: t.detach() for k, t in phi.items()}


def hessian_free_adapt(
    support_loss: SupportLoss,
    theta: Mapping[str, Tensor],
    lam: float,
    steps: int,
    hf_cg_steps: int = 5,
    lr: float = 1.0,
    c1: float = 1e-4,
    backtrack: float = 0.5,
    max_backtracks: int = 30,
    gtol: float = 0.0,
) -> Params:
    """iMAML-HF: ``steps`` Newton-CG iterations on G(phi) = L(phi) + lam/2 ||phi - theta||^2.

    Each iteration: g = grad G(phi); d ~= -(H + lam I)^{-1} g by ``hf_cg_steps`` steps of truncated CG
    (H = Hessian of L at phi, matrix-free, the gradient graph built once per iteration); then Armijo
    backtracking phi <- phi + t d, t = lr, lr*backtrack, ... until G(phi + t d) <= G(phi) + c1 t g^T d.
    The proximal term makes H + lam I well conditioned near theta; where it is not positive definite
    (lam = 0 or strong negative curvature) truncated CG stops at its last descent iterate, or -g on the
    first step, so d is always a descent direction. Stops early when ||g|| <= gtol or no step decreases G.
    """
    lam = _validate(theta, lam, steps)
    if isinstance(hf_cg_steps, bool) or not isinstance(hf_cg_steps, int) or hf_cg_steps < 1:
        raise ValueError(f"hf_cg_steps must be an integer >= 1, got {hf_cg_steps!r}")
    theta = _fresh(theta)
    phi = _fresh(theta)
    for _ in range(steps):
        hvp = _RetainedGradHVP(support_loss, phi)
        g = {}
        for (k, t), gk in zip(hvp.p.items(), hvp.grads, strict=True):
            gk = torch.zeros_like(t) if gk is None else gk.detach()
            g[k] = gk + lam * (phi[k] - theta[k]) if lam else gk
        g_norm = tree_dot(g, g).sqrt().item()
        if not math.isfinite(g_norm) or g_norm <= gtol:
            break
        f0 = proximal_objective(support_loss, phi, theta, lam).detach()

        def matvec(v, hvp=hvp):
            hv = hvp(v)
            return tree_axpy(lam, v, hv) if lam else hv

        neg_g = tree_map(torch.neg, g)
        d, _ = conjugate_gradient(matvec, neg_g, hf_cg_steps, rtol=1e-12)
        del hvp, matvec  # free this iteration's graph now, not when the next one is built
        slope = tree_dot(g, d).item()
        if not (slope < 0 and math.isfinite(slope)):
            d, slope = neg_g, -(g_norm**2)  # numerical safety: fall back to steepest descent
        t, moved = lr, False
        with torch.no_grad():
            for _ in range(max_backtracks):
                cand = tree_axpy(t, d, phi)
                f = proximal_objective(support_loss, cand, theta, lam)
                if torch.isfinite(f) and f.item() <= f0.item() + c1 * t * slope:
                    phi, moved = cand, True
                    break
                t *= backtrack
        if not moved:
            break
    return {k: t.detach() for k, t in phi.items()}


def proximal_adapt(
    support_loss: SupportLoss,
    theta: Mapping[str, Tensor],
    lam: float,
    steps: int,
    optimizer: str = "gd",
    lr: float | None = None,
    hf_cg_steps: int = 5,
    **optimizer_kwargs,
) -> Params:
    """Minimise L(phi) + lam/2 ||phi - theta||^2 from phi = theta with the named solver; returns detached phi.

    optimizer: "gd" (fixed step, iMAML-GD), "sgd" / "adam" (torch.optim; momentum etc. via
    ``optimizer_kwargs``), "lbfgs" (``steps`` = max iterations), "hf" (Hessian-free Newton-CG, iMAML-HF,
    ``hf_cg_steps`` CG steps per iteration). lr None picks 0.1 for gd/sgd/adam and 1.0 (the initial
    line-search step) for lbfgs/hf.
    """
    name = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {list(OPTIMIZERS)}")
    lr = _DEFAULT_LR[name] if lr is None else lr
    if name == "gd":
        if optimizer_kwargs:
            raise ValueError(f"optimizer 'gd' takes no extra options, got {sorted(optimizer_kwargs)}")
        return gd_adapt(support_loss, theta, lam, steps, lr=lr)
    if name in _TORCH_OPTIMIZERS:
        return torch_optimizer_adapt(support_loss, theta, lam, steps, name, lr=lr, **optimizer_kwargs)
    if name == "lbfgs":
        return lbfgs_adapt(support_loss, theta, lam, steps, lr=lr, **optimizer_kwargs)
    return hessian_free_adapt(
        support_loss, theta, lam, steps, hf_cg_steps=hf_cg_steps, lr=lr, **optimizer_kwargs
    )
