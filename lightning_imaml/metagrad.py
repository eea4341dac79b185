"""Per-task meta-gradients of iMAML, MAML and first-order MAML (pure torch, no Lightning import).

A *task* is ``(support_x, support_y, query_x, query_y)`` without the leading meta-batch dimension
(e.g. ``support_x [N*K, C, H, W]``, ``support_y [N*K]`` int64 for classification, or ``[K, d]`` /
``[K, 1]`` for regression). Parameters are dicts name -> Tensor as
:func:`torch.func.functional_call` takes them (``theta``: the meta-parameters, only the trainable
ones; the module's own tensors are used for everything not in the dict).

For a task with support loss ``L_s`` and query loss ``L_q`` the three meta-gradients are

* iMAML:   phi = argmin_phi L_s(phi) + lam/2 ||phi - theta||^2 (approximately, by an inner solver, no graph),
           g = (I + H/lam)^{-1} grad L_q(phi), H = d^2 L_s / d phi^2 at phi
           (CG, :mod:`lightning_imaml.implicit`)
* MAML:    phi_0 = theta, phi_{t+1} = phi_t - alpha (grad L_s(phi_t) + lam (phi_t - theta)),
           g = d L_q(phi_T) / d theta through the unrolled loop (create_graph; memory O(T))
* FOMAML:  same phi as iMAML's solver (for "gd": MAML's phi_T), g = grad L_q(phi) (Jacobian taken as I)

The Lightning glue (:mod:`lightning_imaml.meta`) averages them over the meta-batch.

Mixed precision: a ``ForwardCast`` (device type, dtype) makes only the model forward run under
``torch.autocast``; losses are computed in float32 and all CG / proximal / update arithmetic happens
on the float32 (or float64) parameters outside autocast, so bf16 rounding never enters the CG inner
products.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .implicit import implicit_meta_gradient, value_and_grad
from .inner import InnerInfo, proximal_adapt

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "ForwardCast",
    "TaskResult",
    "loss_for_task_type",
    "mse_loss",
    "make_task_loss",
    "task_forward",
    "imaml_task_meta_gradient",
    "maml_task_meta_gradient",
    "fomaml_task_meta_gradient",
    "adapt",
    "inner_diagnostics",
]


class ForwardCast(NamedTuple):
    """Autocast setting for model forwards only: ``torch.autocast(device_type, dtype)``."""

    device_type: str
    dtype: torch.dtype


class TaskResult(NamedTuple):
    """Meta-gradient of one task.

    grad: dict like theta (detached). query_loss: scalar L_q(phi) (detached). query_out: the model's
    query output at phi, e.g. logits [Q, n_way] (detached). support_loss: L_s(phi) without the proximal
    term, scalar (detached; NaN when not computed). info: solver diagnostics (0-d tensors), e.g.
    ``cg_steps``, ``cg_negative_curvature``, ``cg_residual``.
    """

    grad: Params
    query_loss: Tensor
    query_out: Tensor
    support_loss: Tensor
    info: dict[str, Tensor]
    lam_grad: Params = {}  # noqa: RUF012 - never mutated; d L_q / d lam per lam entry when lam is learned


def mse_loss(out: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, ``((out - target) ** 2).mean()``: the value of ``F.mse_loss``, written out because
    the batched path's Hessian-vector products (jvp of grad under vmap) fail on ``F.mse_loss`` in torch
    2.14.1 ("ZeroTensors are immutable")."""
    return ((out - target) ** 2).mean()


def loss_for_task_type(task_type: str) -> LossFn:
    """Cross-entropy for "classification" (logits [n, C], int64 targets [n]), mean squared error for
    "regression" (predictions and targets of equal shape, e.g. [n, 1])."""
    if task_type == "classification":
        return F.cross_entropy
    if task_type == "regression":
        return mse_loss
    raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")


def _autocast_ctx(cast: ForwardCast | None):
    if cast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=cast.device_type, dtype=cast.dtype)


def task_forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, cast: ForwardCast | None = None):
    """``model(x)`` with ``params`` substituted (functional_call). Low-precision outputs of an autocast
    forward are returned in float32 so that losses and everything after them run in float32."""
    with _autocast_ctx(cast):
        out = functional_call(model, dict(params), (x,))
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    return out


def make_task_loss(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, cast: ForwardCast | None = None
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """Closure ``params -> loss_fn(model(x; params), y)``, a scalar."""

    def loss(params: Mapping[str, Tensor]) -> Tensor:
        return loss_fn(task_forward(model, params, x, cast), y)

    return loss


def _leaf_copy(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def _grad_or_zeros(loss: Tensor, params: Params, create_graph: bool = False) -> Params:
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
    return {
        k: (torch.zeros_like(p) if g is None else g) for (k, p), g in zip(params.items(), grads, strict=True)
    }


def _query_grad(
    query_loss: Callable, phi: Mapping[str, Tensor], model, qx, cast
) -> tuple[Params, Tensor, Tensor]:
    """grad L_q at phi (detached), the query loss and the query output."""

    def loss_and_out(p):
        out = task_forward(model, p, qx, cast)
        return query_loss(out), out

    loss, grad, out = value_and_grad(loss_and_out, phi, has_aux=True)
    return grad, loss, out


def adapt(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    *,
    loss_fn: LossFn,
    lam: float,
    steps: int,
    lr: float,
    optimizer: str = "gd",
    hf_cg_steps: int = 5,
    optimizer_kwargs: Mapping[str, Any] | None = None,
    cast: ForwardCast | None = None,
    return_info: bool = False,
):
    """Inner adaptation: phi ~ argmin L_s(phi) + lam/2 ||phi - theta||^2 from phi = theta, detached.

    Thin wrapper over :func:`lightning_imaml.inner.proximal_adapt`; lam = 0 is plain fine-tuning and
    steps = 0 returns a detached copy of theta. ``return_info``: ``(phi, InnerInfo)``.
    """
    theta = {k: v.detach() for k, v in theta.items()}
    support_loss = make_task_loss(model, support_x, support_y, loss_fn, cast)
    return proximal_adapt(
        support_loss,
        theta,
        lam=lam,
        steps=steps,
        optimizer=optimizer,
        lr=lr,
        hf_cg_steps=hf_cg_steps,
        return_info=return_info,
        **dict(optimizer_kwargs or {}),
    )


def inner_diagnostics(info: InnerInfo) -> dict[str, Tensor]:
    """Per-task 0-d tensors logged by the learners: the proximal gradient norm at phi (``inner_residual``),
    it relative to ||grad L_s(theta)|| (``inner_residual_rel``), whether G rose (``inner_rose``, 0/1) and
    the steps taken (``inner_accepted``)."""
    res, res0 = info.residual, info.residual0
    return {
        "inner_residual": res,
        "inner_residual_rel": torch.where(res0 > 0, res / torch.where(res0 > 0, res0, 1.0), 0.0),
        "inner_rose": info.rose.to(res.dtype),
        "inner_accepted": info.accepted.to(res.dtype),
    }


def _adapt_and_query(model, theta, task, loss_fn, lam, steps, lr, optimizer, hf_cg_steps, options, cast):
    """phi (by the inner solver, with its InnerInfo), then grad L_q(phi), L_q(phi) and the query output."""
    sx, sy, qx, qy = task
    phi, inner_info = adapt(
        model, theta, sx, sy, loss_fn=loss_fn, lam=lam, steps=steps, lr=lr, optimizer=optimizer,
        hf_cg_steps=hf_cg_steps, optimizer_kwargs=options, cast=cast, return_info=True,
    )  # fmt: skip
    qgrad, qloss, qout = _query_grad(lambda out: loss_fn(out, qy), phi, model, qx, cast)
    return phi, inner_info, qgrad, qloss, qout


def imaml_task_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    task: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    loss_fn: LossFn,
    lam: float | Mapping[str, Tensor],
    inner_steps: int,
    inner_lr: float,
    inner_optimizer: str = "gd_armijo",
    cg_steps: int = 5,
    cg_damping: float = 0.0,
    hf_cg_steps: int = 5,
    inner_optimizer_kwargs: Mapping[str, Any] | None = None,
    cast: ForwardCast | None = None,
    lam_grad: bool = False,
) -> TaskResult:
    """iMAML meta-gradient of one task: ((1 + cg_damping) I + H/lam)^{-1} grad L_q(phi).

    phi comes from the inner solver (detached, so memory is independent of ``inner_steps``); H is
    the support-loss Hessian at phi, used only through Hessian-vector products inside CG. ``lam`` may be
    per parameter (dict name -> tensor, see :func:`lightning_imaml.implicit.implicit_meta_gradient`);
    ``lam_grad=True`` also returns dF/dlam (from the same CG solve).
    """
    sx, sy, qx, qy = task
    phi, inner_info, qgrad, qloss, qout = _adapt_and_query(
        model, theta, task, loss_fn, lam, inner_steps, inner_lr, inner_optimizer, hf_cg_steps,
        inner_optimizer_kwargs, cast,
    )  # fmt: skip
    support_loss = make_task_loss(model, sx, sy, loss_fn, cast)
    grad, *extra, info = implicit_meta_gradient(
        support_loss, phi, qgrad, lam=lam, cg_steps=cg_steps, cg_damping=cg_damping, return_info=True,
        theta=theta, return_lam_grad=lam_grad,
    )  # fmt: skip
    with torch.no_grad():
        sloss = support_loss(phi).detach()
    diag = {
        "cg_steps": info.steps.to(sloss.dtype),
        "cg_residual": info.residual_norm,
        "cg_negative_curvature": info.negative_curvature.to(sloss.dtype),
        **inner_diagnostics(inner_info),
    }
    dlam = extra[0] if extra else {}
    if lam_grad and not isinstance(dlam, Mapping):
        dlam = {"": dlam}  # a number lam: one entry
    return TaskResult({k: v.detach() for k, v in grad.items()}, qloss, qout, sloss, diag, dlam)


def maml_task_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    task: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    loss_fn: LossFn,
    lam: float = 0.0,
    inner_steps: int = 1,
    inner_lr: float = 0.1,
    first_order: bool = False,
    cast: ForwardCast | None = None,
) -> TaskResult:
    """MAML meta-gradient of one task by differentiating the unrolled inner loop.

    phi_0 = theta, phi_{t+1} = phi_t - alpha (grad L_s(phi_t) + lam (phi_t - theta)), t < T = inner_steps;
    returns d L_q(phi_T) / d theta. Second order (``first_order=False``) keeps every step's graph
    (``create_graph=True``): memory and time grow linearly with T. With ``first_order=True`` every inner
    gradient, proximal term included, is detached, so d phi_T / d theta = I and the result is
    grad L_q(phi_T), first-order MAML. Keeping only the proximal term differentiable would give the same:
    d phi_{t+1}/d theta = (1 - alpha lam) d phi_t/d theta + alpha lam I stays I from d phi_0/d theta = I.
    """
    sx, sy, qx, qy = task
    theta_leaf = _leaf_copy(theta)
    support_loss = make_task_loss(model, sx, sy, loss_fn, cast)
    phi: Params = dict(theta_leaf)
    for _ in range(inner_steps):
        loss = support_loss(phi)
        if lam:
            loss = loss + 0.5 * lam * sum(((phi[k] - theta_leaf[k]) ** 2).sum() for k in phi)
        g = _grad_or_zeros(loss, phi, create_graph=not first_order)
        phi = {k: phi[k] - inner_lr * g[k] for k in phi}
    out = task_forward(model, phi, qx, cast)
    qloss = loss_fn(out, qy)
    grad = _grad_or_zeros(qloss, theta_leaf)
    with torch.no_grad():
        sloss = support_loss({k: v.detach() for k, v in phi.items()})
    return TaskResult(grad, qloss.detach(), out.detach(), sloss, {})


def fomaml_task_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    task: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    loss_fn: LossFn,
    lam: float = 0.0,
    inner_steps: int = 1,
    inner_lr: float = 0.1,
    inner_optimizer: str = "gd",
    hf_cg_steps: int = 5,
    inner_optimizer_kwargs: Mapping[str, Any] | None = None,
    cast: ForwardCast | None = None,
) -> TaskResult:
    """First-order MAML: grad L_q(phi) with phi from the (detached) inner solver; memory flat in T.

    With ``inner_optimizer="gd"`` phi is exactly MAML's phi_T.
    """
    sx, sy, _, _ = task
    phi, inner_info, grad, qloss, qout = _adapt_and_query(
        model, theta, task, loss_fn, lam, inner_steps, inner_lr, inner_optimizer, hf_cg_steps,
        inner_optimizer_kwargs, cast,
    )  # fmt: skip
    with torch.no_grad():
        sloss = make_task_loss(model, sx, sy, loss_fn, cast)(phi).detach()
    return TaskResult(grad, qloss, qout, sloss, inner_diagnostics(inner_info))
