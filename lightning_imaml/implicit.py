"""The implicit meta-gradient: exact Hessian-vector products and iMAML's linear solve
((1 + d) I + H / lam) x = g_query (Rajeswaran et al., 2019, eq. 7 / Alg. 2), by conjugate gradient.

Pure torch. The engine works on a batch of T tasks at once: parameters are one ``[T, P]`` tensor and a loss
maps it to the T per-task losses ``[T]``. Because task t's loss depends only on row t, one backward pass of
their sum gives every task's own gradient, and one more backward through that gradient's graph gives every
task's own Hessian-vector product (the Hessian of the sum is block diagonal). The dict functions
(:func:`hessian_vector_product`, :func:`grad_and_hvp`, :func:`implicit_meta_gradient`) solve one task with
parameters as the dicts ``torch.func.functional_call`` takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .cg import CG, CGInfo
from .params import ParamSpec, check_lam_layout, check_same_structure, detached, rowdot

__all__ = [
    "ImplicitGradient",
    "RetainedGGN",
    "RetainedHVP",
    "grad_and_hvp",
    "hessian_vector_product",
    "implicit_meta_gradient",
    "implicit_solve",
    "value_and_grad",
]

TaskLossFn = Callable[[Tensor], Tensor]  # [T, P] -> [T]


def value_and_grad(loss: TaskLossFn, phi: Tensor) -> tuple[Tensor, Tensor]:
    """``(loss(phi), d loss / d phi)`` detached, for per-task losses ``[T]`` of ``phi [T, P]``: one backward
    of their sum (rows do not interact). Runs under ``torch.no_grad`` too (it re-enables grad locally)."""
    with torch.enable_grad():
        leaf = phi.detach().requires_grad_(True)
        val = loss(leaf)
        (g,) = torch.autograd.grad(val.sum(), leaf, allow_unused=True) if val.requires_grad else (None,)
    return val.detach(), torch.zeros_like(leaf) if g is None else g


class RetainedHVP:
    """``v -> H v`` row by row at ``phi [T, P]``, H_t the Hessian of task t's loss. The forward and the first
    backward are done once (``create_graph``); each product is then one backward through that gradient's
    graph. ``value`` and ``grad`` hold the losses ``[T]`` and gradients ``[T, P]`` at ``phi`` (detached)."""

    def __init__(self, loss: TaskLossFn, phi: Tensor):
        with torch.enable_grad():
            self._leaf = phi.detach().requires_grad_(True)
            val = loss(self._leaf)
            (g,) = (
                torch.autograd.grad(val.sum(), self._leaf, create_graph=True, allow_unused=True)
                if val.requires_grad
                else (None,)
            )
        self.value = val.detach()
        self._g = torch.zeros_like(self._leaf) if g is None else g
        self.grad = self._g.detach()

    def __call__(self, v: Tensor) -> Tensor:
        if not self._g.requires_grad:  # loss linear in phi (or ignoring it): H = 0
            return torch.zeros_like(v)
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(self._g, self._leaf, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv


class RetainedGGN:
    """``v -> G v`` row by row at ``phi [T, P]``: the generalised Gauss-Newton matrix G_t = J_t^T H_out J_t of
    task t's loss (J = d outputs / d phi, H_out = d^2 loss / d outputs^2: positive semi-definite for
    cross-entropy and squared error, unlike the Hessian). ``loss`` must expose ``outputs(phi)`` and
    ``losses(outputs)`` (a :class:`~lightning_imaml.functional.TaskLoss`). J v by the double-backward trick
    (the derivative along u of J^T u), J^T w by one backward; ``value`` and ``grad`` as
    :class:`RetainedHVP`."""

    def __init__(self, loss, phi: Tensor):
        with torch.enable_grad():
            self._leaf = phi.detach().requires_grad_(True)
            self._out = loss.outputs(self._leaf)
            val = loss.losses(self._out)
            (g_out,) = torch.autograd.grad(val.sum(), self._out, create_graph=True)
            self._g_out = g_out  # d loss / d outputs, differentiable again: H_out w by one more backward
            # the outputs depend on phi (a network of these parameters), so no gradient here is None
            (g,) = torch.autograd.grad(self._out, self._leaf, g_out.detach(), retain_graph=True)
            self._u = torch.zeros_like(self._out, requires_grad=True)
            (self._jt_u,) = torch.autograd.grad(self._out, self._leaf, self._u, create_graph=True)
        self.value = val.detach()
        self.grad = g.detach()

    def __call__(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(self._jt_u, self._u, v, retain_graph=True)  # J v
            (hjv,) = torch.autograd.grad(self._g_out, self._out, jv, retain_graph=True)  # H_out J v
            (gv,) = torch.autograd.grad(self._out, self._leaf, hjv, retain_graph=True)
        return gv


def implicit_solve(
    hvp: Callable[[Tensor], Tensor],
    query_grad: Tensor,
    lam: float | Tensor,
    cg: CG = CG(),  # noqa: B008 - frozen
    damping: float = 0.0,
    diff: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, CGInfo]:
    """iMAML's per-task linear solve for T tasks: x = ((1 + d) I + H / lam)^{-1} g, rows of ``[T, P]``.

    lam: a number, or a ``[P]`` tensor (a diagonal Lam: one value per scalar parameter; the inner problem
    min L_s(phi) + 1/2 (phi - theta)^T Lam (phi - theta)). With y solving (H + (1 + d) Lam) y = g,
    dF/dtheta = Lam y and dF/dLam_i = -y_i (phi - theta)_i -- no extra Hessian-vector product. A tensor lam is
    solved as the symmetric, O(1)-scaled system ((1 + d) I + S H S) z = S g, S = Lam^{-1/2}, y = S z, so CG's
    curvature threshold keeps its meaning. ``diff`` = phi - theta ``[T, P]`` adds dF/dLam per entry
    (``[T, P]``; for a number lam, dF/dlam ``[T]``). Returns ``(x, lam_grad or None, CGInfo)``.
    """
    diag = 1.0 + damping
    if not isinstance(lam, Tensor):
        inv_lam = 1.0 / lam
        x, info = cg(lambda v: torch.add(v * diag, hvp(v), alpha=inv_lam), query_grad)
        y = x * inv_lam  # (H + (1 + d) lam I)^{-1} g
        lam_grad = None if diff is None else -rowdot(y, diff)
        return x, lam_grad, info
    scale = lam.to(query_grad.dtype).rsqrt()  # cast first: rsqrt at the gradient's precision
    z, info = cg(lambda v: v * diag + scale * hvp(scale * v), scale * query_grad)
    y = scale * z
    return z / scale, None if diff is None else -(y * diff), info


# ------------------------------------------------------------------------------------- one task, dicts


def _row_loss(loss_fn: Callable[[dict[str, Tensor]], Tensor], spec: ParamSpec) -> TaskLossFn:
    """A dict loss of one task as a loss of ``[1, P]`` rows."""
    return lambda row: loss_fn(spec.unflatten(row[0])).reshape(1)


def hessian_vector_product(
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    v: Mapping[str, Tensor],
    method: str = "double_backward",
) -> dict[str, Tensor]:
    """Exact H v, H = d^2 loss_fn / d params^2 at ``params`` (dicts name -> Tensor, one task; detached).

    ``loss_fn(params) -> 0-d tensor`` must be a pure function of ``params`` (e.g. built with
    ``torch.func.functional_call``). method: "double_backward" (torch.autograd.grad twice; the engine's way)
    or "forward_over_reverse" (``torch.func.jvp`` of ``torch.func.grad``; fails on ``F.mse_loss`` in torch
    2.14.1: "ZeroTensors are immutable").
    """
    check_same_structure(params, v, ("params", "v"))
    if method == "forward_over_reverse":
        return torch.func.jvp(torch.func.grad(loss_fn), (detached(params),), (detached(v),))[1]
    if method != "double_backward":
        raise ValueError(f"unknown method {method!r}; valid: 'double_backward', 'forward_over_reverse'")
    spec = ParamSpec.of(params)
    hv = RetainedHVP(_row_loss(loss_fn, spec), spec.flatten(params).unsqueeze(0))
    return spec.unflatten(hv(spec.flatten(v).unsqueeze(0).to(hv.grad.dtype))[0])


def grad_and_hvp(loss_fn: Callable[[dict[str, Tensor]], Tensor], params: Mapping[str, Tensor]):
    """``(L(params), grad L(params), v -> H v)`` at ``params`` for one task (dicts; values detached): one
    forward and one backward with ``create_graph``, then one more backward per product."""
    spec = ParamSpec.of(params)
    hv = RetainedHVP(_row_loss(loss_fn, spec), spec.flatten(params).unsqueeze(0))
    return (
        hv.value[0],
        spec.unflatten(hv.grad[0]),
        lambda v: spec.unflatten(hv(spec.flatten(v).unsqueeze(0))[0]),
    )


class ImplicitGradient(NamedTuple):
    """Result of :func:`implicit_meta_gradient`.

    grad: dF/dtheta, like ``params``. lam_grad: dF/dlam (a 0-d tensor for a number lam, a dict like ``lam``
    otherwise), or None when ``theta`` was not given. info: the CG solve (0-d fields).
    """

    grad: dict[str, Tensor]
    lam_grad: Tensor | dict[str, Tensor] | None
    info: CGInfo


def _check_lam(lam, params) -> float | dict[str, Tensor]:
    if isinstance(lam, Mapping):
        check_lam_layout(lam, params)
        bad = [k for k, v in lam.items() if not bool(torch.isfinite(v).all() & (v > 0).all())]
        if bad:
            raise ValueError(
                f"every per-parameter lam must be > 0 and finite for the implicit gradient: {bad}"
            )
        return dict(lam)
    if not (isinstance(lam, (int, float)) or (isinstance(lam, Tensor) and lam.numel() == 1)):
        raise ValueError(f"lam must be a positive number or a dict name -> tensor, got {lam!r}")
    lam = float(lam)
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(
            f"lam must be > 0 and finite for the implicit gradient (it divides H), got lam={lam}; "
            "lam = 0 means no proximal term, where the implicit gradient does not exist"
        )
    return lam


def implicit_meta_gradient(
    inner_loss: Callable[[dict[str, Tensor]], Tensor],
    params: Mapping[str, Tensor],
    query_grad: Mapping[str, Tensor],
    lam: float | Mapping[str, Tensor],
    cg_steps: int = 5,
    cg_damping: float = 0.0,
    rtol: float = 1e-10,
    theta: Mapping[str, Tensor] | None = None,
) -> ImplicitGradient:
    """iMAML meta-gradient of one task: ((1 + cg_damping) I + H / lam)^{-1} g by ``cg_steps`` steps of CG.

    params (phi), query_grad (g): dicts name -> Tensor with identical keys/shapes; H = d^2 inner_loss / d
    phi^2 at phi (the support loss WITHOUT the proximal term), used only through H v.

    Why: phi*(theta) = argmin_phi L_support(phi) + lam/2 ||phi - theta||^2 satisfies
    grad L(phi*) + lam (phi* - theta) = 0, so d phi*/d theta = (I + H/lam)^{-1} and the meta-gradient of
    F(theta) = L_query(phi*(theta)) is (I + H/lam)^{-1} grad L_query(phi*): it depends only on phi*, not on
    how the inner solver got there. With cg_damping = 0 this is the paper's system; the official code's CG
    matrix was (1 + d) I + H / (lam + 10), a different one. Where I + H/lam is indefinite CG stops on the
    negative curvature (on its first step it returns g itself, the first-order meta-gradient).

    lam may be per parameter (a dict name -> positive tensor, 0-d or of the parameter's shape): see
    :func:`implicit_solve`. ``theta`` (the point the proximal term pulls to) adds dF/dlam to the result.
    """
    lam = _check_lam(lam, params)
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
        raise ValueError(f"cg_steps must be an integer >= 1, got {cg_steps!r}")
    cg_damping = float(cg_damping)
    if not (cg_damping >= 0 and math.isfinite(cg_damping)):
        raise ValueError(f"cg_damping must be >= 0 and finite, got {cg_damping}")
    if not isinstance(params, Mapping) or not isinstance(query_grad, Mapping):
        raise ValueError(
            "params and query_grad must be dicts name -> Tensor, got "
            f"{type(params).__name__} and {type(query_grad).__name__}"
        )
    check_same_structure(params, query_grad, ("params", "query_grad"))
    spec = ParamSpec.of(params)
    phi = spec.flatten(detached(params)).unsqueeze(0)
    g = spec.flatten(detached(query_grad)).unsqueeze(0)
    lam_flat = lam if isinstance(lam, float) else spec.expand({k: v.detach() for k, v in lam.items()})
    diff = None if theta is None else phi - spec.flatten(detached(theta)).unsqueeze(0)
    hvp = RetainedHVP(_row_loss(inner_loss, spec), phi)
    x, lam_grad, info = implicit_solve(hvp, g, lam_flat, CG(cg_steps, rtol), cg_damping, diff)
    if lam_grad is not None:
        if isinstance(lam, float):
            lam_grad = lam_grad[0]
        else:
            per_entry = spec.unflatten(lam_grad[0])
            lam_grad = {k: per_entry[k].sum() if lam[k].dim() == 0 else per_entry[k] for k in lam}
    return ImplicitGradient(spec.unflatten(x[0]), lam_grad, CGInfo(*(f[0] for f in info)))
