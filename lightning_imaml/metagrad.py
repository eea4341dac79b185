"""Meta-gradients of iMAML, MAML and first-order MAML for a batch of tasks (pure torch, no Lightning).

Tasks are ``(support_x, support_y, query_x, query_y)`` with a leading task dimension T (e.g. ``support_x
[T, N*K, C, H, W]``, ``support_y [T, N*K]`` int64 for classification, ``[T, K, 1]`` for regression).
``theta`` is the meta-parameters as a dict name -> Tensor (the trainable ones; the module's own tensors are
used for everything else); every function returns one row per task. For task t with support loss L_s and
query loss L_q:

* iMAML:   phi = argmin_phi L_s(phi) + lam/2 ||phi - theta||^2 (approximately, by an inner solver, no graph),
           g = (I + H/lam)^{-1} grad L_q(phi), H = d^2 L_s / d phi^2 at phi (CG on Hessian-vector products)
* MAML:    phi_0 = theta, phi_{k+1} = phi_k - alpha (grad L_s(phi_k) + lam (phi_k - theta)),
           g = d L_q(phi_K) / d theta through the unrolled loop (create_graph; memory O(K))
* FOMAML:  phi from the inner solver, g = grad L_q(phi) (Jacobian taken as I)

Mixed precision: a :class:`ForwardCast` makes only the model forwards run under ``torch.autocast``; losses,
CG and solver arithmetic run on the float32 (or float64) parameters, so bf16 rounding never enters them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cg import CG
from .functional import ForwardCast, TaskLoss, mse_loss, task_forward
from .implicit import RetainedHVP, implicit_solve
from .inner import InnerInfo, InnerSolver, ProximalProblem
from .params import ParamSpec, detached

__all__ = [
    "ForwardCast",
    "TaskResults",
    "Tasks",
    "adapt",
    "adapt_tasks",
    "fomaml_meta_gradient",
    "imaml_meta_gradient",
    "inner_diagnostics",
    "loss_for_task_type",
    "make_task_loss",
    "maml_meta_gradient",
    "mse_loss",
    "task_forward",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Tasks = tuple[Tensor, Tensor, Tensor, Tensor]


class TaskResults(NamedTuple):
    """Meta-gradients of T tasks, one row each.

    grad: ``[T, P]`` (the layout of ``ParamSpec.of(theta)``). query_loss ``[T]``: L_q(phi). query_out: the
    model's query outputs at phi, e.g. logits ``[T, Q, n_way]``. support_loss ``[T]``: L_s(phi) without the
    proximal term. info: solver diagnostics, name -> ``[T]``. lam_grad: dF/dlam per entry of a ``[P]`` lam
    (``[T, P]``), or ``[T]`` for a number lam; None unless asked for.
    """

    grad: Tensor
    query_loss: Tensor
    query_out: Tensor
    support_loss: Tensor
    info: dict[str, Tensor]
    lam_grad: Tensor | None = None


def make_task_loss(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, cast: ForwardCast | None = None
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """One task's loss as a function of a parameter dict: ``params -> loss_fn(model(x; params), y)``."""

    def loss(params: Mapping[str, Tensor]) -> Tensor:
        return loss_fn(task_forward(model, params, x, cast), y)

    return loss


def loss_for_task_type(task_type: str) -> LossFn:
    """Cross-entropy for "classification" (logits [n, C], int64 targets [n]), mean squared error for
    "regression" (predictions and targets of equal shape, e.g. [n, 1])."""
    if task_type == "classification":
        return F.cross_entropy
    if task_type == "regression":
        return mse_loss
    raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")


def inner_diagnostics(info: InnerInfo) -> dict[str, Tensor]:
    """Per-task tensors the learners log: the proximal gradient norm at phi (``inner_residual``), it relative
    to ||grad L_s(theta)|| (``inner_residual_rel``), whether G rose (``inner_rose``, 0/1), the steps taken
    (``inner_accepted``) and the iterations run before the task's tolerance was met (``inner_iterations``)."""
    res, res0 = info.residual, info.residual0
    return {
        "inner_residual": res,
        "inner_residual_rel": torch.where(res0 > 0, res / torch.where(res0 > 0, res0, 1.0), 0.0),
        "inner_rose": info.rose.to(res.dtype),
        "inner_accepted": info.accepted.to(res.dtype),
        "inner_iterations": info.iterations.to(res.dtype),
    }


def _setup(model, theta, tasks, loss_fn, cast, mode):
    sx, sy, qx, qy = tasks
    spec = ParamSpec.of(theta)
    th = spec.flatten(detached(theta)).expand(sx.shape[0], spec.numel)
    support = TaskLoss(model, spec, sx, sy, loss_fn, cast, mode)
    query = TaskLoss(model, spec, qx, qy, loss_fn, cast, mode)
    return spec, th, support, query


def _query_grad(query: TaskLoss, phi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(L_q(phi) [T], grad L_q(phi) [T, P], outputs), detached."""
    with torch.enable_grad():
        leaf = phi.detach().requires_grad_(True)
        out = query.outputs(leaf)
        loss = query.losses(out)
        (g,) = torch.autograd.grad(loss.sum(), leaf)  # the forward reads views of leaf
    return loss.detach(), g, out.detach()


def _flat_lam(lam, spec: ParamSpec, like: Tensor) -> float | Tensor:
    if isinstance(lam, Mapping):
        return spec.expand({k: v.detach() for k, v in lam.items()}).to(like.dtype)
    return float(lam)


def imaml_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    tasks: Tasks,
    *,
    loss_fn: LossFn,
    lam: float | Mapping[str, Tensor],
    solver: InnerSolver,
    cg: CG = CG(),  # noqa: B008 - frozen
    cg_damping: float = 0.0,
    cast: ForwardCast | None = None,
    lam_grad: bool = False,
    mode: str = "auto",
) -> TaskResults:
    """iMAML meta-gradient of every task: ((1 + cg_damping) I + H/lam)^{-1} grad L_q(phi).

    phi comes from ``solver`` (detached, so memory is independent of its steps); H is the support-loss
    Hessian at phi, used only through Hessian-vector products inside ``cg``. ``lam`` may be per parameter
    (dict name -> tensor, see :func:`lightning_imaml.implicit.implicit_solve`); ``lam_grad=True`` also returns
    dF/dlam from the same solve. ``mode``: how the tasks' forward is evaluated
    (:func:`lightning_imaml.functional.forward_tasks`).
    """
    spec, th, support, query = _setup(model, theta, tasks, loss_fn, cast, mode)
    lam_flat = _flat_lam(lam, spec, th)
    phi, inner = solver.solve(ProximalProblem(support, th, lam_flat))
    qloss, qgrad, qout = _query_grad(query, phi)
    hvp = RetainedHVP(support, phi)  # also gives L_s(phi), so no separate forward for the report
    x, dlam, info = implicit_solve(hvp, qgrad, lam_flat, cg, cg_damping, phi - th if lam_grad else None)
    diag = {
        "cg_steps": info.steps.to(qloss.dtype),
        "cg_residual": info.residual_norm,
        "cg_negative_curvature": info.negative_curvature.to(qloss.dtype),
        **inner_diagnostics(inner),
    }
    return TaskResults(x, qloss, qout, hvp.value, diag, dlam)


def maml_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    tasks: Tasks,
    *,
    loss_fn: LossFn,
    lam: float = 0.0,
    inner_steps: int = 1,
    inner_lr: float = 0.1,
    first_order: bool = False,
    cast: ForwardCast | None = None,
    mode: str = "auto",
) -> TaskResults:
    """MAML meta-gradient of every task by differentiating the unrolled inner loop.

    phi_0 = theta, phi_{k+1} = phi_k - alpha (grad L_s(phi_k) + lam (phi_k - theta)), k < K = inner_steps;
    returns d L_q(phi_K) / d theta. Second order (``first_order=False``) keeps every step's graph
    (``create_graph=True``): memory and time grow linearly with K. With ``first_order=True`` every inner
    gradient, proximal term included, is detached, so d phi_K / d theta = I and the result is
    grad L_q(phi_K), first-order MAML.
    """
    spec, th, support, query = _setup(model, theta, tasks, loss_fn, cast, mode)
    with torch.enable_grad():
        theta_leaf = th.clone().requires_grad_(True)
        phi = theta_leaf
        for _ in range(inner_steps):
            loss = support(phi)
            if lam:
                loss = loss + 0.5 * lam * ((phi - theta_leaf) ** 2).sum(1)
            (g,) = torch.autograd.grad(loss.sum(), phi, create_graph=not first_order)
            phi = phi - inner_lr * g
        out = query.outputs(phi)
        qloss = query.losses(out)
        (grad,) = torch.autograd.grad(qloss.sum(), theta_leaf)  # the forward reads views of theta_leaf
    with torch.no_grad():
        sloss = support(phi.detach())
    return TaskResults(grad, qloss.detach(), out.detach(), sloss, {})


def fomaml_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    tasks: Tasks,
    *,
    loss_fn: LossFn,
    lam: float = 0.0,
    solver: InnerSolver,
    cast: ForwardCast | None = None,
    mode: str = "auto",
) -> TaskResults:
    """First-order MAML: grad L_q(phi) with phi from the (detached) inner solver; memory flat in its steps.
    With the ``GD`` solver phi is exactly MAML's phi_K."""
    spec, th, support, query = _setup(model, theta, tasks, loss_fn, cast, mode)
    phi, inner = solver.solve(ProximalProblem(support, th, _flat_lam(lam, spec, th)))
    qloss, qgrad, qout = _query_grad(query, phi)
    with torch.no_grad():
        sloss = support(phi)
    return TaskResults(qgrad, qloss, qout, sloss, inner_diagnostics(inner))


def adapt_tasks(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    *,
    loss_fn: LossFn,
    lam: float | Mapping[str, Tensor],
    solver: InnerSolver,
    cast: ForwardCast | None = None,
    mode: str = "auto",
) -> tuple[dict[str, Tensor], InnerInfo]:
    """Inner adaptation of T tasks at once (``support_x [T, ...]``): phi ~ argmin L_s(phi) + lam/2 ||phi -
    theta||^2 from phi = theta. Returns phi as a dict of ``[T, *shape]`` tensors (detached) and the
    :class:`InnerInfo` (``[T]`` fields)."""
    spec = ParamSpec.of(theta)
    th = spec.flatten(detached(theta)).expand(support_x.shape[0], spec.numel)
    support = TaskLoss(model, spec, support_x, support_y, loss_fn, cast, mode)
    phi, info = solver.solve(ProximalProblem(support, th, _flat_lam(lam, spec, th)))
    return spec.unflatten(phi), info


def adapt(
    model: nn.Module, theta: Mapping[str, Tensor], support_x: Tensor, support_y: Tensor, **options: Any
) -> tuple[dict[str, Tensor], InnerInfo]:
    """One task (``support_x [n, ...]``): :func:`adapt_tasks` with T = 1 and its keyword ``options``
    (``loss_fn``, ``lam``, ``solver``, ``cast``); phi a dict like theta, 0-d info."""
    phi, info = adapt_tasks(
        model, theta, support_x.unsqueeze(0), support_y.unsqueeze(0), **{**options, "mode": "loop"}
    )
    return {k: v[0] for k, v in phi.items()}, InnerInfo(*(f[0] for f in info))
