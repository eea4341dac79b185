"""Proximal inner solvers: phi*(theta) ~ argmin_phi L(phi) + 1/2 (phi - theta)^T Lam (phi - theta), from phi
= theta.

iMAML's meta-gradient depends only on the solution phi*, not on the path (implicit function theorem), so any
optimiser may do the inner loop. A solver is a frozen dataclass with its options bound, e.g.
``GDArmijo(steps=16, lr=0.1)`` or ``HessianFree(steps=5, cg_steps=5)``; :data:`SOLVERS` maps each one's
``name`` to its class, so adding a solver is writing one class here. Every solver

- solves a :class:`ProximalProblem`: T tasks at once, parameters one ``[T, P]`` tensor, every per-task
  decision (accept a step, converged, negative curvature) a ``[T]`` mask, so one kernel updates the whole
  batch, and the tasks that are done drop out of the batch;
- builds at most one step's autograd graph at a time (memory flat in the number of steps), never touches
  ``.grad`` of anything, and returns detached phi;
- returns ``(phi, InnerInfo)``: how well each task's solve went (its proximal gradient norm, the delta of
  Theorem 1 of the iMAML paper, where the implicit meta-gradient is exact only at 0);
- stops a task early once its proximal gradient norm is at most ``max(atol, tol * residual0)`` (residual0:
  the norm at theta), and stops altogether once every task of the batch has; ``tol = atol = 0`` runs every
  step;
- allows lam = 0 (plain fine-tuning, e.g. at test time) and a per-parameter lam.

Calling a solver on a dict loss, ``GDArmijo()(support_loss, theta, lam)``, solves one task with the
``torch.func.functional_call`` dicts; :func:`proximal_adapt` does the same by solver name.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .cg import batched_conjugate_gradient
from .implicit import RetainedGGN, RetainedHVP, value_and_grad
from .params import ParamSpec, check_lam_layout, detached, rowdot, select_rows

__all__ = [
    "SOLVERS",
    "Adam",
    "GD",
    "GDArmijo",
    "HessianFree",
    "InnerInfo",
    "InnerSolver",
    "LBFGS",
    "ProximalProblem",
    "SGD",
    "TorchOptimizer",
    "make_solver",
    "newton_direction",
    "proximal_adapt",
    "proximal_objective",
]

Lam = float | Tensor  # a number, or a [P] tensor (one value per scalar parameter)


class InnerInfo(NamedTuple):
    """How each task's inner solve went (``[T]`` tensors, detached; 0-d from a dict call).

    residual: ||grad L(phi) + Lam (phi - theta)|| at the returned phi, the proximal gradient norm (delta of
        Theorem 1: the implicit meta-gradient assumes it is 0).
    residual0: the same at phi = theta, i.e. ||grad L(theta)||, the scale to judge ``residual`` by.
    rose: G(phi) = L(phi) + 1/2 (phi - theta)^T Lam (phi - theta) increased from one iterate to the next (by
        more than 16 float eps relative: rounding noise at convergence does not count).
    accepted: steps actually taken (line-search solvers reject steps that do not decrease G enough).
    objective: G at the returned phi.
    iterations: iterations run before the task was done (its tolerance met) or the steps ran out.
    """

    residual: Tensor
    residual0: Tensor
    rose: Tensor
    accepted: Tensor
    objective: Tensor
    iterations: Tensor


class ProximalProblem:
    """G_t(phi) = L_t(phi) + 1/2 (phi - theta_t)^T Lam (phi - theta_t) for T tasks at once.

    loss: ``[T, P] -> [T]``, task t's support loss of row t only (WITHOUT the proximal term).
    theta: ``[T, P]`` (an expanded ``[P]`` is fine); detached. lam: a number >= 0, or ``[P]`` >= 0.
    """

    def __init__(self, loss: Callable[[Tensor], Tensor], theta: Tensor, lam: Lam):
        if theta.dim() != 2:
            raise ValueError(f"theta must be [T, P] (one row per task), got shape {tuple(theta.shape)}")
        self.loss = loss
        self.theta = theta.detach()
        if isinstance(lam, Tensor):
            if lam.shape != self.theta.shape[-1:]:
                raise ValueError(
                    f"lam must be a number or a [P] tensor, P = {theta.shape[-1]}; got {tuple(lam.shape)}"
                )
            if not bool(torch.isfinite(lam).all() & (lam >= 0).all()):
                raise ValueError("every entry of lam must be >= 0 and finite")
            lam = lam.detach().to(self.theta.dtype)
        else:
            lam = float(lam)
            if not (lam >= 0 and math.isfinite(lam)):
                raise ValueError(f"lam must be >= 0 and finite (0 = no proximal term), got lam={lam}")
        self.lam = lam

    def select(self, rows: Tensor) -> ProximalProblem | None:
        """The problem of the tasks ``rows`` only (so a batch spends no work on tasks that are done), or None
        when the loss cannot be restricted (it has no ``select(rows)``)."""
        select = getattr(self.loss, "select", None)
        return None if select is None else ProximalProblem(select(rows), self.theta[rows], self.lam)

    @property
    def has_prox(self) -> bool:
        return isinstance(self.lam, Tensor) or self.lam != 0

    def penalty(self, diff: Tensor) -> Tensor:
        """1/2 diff^T Lam diff per row -> ``[T]``."""
        if isinstance(self.lam, Tensor):
            return 0.5 * rowdot(diff * self.lam, diff)
        return 0.5 * self.lam * rowdot(diff, diff)

    def add_prox_grad(self, g: Tensor, diff: Tensor) -> Tensor:
        """g + Lam diff."""
        return g + self.lam * diff if isinstance(self.lam, Tensor) else torch.add(g, diff, alpha=self.lam)

    def value_and_grad(self, phi: Tensor) -> tuple[Tensor, Tensor]:
        """(G(phi) [T], grad G(phi) [T, P]), detached; the proximal part in closed form."""
        return self.with_prox(phi, *value_and_grad(self.loss, phi))

    def with_prox(self, phi: Tensor, loss: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        """(G, grad G) at ``phi`` from the support loss's value and gradient there."""
        if not self.has_prox:
            return loss, grad
        diff = phi - self.theta
        return loss + self.penalty(diff), self.add_prox_grad(grad, diff)

    def objective(self, phi: Tensor) -> Tensor:
        """G(phi) [T], no gradient."""
        with torch.no_grad():
            val = self.loss(phi).detach()
        return val + self.penalty(phi - self.theta) if self.has_prox else val


def proximal_objective(support_loss, phi: Mapping[str, Tensor], theta: Mapping[str, Tensor], lam) -> Tensor:
    """G(phi) = L(phi) + 1/2 (phi - theta)^T Lam (phi - theta) for dicts (one task) -> 0-d tensor."""
    loss = support_loss(phi)
    if isinstance(lam, Mapping):
        return loss + 0.5 * sum(torch.sum(lam[k] * (phi[k] - theta[k]) ** 2) for k in phi)
    return loss + 0.5 * lam * sum(torch.sum((phi[k] - theta[k]) ** 2) for k in phi) if lam else loss


def _sufficient_decrease(new: Tensor, old: Tensor, predicted: Tensor) -> Tensor:
    """Armijo: G(new) <= G(old) + predicted (predicted = c1 t g'd < 0). Where the predicted decrease is within
    1024 x the rounding of G, the comparison of two values of G is noise: there a step that does not raise G
    beyond rounding passes, so that a converged solve does not stall on a rejected step."""
    noise = _rounding(new, old)
    return (new <= old + predicted) | (_negligible(-predicted, noise) & (new <= old + noise))


def _rounding(new: Tensor, old: Tensor) -> Tensor:
    """The rounding of a difference of two values of G: 16 eps max(|new|, |old|)."""
    return 16 * torch.finfo(old.dtype).eps * torch.maximum(old.abs(), new.abs())


def _negligible(decrease: Tensor, noise: Tensor) -> Tensor:
    """A predicted decrease within 1024 x the rounding of G, where comparing two values of G is noise."""
    return decrease <= 1024 * noise


def _rose(new: Tensor, old: Tensor) -> Tensor:
    # increases below 16 eps relative are rounding noise of a converged solve, not a failing one
    return new > old + 16 * torch.finfo(old.dtype).eps * old.abs()


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class _Run:
    """What every solve starts from and reports: phi = theta, G and grad G there, the stopping threshold, and
    the running rise flag, accepted-step and iteration counts (all per task)."""

    def __init__(
        self, solver: InnerSolver, problem: ProximalProblem, initial: tuple[Tensor, Tensor] | None = None
    ):
        self.problem = problem
        self.phi = problem.theta.clone()
        self.val, self.g = problem.value_and_grad(self.phi) if initial is None else initial
        self.residual0 = self.g.norm(dim=1)
        self.threshold = torch.clamp(solver.tol * self.residual0, min=solver.atol)
        self.done = ~(torch.isfinite(self.residual0) & (self.residual0 > self.threshold))
        self.rose = torch.zeros_like(self.done)
        self.accepted = torch.zeros_like(self.val)
        self.iterations = torch.zeros_like(self.val)

    def active(self) -> Tensor | None:
        """The tasks still solving, after counting this iteration for them; None when every task is done."""
        active = ~self.done
        if not bool(active.any()):
            return None
        self.iterations = self.iterations + active.to(self.iterations.dtype)
        return active

    def update_done(self) -> None:
        self.done = self.done | ~(self.g.norm(dim=1) > self.threshold)

    def subset(self, active: Tensor) -> tuple[Tensor | None, ProximalProblem, Tensor | None]:
        return subproblem(self.problem, active)

    def move(self, active: Tensor, phi: Tensor) -> None:
        """Active tasks go to ``phi`` (fixed-step solvers); G and grad G there, a rise recorded."""
        rows, problem, mask = self.subset(active)
        new, g = problem.value_and_grad(gather(rows, phi))
        step = torch.ones_like(new, dtype=torch.bool) if mask is None else mask
        self.phi = put(rows, self.phi, select_rows(step, gather(rows, phi), gather(rows, self.phi)))
        self.rose = self.rose | put(
            rows, torch.zeros_like(self.rose), step & _rose(new, gather(rows, self.val))
        )
        self.val = put(rows, self.val, torch.where(step, new, gather(rows, self.val)))
        self.g = put(rows, self.g, select_rows(step, g, gather(rows, self.g)))
        self.accepted = self.accepted + active.to(self.accepted.dtype)
        self.update_done()

    def result(self) -> tuple[Tensor, InnerInfo]:
        info = InnerInfo(
            self.g.norm(dim=1), self.residual0, self.rose, self.accepted, self.val, self.iterations
        )
        return self.phi, info


def subproblem(
    problem: ProximalProblem, active: Tensor
) -> tuple[Tensor | None, ProximalProblem, Tensor | None]:
    """``(rows, problem, mask)`` for work on the ``active`` tasks only: every task (rows and mask None); the
    active rows and their own sub-problem, so the other tasks cost nothing; or, for a loss that cannot be
    restricted, all rows with ``mask`` = active."""
    if bool(active.all()):
        return None, problem, None
    rows = active.nonzero().squeeze(1)
    sub = problem.select(rows)
    return (None, problem, active) if sub is None else (rows, sub, None)


def gather(rows: Tensor | None, t: Tensor) -> Tensor:
    """The rows ``rows`` of ``t`` (all of it for None)."""
    return t if rows is None else t.index_select(0, rows)


def put(rows: Tensor | None, full: Tensor, part: Tensor) -> Tensor:
    """``full`` with its rows ``rows`` replaced by ``part`` (``part`` itself for None)."""
    return part if rows is None else full.index_copy(0, rows, part)


SOLVERS: dict[str, type[InnerSolver]] = {}
"""Every inner solver by its ``name`` (filled by the classes themselves)."""


@dataclass(frozen=True)
class InnerSolver:
    """Base class of the inner solvers: ``steps`` iterations of at most step ``lr``, stopping a task early
    once its proximal gradient norm is at most ``max(atol, tol * residual0)``.

    A subclass sets ``name`` (its key in :data:`SOLVERS` and in configs: ``inner_optimizer: <name>``) and
    implements :meth:`solve`; its dataclass fields are its options.
    """

    name: ClassVar[str] = ""
    steps: int = 16
    lr: float = 0.1
    tol: float = 0.0
    atol: float = 0.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            SOLVERS[cls.name] = cls

    def __post_init__(self):
        _check_int("steps", self.steps, 0)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (self.tol >= 0 and self.atol >= 0):
            raise ValueError(f"tol and atol must be >= 0, got tol={self.tol!r}, atol={self.atol!r}")

    def solve(self, problem: ProximalProblem) -> tuple[Tensor, InnerInfo]:
        """phi ``[T, P]`` (detached) and the per-task :class:`InnerInfo`."""
        raise NotImplementedError

    def __call__(
        self,
        support_loss: Callable[[dict[str, Tensor]], Tensor],
        theta: Mapping[str, Tensor],
        lam: float | Mapping[str, Tensor] = 0.0,
    ) -> tuple[dict[str, Tensor], InnerInfo]:
        """One task with dicts: ``support_loss(phi: dict) -> 0-d``, theta a dict (may be nn.Parameters; they
        are detached); lam a number or a dict name -> tensor (0-d per parameter tensor, or its shape).
        Returns detached phi (a dict) and the :class:`InnerInfo` with 0-d fields."""
        if not isinstance(theta, Mapping) or not theta:
            raise ValueError(f"theta must be a non-empty dict name -> Tensor, got {type(theta).__name__}")
        spec = ParamSpec.of(theta)
        flat_theta = spec.flatten(detached(theta)).unsqueeze(0)
        if isinstance(lam, Mapping):
            check_lam_layout(lam, theta, "theta")
            lam = spec.expand(detached(lam))
        problem = ProximalProblem(
            lambda row: support_loss(spec.unflatten(row[0])).reshape(1), flat_theta, lam
        )
        phi, info = self.solve(problem)
        return spec.unflatten(phi[0]), InnerInfo(*(f[0] for f in info))


@dataclass(frozen=True)
class GD(InnerSolver):
    """Fixed-step proximal GD: phi <- phi - lr (grad L(phi) + lam (phi - theta)), the textbook iMAML-GD (and
    MAML's inner loop). Stable only while the top eigenvalue of the support Hessian stays below 2/lr - lam;
    past it G rises from step to step (``InnerInfo.rose``) and phi diverges. ``steps + 1`` gradients."""

    name: ClassVar[str] = "gd"

    def solve(self, problem):
        run = _Run(self, problem)
        for _ in range(self.steps):
            active = run.active()
            if active is None:
                break
            run.move(active, run.phi - self.lr * run.g)
        return run.result()


@dataclass(frozen=True)
class GDArmijo(InnerSolver):
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
    is the next step's gradient when accepted: ``steps + 1`` gradients, rejected trials included.
    """

    name: ClassVar[str] = "gd_armijo"
    armijo_c: float = 0.5
    backtrack: float = 0.5
    grow: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.armijo_c < 1:
            raise ValueError(f"armijo_c must be in (0, 1), got {self.armijo_c}")
        if not 0.1 <= self.backtrack < 1:
            raise ValueError(f"backtrack must be in [0.1, 1), got {self.backtrack}")
        if not self.grow >= 1:
            raise ValueError(f"grow must be >= 1, got {self.grow}")

    def solve(self, problem):
        c = self.armijo_c
        run = _Run(self, problem)
        gg = rowdot(run.g, run.g)
        t = torch.full_like(run.val, self.lr)
        grow_above = 1 - (1 - c) / self.grow
        for _ in range(self.steps):
            active = run.active()
            if active is None:
                break
            rows, sub, mask = run.subset(active)
            phi, g, val, gg_r, t_r = (gather(rows, x) for x in (run.phi, run.g, run.val, gg, t))
            trial = torch.addcmul(phi, -t_r[:, None], g)
            new, g_new = sub.value_and_grad(trial)
            predicted = t_r * gg_r
            noise = _rounding(new, val)
            # rho from values only where their difference is known to ~1e-3; else from the gradients
            measurable = ~_negligible(predicted, noise)
            rho_grads = 0.5 * (1 + rowdot(g_new, g) / gg_r)
            rho = torch.where(measurable, (val - new) / predicted, rho_grads)
            # gg == 0 (already stationary): rho is nan/inf; nothing to do, reject and keep phi
            ok = torch.isfinite(new) & torch.isfinite(rho) & (rho >= c) & (new <= val + noise)
            ok = ok if mask is None else ok & mask
            g = select_rows(ok, g_new, g)
            run.phi = put(rows, run.phi, select_rows(ok, trial, phi))
            run.g = put(rows, run.g, g)
            run.val = put(rows, run.val, torch.where(ok, new, val))
            gg = put(rows, gg, rowdot(g, g))
            # nan (rho nan) -> 0, +inf (rho = 1) -> max float, -inf -> -max float: the clamp below makes them
            # 0.1, backtrack, 0.1
            shrink = torch.nan_to_num(0.9 * (1 - c) / (1 - rho))
            rho_grow = torch.minimum(rho, rho_grads)  # grow only if both estimates allow it
            t_up = torch.where(rho_grow >= grow_above, torch.clamp(t_r * self.grow, max=self.lr), t_r)
            t_new = torch.where(ok, t_up, t_r * torch.clamp(shrink, 0.1, self.backtrack))
            t = put(rows, t, t_new if mask is None else torch.where(mask, t_new, t_r))
            run.accepted = run.accepted + put(rows, torch.zeros_like(run.accepted), ok.to(run.accepted.dtype))
            run.update_done()
        return run.result()


@dataclass(frozen=True)
class SGD(InnerSolver):
    """``torch.optim.SGD`` on G, step for step (momentum buffer from the first gradient, dampening, Nesterov,
    L2 ``weight_decay``). ``steps + 1`` gradients."""

    name: ClassVar[str] = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")

    def solve(self, problem):
        run = _Run(self, problem)
        buf = None
        for _ in range(self.steps):
            active = run.active()
            if active is None:
                break
            d = torch.add(run.g, run.phi, alpha=self.weight_decay) if self.weight_decay else run.g
            if self.momentum:
                buf = d if buf is None else self.momentum * buf + (1 - self.dampening) * d
                d = torch.add(d, buf, alpha=self.momentum) if self.nesterov else buf
            run.move(active, run.phi - self.lr * d)
        return run.result()


@dataclass(frozen=True)
class Adam(InnerSolver):
    """``torch.optim.Adam`` on G, step for step (bias corrections, L2 ``weight_decay``, ``amsgrad``).
    ``steps + 1`` gradients."""

    name: ClassVar[str] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False

    def solve(self, problem):
        beta1, beta2 = self.betas
        run = _Run(self, problem)
        m = torch.zeros_like(run.g)
        v = torch.zeros_like(run.g)
        vmax = v
        for step in range(1, self.steps + 1):
            active = run.active()
            if active is None:
                break
            d = torch.add(run.g, run.phi, alpha=self.weight_decay) if self.weight_decay else run.g
            m = m.lerp(d, 1 - beta1)  # as torch.optim.Adam
            v = v * beta2 + (1 - beta2) * d * d
            vmax = torch.maximum(vmax, v) if self.amsgrad else v
            size, bc2_sqrt = self.lr / (1 - beta1**step), (1 - beta2**step) ** 0.5  # as torch.optim.Adam
            run.move(active, run.phi - size * (m / (vmax.sqrt() / bc2_sqrt + self.eps)))
        return run.result()


@dataclass(frozen=True)
class TorchOptimizer(InnerSolver):
    """Any ``torch.optim`` optimiser class on G (RMSprop, Adagrad, ...), ``steps`` steps; ``kwargs`` go to its
    constructor. Each task is its own parameter tensor, so optimisers whose state is per parameter tensor
    (all of torch.optim but LBFGS) treat the tasks independently. ``steps + 1`` gradients."""

    name: ClassVar[str] = "torch"
    torch_optimizer: type[torch.optim.Optimizer] | str = "sgd"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        cls = self.torch_optimizer
        if isinstance(cls, str):
            known = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
            if cls.lower() in known:
                cls = known[cls.lower()]
            elif "." in cls:  # a class path, e.g. "torch.optim.RMSprop" (how checkpoints store it)
                module, _, attr = cls.rpartition(".")
                cls = getattr(importlib.import_module(module), attr, None)
            if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
                raise ValueError(
                    f"unknown torch_optimizer {self.torch_optimizer!r}; valid: 'sgd', 'adam', a class path "
                    "such as 'torch.optim.RMSprop', or a torch.optim.Optimizer subclass"
                )
            object.__setattr__(self, "torch_optimizer", cls)
        if cls is torch.optim.LBFGS:
            raise ValueError(
                "torch_optimizer=LBFGS couples all parameters (and tasks); use the 'lbfgs' solver"
            )

    def solve(self, problem):
        run = _Run(self, problem)
        rows = [r.clone().requires_grad_(True) for r in run.phi]
        opt = self.torch_optimizer(rows, lr=self.lr, **dict(self.kwargs))
        for _ in range(self.steps):
            active = run.active()
            if active is None:
                break
            for row, g in zip(rows, run.g, strict=True):
                row.grad = g.clone()
            opt.step()
            run.move(active, torch.stack([r.detach() for r in rows]))
        return run.result()


def _two_loop(g: Tensor, S: list[Tensor], Y: list[Tensor], rho: list[Tensor]) -> Tensor:
    """-H g per row by the L-BFGS two-loop recursion; history newest first, empty slots have rho = 0."""
    q = -g
    alphas = []
    for s, y, r in zip(S, Y, rho, strict=True):
        a = r * rowdot(s, q)
        q = torch.addcmul(q, -a[:, None], y)
        alphas.append(a)
    yy = rowdot(Y[0], Y[0])
    gamma = torch.where(rho[0] > 0, rowdot(S[0], Y[0]) / torch.where(yy > 0, yy, 1.0), 1.0)
    d = gamma[:, None] * q
    for s, y, r, a in reversed(list(zip(S, Y, rho, alphas, strict=True))):
        d = torch.addcmul(d, (a - r * rowdot(y, d))[:, None], s)
    return d


@dataclass(frozen=True)
class _Backtracking(InnerSolver):
    """The Armijo backtracking options that LBFGS and HessianFree share: a trial step t along d is accepted
    where G(phi + t d) <= G(phi) + c1 t g'd (and finite); else t shrinks by ``backtrack``."""

    c1: float = 1e-4
    backtrack: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.c1 < 1 and 0 < self.backtrack < 1):
            raise ValueError(
                f"c1 and backtrack must be in (0, 1), got c1={self.c1!r}, backtrack={self.backtrack!r}"
            )

    def _accepts(self, new: Tensor, old: Tensor, t: Tensor | float, slope: Tensor) -> Tensor:
        """Per task: G(trial) ``new`` meets Armijo's condition against ``old`` at step t, slope g'd."""
        return torch.isfinite(new) & _sufficient_decrease(new, old, self.c1 * t * slope)


@dataclass(frozen=True)
class LBFGS(_Backtracking):
    """L-BFGS on G: ``steps`` trial steps per task.

    Direction d = -H g by the two-loop recursion over the last ``history_size`` pairs (s, y) (initial
    scaling s'y / y'y; a pair enters only if s'y > 1e-10, so H stays positive definite); d = -g where it is
    not a descent direction. Step: one trial phi + t d per iteration, t = lr (the first one scaled
    min(1, 1/|g|_1) as torch.optim.LBFGS), accepted if G(phi + t d) <= G(phi) + c1 t g'd (Armijo), else
    t <- backtrack t for the next iteration. A task whose max |g| <= tolerance_grad stops moving.
    Unlike torch.optim.LBFGS (strong-Wolfe search, data-dependent evaluation counts) every task spends one
    evaluation per iteration, so the tasks batch.
    """

    name: ClassVar[str] = "lbfgs"
    steps: int = 8
    lr: float = 1.0
    history_size: int = 10
    tolerance_grad: float = 1e-10

    def __post_init__(self):
        super().__post_init__()
        _check_int("history_size", self.history_size, 1)

    def solve(self, problem):
        run = _Run(self, problem)
        zeros = torch.zeros_like(run.g)
        S, Y = [zeros] * self.history_size, [zeros] * self.history_size
        rho = [torch.zeros_like(run.val)] * self.history_size
        t = self.lr * torch.clamp(1.0 / run.g.abs().sum(1), max=1.0)
        # after k iterations at most k pairs are stored in any task: the recursion and the shift skip the
        # slots still empty everywhere (rho = 0 makes them no-ops, but each costs passes over [T, P])
        filled = 0
        for _ in range(self.steps):
            active = run.active()
            if active is None:
                break
            moving = active & (run.g.abs().amax(1) > self.tolerance_grad)
            d = _two_loop(run.g, S[:filled], Y[:filled], rho[:filled]) if filled else -run.g
            gtd = rowdot(run.g, d)
            descent = torch.isfinite(gtd) & (gtd < 0)
            d = select_rows(descent, d, -run.g)
            gtd = torch.where(descent, gtd, -rowdot(run.g, run.g))
            trial = torch.addcmul(run.phi, t[:, None], d)
            new, g_new = problem.value_and_grad(trial)
            ok = moving & self._accepts(new, run.val, t, gtd)
            s, y = trial - run.phi, g_new - run.g
            sy = rowdot(s, y)
            keep = ok & (sy > 1e-10)
            n = filled = min(filled + 1, self.history_size)
            S[:n] = [select_rows(keep, a, b) for a, b in zip([s, *S[: n - 1]], S[:n], strict=True)]
            Y[:n] = [select_rows(keep, a, b) for a, b in zip([y, *Y[: n - 1]], Y[:n], strict=True)]
            rho[:n] = [torch.where(keep, a, b) for a, b in zip([1 / sy, *rho[: n - 1]], rho[:n], strict=True)]
            run.phi, run.g = select_rows(ok, trial, run.phi), select_rows(ok, g_new, run.g)
            run.val = torch.where(ok, new, run.val)
            t = torch.where(ok, torch.full_like(t, self.lr), torch.where(moving, t * self.backtrack, t))
            run.accepted = run.accepted + ok.to(run.accepted.dtype)
            run.update_done()
        return run.result()


@dataclass(frozen=True)
class HessianFree(_Backtracking):
    """iMAML-HF: ``steps`` Newton-CG iterations on G.

    Each iteration: g = grad G(phi); d ~= -(B + Lam + mu I)^{-1} g by ``cg_steps`` steps of truncated CG, B
    the curvature of L at phi (``curvature="hessian"``: the Hessian H; ``"gauss_newton"``: the generalised
    Gauss-Newton matrix J^T H_out J, positive semi-definite for cross-entropy, as Martens' Hessian-free
    optimisation uses), matrix-free (the graph is built once per iteration, each product is one or two more
    backwards), mu = ``damping`` (adapted per task by Levenberg-Marquardt's rule with ``adapt_damping``: x 3/2
    where the step achieved less than 1/4 of the decrease the damped quadratic model predicted, x 2/3 above
    3/4; the model's curvature along d comes from CG, see :func:`newton_direction`); then backtracking
    phi <- phi + t d over t = lr, lr*backtrack, ... (``max_backtracks`` trials, values only) to the first t
    with G(phi + t d) <= G(phi) + c1 t g^T d. Where the matrix is not positive definite truncated CG stops at
    its last descent iterate, or -g on the first step, so d is always a descent direction. A task stops when
    no trial step decreases G (or its tolerance is met). ``accepted`` counts Newton steps taken; one more
    gradient for the report. Defaults: mu = 1, adapted, and 3 CG steps per direction (the iMAML-HF study's
    winners, README; the paper's 5 CG steps cost 1.4x the time for no measured gain);
    ``damping=0, adapt_damping=False`` is plain Newton-CG.
    """

    name: ClassVar[str] = "hf"
    steps: int = 5
    lr: float = 1.0
    cg_steps: int = 3
    max_backtracks: int = 10
    curvature: str = "hessian"
    damping: float = 1.0
    adapt_damping: bool = True

    def __post_init__(self):
        super().__post_init__()
        _check_int("cg_steps", self.cg_steps, 1)
        _check_int("max_backtracks", self.max_backtracks, 1)
        if self.curvature not in ("hessian", "gauss_newton"):
            raise ValueError(
                f"curvature must be 'hessian' or 'gauss_newton', got curvature={self.curvature!r}"
            )
        if not self.damping >= 0 or (self.adapt_damping and not self.damping > 0):
            raise ValueError(f"damping must be >= 0 (> 0 to adapt it), got damping={self.damping!r}")

    def _matrix(self, loss, phi: Tensor):
        if self.curvature == "gauss_newton":
            if not hasattr(loss, "outputs"):
                raise ValueError(
                    "curvature='gauss_newton' needs a TaskLoss (outputs and losses), got a plain loss"
                )
            return RetainedGGN(loss, phi)
        return RetainedHVP(loss, phi)

    def solve(self, problem):
        curv = self._matrix(problem.loss, problem.theta)  # G, grad G at theta and the graph there
        run = _Run(self, problem, initial=problem.with_prox(problem.theta, curv.value, curv.grad))
        mu = torch.full_like(run.val, self.damping)
        rows, sub, moved = None, problem, None  # the tasks curv covers; the tasks the last iteration moved
        for it in range(self.steps):
            if it:  # G, grad G and the graph at the new phi of the tasks that moved
                rows, sub, _ = subproblem(problem, moved)  # every loss here can be restricted or is all rows
                curv = self._matrix(sub.loss, gather(rows, run.phi))
                val, g = sub.with_prox(gather(rows, run.phi), curv.value, curv.grad)
                run.val, run.g = put(rows, run.val, val), put(rows, run.g, g)
                run.update_done()
            active = run.active()
            if active is None:
                break
            step, mu_r = self._newton_step(run, rows, sub, curv, gather(rows, active), gather(rows, mu))
            moved, mu = put(rows, torch.zeros_like(active), step), put(rows, mu, mu_r)
            del curv  # free this iteration's graph now, not when the next one is built
            run.accepted = run.accepted + moved.to(run.accepted.dtype)
            run.done = run.done | (active & ~moved)  # no step decreases G: this task is as far as it gets
            if not bool(moved.any()):
                break
        else:  # every step taken and the last one moved some tasks (moved is None only for steps = 0):
            if moved is not None:  # report G and grad G where they went
                rows, sub, _ = subproblem(problem, moved)
                val, g = sub.value_and_grad(gather(rows, run.phi))
                run.val, run.g = put(rows, run.val, val), put(rows, run.g, g)
        # Armijo with c1 > 0 accepts decreases only: G cannot rise
        return run.result()

    def _newton_step(self, run: _Run, rows, sub: ProximalProblem, curv, active: Tensor, mu: Tensor):
        """Direction by truncated CG and a backtracking line search for the tasks ``rows`` (``active`` among
        them); updates ``run.phi``; returns which of ``rows`` moved, and their damping for the next step."""
        g, phi, val = gather(rows, run.g), gather(rows, run.phi), gather(rows, run.val)

        def matvec(v):
            bv = curv(v)
            bv = sub.add_prox_grad(bv, v) if sub.has_prox else bv
            return torch.addcmul(bv, mu[:, None], v) if self.damping else bv

        d, slope, curvature_d = newton_direction(matvec, g, self.cg_steps)
        curvature_d = curvature_d if self.adapt_damping else None
        moved = torch.zeros_like(active)
        step, actual = torch.zeros_like(val), torch.zeros_like(val)  # per task: the step taken, G's change
        for j in range(self.max_backtracks):
            trying = active & ~moved
            if not bool(trying.any()):
                break
            t = self.lr * self.backtrack**j
            tr, tsub, tmask = subproblem(sub, trying)  # evaluate only the tasks still searching
            cand = torch.add(gather(tr, phi), gather(tr, d), alpha=t)
            f = tsub.objective(cand)
            old = gather(tr, val)
            ok = self._accepts(f, old, t, gather(tr, slope))
            ok = ok if tmask is None else ok & tmask
            phi = put(tr, phi, select_rows(ok, cand, gather(tr, phi)))
            now = put(tr, torch.zeros_like(moved), ok)
            step = torch.where(now, t, step)
            actual = put(tr, actual, torch.where(ok, f - old, gather(tr, actual)))
            moved = moved | now
        run.phi = put(rows, run.phi, phi)
        if curvature_d is not None:  # Levenberg-Marquardt: the achieved share of the model's decrease
            predicted = step * slope + 0.5 * step * step * curvature_d
            rho = torch.where(
                moved & (predicted < 0), actual / torch.where(predicted < 0, predicted, -1.0), 0.0
            )
            shrink_or_grow = torch.where(rho < 0.25, mu * 1.5, torch.where(rho > 0.75, mu / 1.5, mu))
            mu = torch.where(active, shrink_or_grow, mu)
        return moved, mu


def newton_direction(
    matvec: Callable[[Tensor], Tensor], g: Tensor, cg_steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """d ~= -A^{-1} g by ``cg_steps`` of truncated CG from 0 (``[T, P]``), its slope g^T d and its curvature
    d^T A d (``[T]`` each), with no product beyond CG's own: CG's iterate from 0 lies in the Krylov space its
    residual r is orthogonal to, so d^T A d = d^T (-g - r) = -g^T d. Where CG stopped before its first step
    (negative curvature) or d is not a descent direction (non-finite values), d = -g, whose curvature CG's
    first product A(-g) gave."""
    first = []

    def recording(v: Tensor) -> Tensor:
        av = matvec(v)
        if not first:  # CG's first product is on its first direction, b = -g
            first.append(rowdot(v, av))
        return av

    d, info = batched_conjugate_gradient(recording, -g, cg_steps, rtol=1e-12)
    slope = rowdot(g, d)
    # rows CG truncated before its first step already hold -g; otherwise only non-finite values fail the test
    descent = torch.isfinite(slope) & (slope < 0) & ~(info.negative_curvature & (info.steps == 0))
    d = select_rows(descent, d, -g)
    curvature = torch.where(descent, -slope, first[0] if first else torch.zeros_like(slope))
    slope = torch.where(descent, slope, -rowdot(g, g))
    return d, slope, curvature


def make_solver(name: str | InnerSolver, **options: Any) -> InnerSolver:
    """The solver registered as ``name`` with ``options`` (its dataclass fields); a solver object passes
    through unchanged (then ``options`` must be empty)."""
    if isinstance(name, InnerSolver):
        if options:
            raise ValueError(f"options {sorted(options)} given with a solver object {name!r}; set them on it")
        return name
    key = name.lower() if isinstance(name, str) else name
    if key not in SOLVERS:
        raise ValueError(f"unknown inner solver {name!r}; valid: {sorted(SOLVERS)}")
    cls = SOLVERS[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(options) - fields)
    if bad:
        raise ValueError(f"inner solver {key!r} takes only {sorted(fields)}, got unknown option(s) {bad}")
    return cls(**options)


def proximal_adapt(
    support_loss: Callable[[dict[str, Tensor]], Tensor],
    theta: Mapping[str, Tensor],
    lam: float | Mapping[str, Tensor],
    steps: int,
    optimizer: str | InnerSolver = "gd_armijo",
    lr: float | None = None,
    **options: Any,
) -> tuple[dict[str, Tensor], InnerInfo]:
    """Minimise L(phi) + lam/2 ||phi - theta||^2 from phi = theta with the solver named ``optimizer`` (one
    task, dicts): ``make_solver(optimizer, steps=steps, lr=lr, **options)(support_loss, theta, lam)``; a
    solver object runs with ``steps``, ``lr`` and ``options`` replacing its own. ``lr`` None takes the
    solver's (0.1 for the gradient methods, 1.0 for lbfgs / hf). Returns ``(phi, InnerInfo)``.
    """
    if lr is not None:
        options["lr"] = lr
    if isinstance(optimizer, InnerSolver):
        return dataclasses.replace(optimizer, steps=steps, **options)(support_loss, theta, lam)
    return make_solver(optimizer, steps=steps, **options)(support_loss, theta, lam)
