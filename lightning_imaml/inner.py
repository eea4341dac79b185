"""Proximal inner solvers: phi*(theta) ~ argmin_phi L(phi) + lam/2 ||phi - theta||^2, starting at phi = theta.

iMAML's meta-gradient depends only on the solution phi*, not on the path (implicit function theorem), so any
optimiser may do the inner loop. Every solver here:
- takes ``support_loss(phi: dict) -> 0-d tensor`` (WITHOUT the proximal term) and ``theta`` (dict, may be
  nn.Parameters that require grad: they are detached - no graph to theta is ever built);
- builds at most one step's autograd graph at a time (memory is flat in the number of steps) and never
  touches ``.grad`` of anything but its own private copies;
- returns phi as a dict of detached tensors (requires_grad False);
- allows lam = 0 (plain fine-tuning, e.g. at test time), and a per-parameter lam: a dict name -> tensor
  (0-d per parameter tensor, or the parameter's shape), for the penalty 1/2 (phi - theta)^T Lam (phi - theta).
Pure torch, no Lightning. Runs under an outer ``torch.no_grad()`` (it re-enables grad locally), but not on
inference-mode tensors (Lightning's default for validation: use ``Trainer(inference_mode=False)``).

Solve quality (``return_info=True``, an :class:`InnerInfo`): the proximal gradient norm
||grad L(phi) + lam (phi - theta)|| at the returned phi (the delta of Theorem 1 of the iMAML paper: the
implicit meta-gradient is exact only where it is 0) and whether G ever rose between consecutive iterates.

One engine: every named solver is written once, as a *per-task* function with a fixed iteration count and
per-task decisions (accept / reject a step, converged, negative curvature) as ``torch.where`` masks instead
of data-dependent Python branches. The per-task loop calls them directly (gradients by torch.autograd,
and it may stop once a solve is finished); :mod:`lightning_imaml.batched` runs the very same functions
under ``torch.func.vmap`` (gradients by torch.func; see :func:`lightning_imaml.implicit.value_and_grad`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .implicit import conjugate_gradient, grad_and_hvp, under_functorch, value_and_grad
from .params import tree_axpy, tree_dot, tree_map, tree_norm, tree_where

__all__ = [
    "InnerInfo",
    "proximal_adapt",
    "gd_adapt",
    "gd_armijo_adapt",
    "sgd_adapt",
    "adam_adapt",
    "torch_optimizer_adapt",
    "lbfgs_adapt",
    "hessian_free_adapt",
    "proximal_objective",
    "OPTIMIZERS",
]

Params = dict[str, Tensor]
Theta = Mapping[str, Tensor]
SupportLoss = Callable[[Params], Tensor]

_TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
OPTIMIZERS = ("gd_armijo", "gd", "sgd", "adam", "lbfgs", "hf")
# per-optimizer default step size when lr is None: the natural first step of L-BFGS / a Newton method is 1;
# for gd_armijo lr is the largest step it may take
_DEFAULT_LR = {"gd_armijo": 0.1, "gd": 0.1, "sgd": 0.1, "adam": 0.1, "lbfgs": 1.0, "hf": 1.0}
# every named solver is a per-task function that torch.func.vmap can batch (lightning_imaml.batched)
VMAPPABLE = OPTIMIZERS
# the extra options each named solver takes (``proximal_adapt(..., **options)``)
OPTIONS = {
    "gd_armijo": ("armijo_c", "backtrack", "grow"),
    "gd": (),
    "sgd": ("momentum", "dampening", "nesterov", "weight_decay"),
    "adam": ("betas", "eps", "weight_decay", "amsgrad"),
    "lbfgs": ("history_size", "c1", "backtrack", "tolerance_grad"),
    "hf": ("c1", "backtrack", "max_backtracks", "gtol"),
}


class InnerInfo(NamedTuple):
    """How well an inner solve went (0-d tensors, detached; under vmap each gets a leading task dim).

    residual: ||grad L(phi) + lam (phi - theta)|| at the returned phi, the proximal gradient norm (delta of
        Theorem 1: the implicit meta-gradient assumes it is 0).
    residual0: the same at phi = theta, i.e. ||grad L(theta)||, the scale to judge ``residual`` by.
    rose: True if G(phi) = L(phi) + lam/2 ||phi - theta||^2 increased from one iterate to the next (by
        more than 16 float eps relative: rounding noise at convergence does not count).
    accepted: steps actually taken (gd_armijo / hf reject steps that do not decrease G enough).
    objective: G at the returned phi.
    """

    residual: Tensor
    residual0: Tensor
    rose: Tensor
    accepted: Tensor
    objective: Tensor


Lam = float | Mapping[str, Tensor]


def _validate(theta: Mapping[str, Tensor], lam: Lam, steps: int) -> Lam:
    if not isinstance(theta, Mapping) or not theta:
        raise ValueError(f"theta must be a non-empty dict name -> Tensor, got {type(theta).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    return check_lam(lam, theta)


def check_lam(lam: Lam, theta: Mapping[str, Tensor]) -> Lam:
    """A proximal strength: a number >= 0, or a dict name -> tensor >= 0 with theta's keys, each 0-d (one
    value per parameter tensor) or of the parameter's shape (one per scalar). Returns a float or the dict."""
    if isinstance(lam, Mapping):
        if set(lam) != set(theta):
            raise ValueError(
                f"a per-parameter lam needs theta's keys: missing {sorted(set(theta) - set(lam))}, "
                f"unknown {sorted(set(lam) - set(theta))}"
            )
        for k, v in lam.items():
            if v.dim() and tuple(v.shape) != tuple(theta[k].shape):
                raise ValueError(
                    f"lam[{k!r}] has shape {tuple(v.shape)}; use a 0-d tensor or {tuple(theta[k].shape)}"
                )
            if not bool(torch.isfinite(v).all() & (v >= 0).all()):
                raise ValueError(f"lam[{k!r}] must be >= 0 and finite")
        return dict(lam)
    lam = float(lam)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be >= 0 and finite (0 = no proximal term), got {lam}")
    return lam


def add_lam_times(g: Params, lam: Lam, v: Params) -> Params:
    """g + Lam v (for a number one fused ``torch.add(g, v, alpha=lam)`` per tensor)."""
    if isinstance(lam, Mapping):
        return {k: g[k] + lam[k] * t for k, t in v.items()}
    return tree_axpy(lam, v, g)


def prox_penalty(lam: Lam, diff: Params) -> Tensor:
    """1/2 (phi - theta)^T Lam (phi - theta) for diff = phi - theta."""
    if isinstance(lam, Mapping):
        return 0.5 * sum(torch.sum(lam[k] * d * d) for k, d in diff.items())
    return 0.5 * lam * tree_dot(diff, diff)


def _fresh(theta: Mapping[str, Tensor]) -> Params:
    return {k: t.detach().clone() for k, t in theta.items()}


def proximal_objective(support_loss: SupportLoss, phi: Params, theta: Params, lam: Lam) -> Tensor:
    """G(phi) = L(phi) + 1/2 (phi - theta)^T Lam (phi - theta) -> 0-d tensor (Lam = lam I for a number)."""
    loss = support_loss(phi)
    if not isinstance(lam, Mapping) and lam == 0:
        return loss
    return loss + prox_penalty(lam, {k: phi[k] - theta[k] for k in phi})


def _prox_value_and_grad(support_loss: SupportLoss, theta: Params, lam: Lam):
    """phi -> (G(phi), grad G(phi)), detached; the proximal part added in closed form."""

    def f(phi):
        val, g = value_and_grad(support_loss, phi)
        if not lam:
            return val, g
        diff = {k: phi[k] - theta[k] for k in phi}
        return val + prox_penalty(lam, diff), add_lam_times(g, lam, diff)

    return f


def _sufficient_decrease(new: Tensor, old: Tensor, predicted: Tensor) -> Tensor:
    """Armijo: G(new) <= G(old) + predicted (predicted = c1 t g'd < 0). Where the predicted decrease is within
    1024 x the rounding of G, the comparison of two values of G is noise: there a step that does not raise G
    beyond rounding passes, so that a converged solve does not stall on a rejected step."""
    noise = 16 * torch.finfo(old.dtype).eps * torch.maximum(old.abs(), new.abs())
    return (new <= old + predicted) | ((-predicted <= 1024 * noise) & (new <= old + noise))


def _rose(new: Tensor, old: Tensor) -> Tensor:
    # increases below 16 eps relative are rounding noise of a converged solve, not a failing one
    return new > old + 16 * torch.finfo(old.dtype).eps * old.abs()


class _Solve:
    """The state every solver starts from and reports: phi = theta, G and grad G there, the running
    rise flag and accepted-step count (all per task, vmappable)."""

    def __init__(self, support_loss, theta, lam, steps, track: bool = True):
        self.track, self.steps, self.done = track, steps, 0
        self.lam = _validate(theta, lam, steps)
        self.theta = _fresh(theta)
        self.f = _prox_value_and_grad(support_loss, self.theta, self.lam)
        self.phi = dict(self.theta)
        self.val, self.g = self.f(self.phi)
        self.residual0 = tree_norm(self.g)
        self.rose = torch.zeros_like(self.val, dtype=torch.bool)
        self.accepted = torch.zeros_like(self.val)

    def evaluate(self):
        """G and grad G at the current phi (the next step's gradient); records a rise against the previous
        value. Without ``track`` (no InnerInfo asked for) the evaluation after the last step, which only
        serves the report, is skipped, as is the rise check."""
        self.done += 1
        if not self.track and self.done >= self.steps:
            return
        new, self.g = self.f(self.phi)
        if self.track:
            self.rose = self.rose | _rose(new, self.val)
        self.val = new

    def result(self, return_info: bool):
        if not return_info:
            return self.phi
        info = InnerInfo(tree_norm(self.g), self.residual0, self.rose, self.accepted, self.val)
        return self.phi, info


def _check_step(lr: float) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def gd_adapt(
    support_loss: SupportLoss, theta: Theta, lam: float, steps: int, lr: float = 0.1,
    return_info: bool = False,
):  # fmt: skip
    """Fixed-step proximal GD: ``steps`` times phi <- phi - lr (grad L(phi) + lam (phi - theta)).

    The textbook iMAML-GD (and MAML's inner loop). Stable only while the largest eigenvalue of the support
    Hessian stays below 2/lr - lam; past it G rises from step to step (``InnerInfo.rose``) and phi diverges.
    ``steps`` gradient evaluations, one more with ``return_info`` (for the residual). Returns detached
    phi, or ``(phi, InnerInfo)`` with ``return_info``.
    """
    _check_step(lr)
    run = _Solve(support_loss, theta, lam, steps, track=return_info)
    for _ in range(steps):
        run.phi = tree_axpy(-lr, run.g, run.phi)
        run.evaluate()
    run.accepted = torch.full_like(run.val, float(steps))
    return run.result(return_info)


def gd_armijo_adapt(
    support_loss: SupportLoss, theta: Theta, lam: float, steps: int, lr: float = 0.1,
    armijo_c: float = 0.5, backtrack: float = 0.5, grow: float = 2.0,
    return_info: bool = False,
):  # fmt: skip
    """Safeguarded proximal GD: a step phi - t g (g = grad G) is taken only if G falls by >= c t ||g||^2.

    Per task, per trial step: rho = (G(phi) - G(phi - t g)) / (t ||g||^2), the achieved share of the
    first-order decrease (1 - t k / 2 along a direction of curvature k).
    - rho >= c (Armijo): accept. Then grow t to min(lr, grow t) if the grown step would still pass on the
      same quadratic (rho >= 1 - (1 - c) / grow), else keep t: no accept / reject ping-pong at a fixed
      curvature.
    - otherwise (or G not finite): stay, and shrink t to 90 % of the largest step the quadratic through
      the two values accepts, t (1 - c) / (1 - rho), clamped to [0.1 t, backtrack t].
    - Near convergence the predicted decrease t ||g||^2 approaches the rounding of G (16 eps |G|), and a
      rho from two values of G is noise. Below 1024 times that rounding, rho is taken from the gradients
      instead, (1 + <g(phi - t g), g> / ||g||^2) / 2 (the same 1 - t k / 2 on a quadratic, without
      cancellation), and a step is accepted only if G also did not rise beyond rounding. Growth needs
      both estimates to agree.
    With c = 1/2 the test accepts exactly t <= 1/k, so G never increases and the step follows each task's
    curvature: the solve keeps converging where fixed-step GD (stable only for k < 2/lr - lam) diverges.
    ``lr`` is the largest (and first) step. Each trial is one gradient evaluation at the trial point, which
    is the next step's gradient when accepted, so it costs what fixed-step GD costs (``steps + 1``
    evaluations); rejected trials count against ``steps``.
    No data-dependent Python branch: per-task decisions are ``torch.where`` masks, so the function runs
    unchanged under ``torch.func.vmap`` with per-task step sizes. Returns detached phi, or
    ``(phi, InnerInfo)`` with ``return_info``.
    """
    if not 0 < armijo_c < 1:
        raise ValueError(f"armijo_c must be in (0, 1), got {armijo_c}")
    if not 0.1 <= backtrack < 1:
        raise ValueError(f"backtrack must be in [0.1, 1), got {backtrack}")
    if not grow >= 1:
        raise ValueError(f"grow must be >= 1, got {grow}")
    _check_step(lr)
    run = _Solve(support_loss, theta, lam, steps)
    gg = tree_dot(run.g, run.g)
    t = torch.full_like(run.val, lr)
    grow_above = 1 - (1 - armijo_c) / grow
    for _ in range(steps):
        trial = tree_axpy(-t, run.g, run.phi)
        new, g_new = run.f(trial)
        predicted = t * gg
        noise = 16 * torch.finfo(new.dtype).eps * torch.maximum(run.val.abs(), new.abs())
        # rho from values only where their difference is known to ~1e-3; else from the gradients
        measurable = predicted > 1024 * noise
        rho_grads = 0.5 * (1 + tree_dot(g_new, run.g) / gg)
        rho = torch.where(measurable, (run.val - new) / predicted, rho_grads)
        # gg == 0 (already stationary): rho is nan/inf; nothing to do, reject and keep phi
        ok = torch.isfinite(new) & torch.isfinite(rho) & (rho >= armijo_c) & (new <= run.val + noise)
        run.phi = tree_where(ok, trial, run.phi)
        run.g = tree_where(ok, g_new, run.g)
        run.val = torch.where(ok, new, run.val)
        gg = tree_dot(run.g, run.g)
        # nan (rho nan) -> 0, +inf (rho = 1) -> max float, -inf -> -max float: the clamp below makes them
        # 0.1, backtrack, 0.1
        shrink = torch.nan_to_num(0.9 * (1 - armijo_c) / (1 - rho))
        rho_grow = torch.minimum(rho, rho_grads)  # grow only if both estimates allow it
        t_up = torch.where(rho_grow >= grow_above, torch.clamp(t * grow, max=lr), t)
        t = torch.where(ok, t_up, t * torch.clamp(shrink, 0.1, backtrack))
        run.accepted = run.accepted + ok.to(run.accepted.dtype)
    return run.result(return_info)


def sgd_adapt(
    support_loss: SupportLoss, theta: Theta, lam: float, steps: int, lr: float = 0.1,
    momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
    return_info: bool = False,
):  # fmt: skip
    """``torch.optim.SGD`` on G, step for step (momentum buffer from the first gradient, dampening,
    Nesterov, L2 ``weight_decay``), as a per-task vmappable function. ``steps`` evaluations (+1 with
    ``return_info``)."""
    _check_step(lr)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
    run = _Solve(support_loss, theta, lam, steps, track=return_info)
    buf = None
    for _ in range(steps):
        d = tree_axpy(weight_decay, run.phi, run.g) if weight_decay else run.g
        if momentum:
            buf = d if buf is None else tree_map(lambda b, x: momentum * b + (1 - dampening) * x, buf, d)
            d = tree_axpy(momentum, buf, d) if nesterov else buf
        run.phi = tree_axpy(-lr, d, run.phi)
        run.evaluate()
    run.accepted = torch.full_like(run.val, float(steps))
    return run.result(return_info)


def adam_adapt(
    support_loss: SupportLoss, theta: Theta, lam: float, steps: int, lr: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
    amsgrad: bool = False, return_info: bool = False,
):  # fmt: skip
    """``torch.optim.Adam`` on G, step for step (bias corrections, L2 ``weight_decay``, ``amsgrad``), as a
    per-task vmappable function. ``steps`` evaluations (+1 with ``return_info``)."""
    _check_step(lr)
    beta1, beta2 = betas
    run = _Solve(support_loss, theta, lam, steps, track=return_info)
    m = tree_map(torch.zeros_like, run.g)
    v = tree_map(torch.zeros_like, run.g)
    vmax = v
    for step in range(1, steps + 1):
        d = tree_axpy(weight_decay, run.phi, run.g) if weight_decay else run.g
        m = tree_map(lambda a, x: a.lerp(x, 1 - beta1), m, d)  # as torch.optim.Adam
        v = tree_map(lambda a, x: a * beta2 + (1 - beta2) * x * x, v, d)
        vmax = tree_map(torch.maximum, vmax, v) if amsgrad else v
        size, bc2_sqrt = lr / (1 - beta1**step), (1 - beta2**step) ** 0.5  # as torch.optim.Adam

        def update(p, a, b, size=size, bc2_sqrt=bc2_sqrt):
            return p - size * (a / (b.sqrt() / bc2_sqrt + eps))

        run.phi = tree_map(update, run.phi, m, vmax)
        run.evaluate()
    run.accepted = torch.full_like(run.val, float(steps))
    return run.result(return_info)


def torch_optimizer_adapt(
    support_loss: SupportLoss,
    theta: Mapping[str, Tensor],
    lam: float,
    steps: int,
    optimizer: str | type[torch.optim.Optimizer] = "sgd",
    lr: float = 0.1,
    return_info: bool = False,
    **optimizer_kwargs,
):
    """Any ``torch.optim`` optimiser class on G(phi) = L(phi) + lam/2 ||phi - theta||^2, ``steps`` steps.

    For optimisers this module does not write itself (RMSprop, Adagrad, ...): per-task loop only, since
    torch.optim updates tensors in place, which vmap cannot batch. optimizer: "sgd", "adam" or a
    ``torch.optim.Optimizer`` subclass; ``optimizer_kwargs`` go to its constructor. Gradients are set by
    hand on private copies, so ``support_loss`` may close over modules whose ``.grad`` must stay untouched.
    Returns detached phi, or ``(phi, InnerInfo)`` with ``return_info``.
    """
    if isinstance(optimizer, str):
        if optimizer.lower() not in _TORCH_OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; valid names: {sorted(_TORCH_OPTIMIZERS)}, "
                "or pass a torch.optim.Optimizer subclass"
            )
        optimizer = _TORCH_OPTIMIZERS[optimizer.lower()]
    if under_functorch():
        raise RuntimeError(
            f"torch_optimizer_adapt({optimizer.__name__}) updates tensors in place and cannot run under "
            "torch.func.vmap; use the per-task loop, or proximal_adapt's 'sgd' / 'adam'"
        )
    run = _Solve(support_loss, theta, lam, steps, track=return_info)
    phi = {k: t.clone().requires_grad_(True) for k, t in run.phi.items()}
    opt = optimizer(list(phi.values()), lr=lr, **optimizer_kwargs)
    for _ in range(steps):
        for k, t in phi.items():
            t.grad = run.g[k]
        opt.step()
        run.phi = {k: t.detach().clone() for k, t in phi.items()}
        run.evaluate()
    run.accepted = torch.full_like(run.val, float(steps))
    return run.result(return_info)


def _two_loop(g: Params, S: list, Y: list, rho: list) -> Params:
    """-H g by the L-BFGS two-loop recursion; history newest first, empty slots have rho = 0."""
    q = tree_map(torch.neg, g)
    alphas = []
    for s, y, r in zip(S, Y, rho, strict=True):
        a = r * tree_dot(s, q)
        q = tree_axpy(-a, y, q)
        alphas.append(a)
    yy = tree_dot(Y[0], Y[0])
    gamma = torch.where(rho[0] > 0, tree_dot(S[0], Y[0]) / torch.where(yy > 0, yy, torch.ones_like(yy)), 1.0)
    d = tree_map(lambda t: gamma * t, q)
    for s, y, r, a in reversed(list(zip(S, Y, rho, alphas, strict=True))):
        d = tree_axpy(a - r * tree_dot(y, d), s, d)
    return d


def lbfgs_adapt(
    support_loss: SupportLoss, theta: Theta, lam: float, steps: int, lr: float = 1.0,
    history_size: int = 10, c1: float = 1e-4, backtrack: float = 0.5, tolerance_grad: float = 1e-10,
    return_info: bool = False,
):  # fmt: skip
    """L-BFGS on G(phi) = L(phi) + lam/2 ||phi - theta||^2: ``steps`` trial steps, per task, vmappable.

    Direction d = -H g by the two-loop recursion over the last ``history_size`` pairs (s, y) (initial
    scaling s'y / y'y; a pair enters only if s'y > 1e-10, so H stays positive definite); d = -g where it is
    not a descent direction. Step: one trial phi + t d per iteration, t = lr (the first one scaled
    min(1, 1/|g|_1) as torch.optim.LBFGS), accepted if G(phi + t d) <= G(phi) + c1 t g'd (Armijo), else
    t <- backtrack t for the next iteration. A task whose max |g| <= tolerance_grad stops moving.
    Unlike torch.optim.LBFGS (strong-Wolfe search, data-dependent evaluation counts) this runs a fixed
    count, so it batches. Returns detached phi, or ``(phi, InnerInfo)`` with ``return_info``.
    """
    _check_step(lr)
    if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
        raise ValueError(f"history_size must be an integer >= 1, got {history_size!r}")
    run = _Solve(support_loss, theta, lam, steps)
    zeros = tree_map(torch.zeros_like, run.g)
    S, Y = [zeros] * history_size, [zeros] * history_size
    rho = [torch.zeros_like(run.val)] * history_size
    t = lr * torch.clamp(1.0 / sum(x.abs().sum() for x in run.g.values()), max=1.0)
    for _ in range(steps):
        done = torch.stack([x.abs().max() for x in run.g.values()]).max() <= tolerance_grad
        d = _two_loop(run.g, S, Y, rho)
        gtd = tree_dot(run.g, d)
        descent = torch.isfinite(gtd) & (gtd < 0)
        d = tree_where(descent, d, tree_map(torch.neg, run.g))
        gtd = torch.where(descent, gtd, -tree_dot(run.g, run.g))
        trial = tree_axpy(t, d, run.phi)
        new, g_new = run.f(trial)
        ok = ~done & torch.isfinite(new) & _sufficient_decrease(new, run.val, c1 * t * gtd)
        s, y = tree_axpy(-1.0, run.phi, trial), tree_axpy(-1.0, run.g, g_new)
        sy = tree_dot(s, y)
        keep = ok & (sy > 1e-10)
        S = [tree_where(keep, a, b) for a, b in zip([s, *S[:-1]], S, strict=True)]
        Y = [tree_where(keep, a, b) for a, b in zip([y, *Y[:-1]], Y, strict=True)]
        rho = [torch.where(keep, a, b) for a, b in zip([1.0 / sy, *rho[:-1]], rho, strict=True)]
        run.phi, run.g = tree_where(ok, trial, run.phi), tree_where(ok, g_new, run.g)
        run.val = torch.where(ok, new, run.val)
        t = torch.where(ok, torch.full_like(t, lr), t * backtrack)
        run.accepted = run.accepted + ok.to(run.accepted.dtype)
    return run.result(return_info)


def hessian_free_adapt(
    support_loss: SupportLoss, theta: Theta, lam: float, steps: int, hf_cg_steps: int = 5, lr: float = 1.0,
    c1: float = 1e-4, backtrack: float = 0.5, max_backtracks: int = 10, gtol: float = 0.0,
    return_info: bool = False,
):  # fmt: skip
    """iMAML-HF: ``steps`` Newton-CG iterations on G(phi) = L(phi) + lam/2 ||phi - theta||^2.

    Each iteration: g = grad G(phi); d ~= -(H + lam I)^{-1} g by ``hf_cg_steps`` steps of truncated CG
    (H = Hessian of L at phi, matrix-free; plainly the gradient graph is built once per iteration); then
    backtracking phi <- phi + t d over t = lr, lr*backtrack, ... (``max_backtracks`` trials, values only)
    to the first t with G(phi + t d) <= G(phi) + c1 t g^T d. Where H + lam I is not positive definite
    (lam = 0 or strong negative curvature) truncated CG stops at its last descent iterate, or -g on the
    first step, so d is always a descent direction. A task stops when ||g|| <= gtol or no trial step
    decreases G. Per task and vmappable (under vmap every trial is evaluated and masked; the per-task loop
    stops at the first accepted one). With ``return_info``: ``(phi, InnerInfo)``, ``accepted`` = Newton
    steps taken (one more gradient evaluation for the residual).
    """
    if isinstance(hf_cg_steps, bool) or not isinstance(hf_cg_steps, int) or hf_cg_steps < 1:
        raise ValueError(f"hf_cg_steps must be an integer >= 1, got {hf_cg_steps!r}")
    _check_step(lr)
    lam = _validate(theta, lam, steps)
    theta = _fresh(theta)
    phi = dict(theta)
    loop = not under_functorch()
    done = residual0 = accepted = None

    def objective(p):
        with torch.no_grad():
            return proximal_objective(support_loss, p, theta, lam)

    for _ in range(steps):
        loss, g, hvp = grad_and_hvp(support_loss, phi)
        if lam:
            diff = tree_axpy(-1.0, theta, phi)
            loss, g = loss + prox_penalty(lam, diff), add_lam_times(g, lam, diff)
        gg = tree_dot(g, g)
        if done is None:  # first iteration: what every report starts from
            residual0, accepted = gg.sqrt(), torch.zeros_like(loss)
            done = torch.zeros_like(gg, dtype=torch.bool)
        done = done | ~(torch.isfinite(gg) & (gg.sqrt() > gtol))  # at every iterate, not only at theta
        if loop and bool(done):
            break

        def matvec(v, hvp=hvp):
            hv = hvp(v)
            return add_lam_times(hv, lam, v) if lam else hv

        neg_g = tree_map(torch.neg, g)
        d, _ = conjugate_gradient(matvec, neg_g, hf_cg_steps, rtol=1e-12)
        del hvp, matvec  # free this iteration's graph now, not when the next one is built
        slope = tree_dot(g, d)
        descent = torch.isfinite(slope) & (slope < 0)  # numerical safety: else steepest descent
        d, slope = tree_where(descent, d, neg_g), torch.where(descent, slope, -gg)
        moved = torch.zeros_like(done)
        for j in range(max_backtracks):
            if loop and bool(moved):
                break
            t = lr * backtrack**j
            cand = tree_axpy(t, d, phi)
            f = objective(cand)
            ok = ~done & ~moved & torch.isfinite(f) & _sufficient_decrease(f, loss, c1 * t * slope)
            phi = tree_where(ok, cand, phi)
            moved = moved | ok
        accepted = accepted + moved.to(accepted.dtype)
        done = done | ~moved
    if not return_info:
        return phi
    val, g = _prox_value_and_grad(support_loss, theta, lam)(phi)
    residual = tree_norm(g)
    if residual0 is None:  # steps == 0
        residual0, accepted = residual, torch.zeros_like(val)
    # Armijo with c1 > 0 accepts decreases only: G cannot rise
    return phi, InnerInfo(residual, residual0, torch.zeros_like(val, dtype=torch.bool), accepted, val)


_SOLVERS = {
    "gd_armijo": gd_armijo_adapt,
    "gd": gd_adapt,
    "sgd": sgd_adapt,
    "adam": adam_adapt,
    "lbfgs": lbfgs_adapt,
    "hf": hessian_free_adapt,
}


def proximal_adapt(
    support_loss: SupportLoss,
    theta: Mapping[str, Tensor],
    lam: float,
    steps: int,
    optimizer: str = "gd_armijo",
    lr: float | None = None,
    hf_cg_steps: int = 5,
    return_info: bool = False,
    **optimizer_kwargs,
):
    """Minimise L(phi) + lam/2 ||phi - theta||^2 from phi = theta with the named solver; returns detached phi.

    optimizer: "gd_armijo" (default: GD with a per-task safeguarded step, G never increases; ``lr`` its
    largest step), "gd" (fixed step, the textbook iMAML-GD; diverges once the support curvature exceeds
    2/lr - lam), "sgd" / "adam" (as torch.optim's; momentum etc. via ``optimizer_kwargs``), "lbfgs"
    (``steps`` trial steps), "hf" (Hessian-free Newton-CG, iMAML-HF, ``hf_cg_steps`` CG steps per
    iteration). :data:`OPTIONS` lists each one's options. lr None picks 0.1 for gd_armijo/gd/sgd/adam
    and 1.0 (the initial line-search step) for lbfgs/hf. Every one is a per-task function that vmap
    batches. With ``return_info=True`` returns ``(phi, InnerInfo)``.
    """
    name = optimizer.lower() if isinstance(optimizer, str) else optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {list(OPTIMIZERS)}")
    bad = sorted(set(optimizer_kwargs) - set(OPTIONS[name]))
    if bad:
        takes = f"only {', '.join(OPTIONS[name])}" if OPTIONS[name] else "no extra options"
        raise ValueError(f"optimizer {name!r} takes {takes}, got {bad}")
    lr = _DEFAULT_LR[name] if lr is None else lr
    if name == "hf":
        optimizer_kwargs["hf_cg_steps"] = hf_cg_steps
    return _SOLVERS[name](support_loss, theta, lam, steps, lr=lr, return_info=return_info, **optimizer_kwargs)
