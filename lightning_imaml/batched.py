"""Batched-task engine: adapt a whole meta-batch at once with ``torch.func.vmap`` (issue 7).

Pure torch, no Lightning import. Everything works on *batched parameter dicts*: the keys of
``dict(model.named_parameters())`` with a leading task dimension T on every tensor
(``phi[k].shape == (T, *theta[k].shape)``), and on per-task data with the same leading dimension
(``support_x [T, n, ...]``, ``support_y [T, n]``): the collated episode batch of the datamodules.

How it works
------------
* Forward: ``vmap`` over the task dimension of ``functional_call(model, params_t, (x_t,))``. vmap's batching
  rules turn the T per-task convolutions into one grouped convolution and the T linear layers into one
  batched matmul, so T small per-task batches become one large batch of BLAS work.
* Gradients: the per-task losses ``L_t(phi_t)`` are summed and differentiated with ordinary autograd w.r.t.
  the batched phi. Tasks do not interact, so ``d(sum_t L_t)/d phi_t = grad L_t(phi_t)``: one backward gives
  every task its own gradient.
* BatchNorm without running statistics (``track_running_stats=False``, the paper's network) works: under
  vmap each task's batch is normalised with that task's own statistics, exactly as in the per-task loop.

Models that cannot be batched (use the per-task loop; :func:`probe_batching` detects them by trying once
on two tasks and catching the error, plus an up-front check for the first case):

* BatchNorm WITH running statistics in training mode: it updates ``running_mean``/``running_var`` in place,
  and vmap refuses ("Batch norm got a batched tensor as input while the running_mean or running_var, which
  will be updated in place, were not batched"). Any other in-place update of an unbatched buffer from a
  batched value fails the same way.
* Data-dependent Python control flow (``if h.sum() > 0``, ``.item()``): vmap cannot turn a batched tensor
  into one Python bool.
* Random layers (dropout) DO run, with ``randomness="different"`` (independent masks per task, as in the
  loop; not bitwise the loop's masks). With the default HVP the masks stay fixed within one CG solve.

Inner solvers (:func:`batched_proximal_adapt`, :data:`BATCHED_INNER_OPTIMIZERS`)
--------------------------------------------------------------------------------
All minimise ``L_t(phi_t) + lam/2 ||phi_t - theta||^2`` from ``phi_t = theta`` for every task at once, with
no autograd graph across steps (memory flat in the number of steps), step for step as
``inner.proximal_adapt`` with the same name:

* ``"gd_armijo"`` and ``"gd"``: ``inner.gd_armijo_adapt`` / ``inner.gd_adapt`` themselves, vmapped over the
  tasks (written once, per task, with ``torch.where`` masks: each task keeps its own step size and
  accept / reject decisions);
* ``"sgd"``: ``torch.optim.SGD`` by hand (momentum, dampening, nesterov, weight_decay);
* ``"adam"``: ``torch.optim.Adam`` by hand (betas, eps, weight_decay).

Not batched: ``"lbfgs"`` and ``"hf"`` (per-task line searches and data-dependent iteration counts) and
SGD/Adam options not listed (amsgrad, maximize, ...): they raise :class:`BatchingUnsupported` and the caller
uses the per-task loop.

Implicit meta-gradient (:func:`batched_implicit_meta_gradient`)
----------------------------------------------------------------
Per task, ``x_t`` solves ``((1 + d) I + H_t / lam) x_t = g_t``, ``H_t`` the support-loss Hessian at
``phi_t``, ``g_t`` the query-loss gradient at ``phi_t``, by :func:`batched_conjugate_gradient` (per-task
alpha/beta/residuals, converged tasks masked, per-task truncation on negative curvature, exactly the rules of
``implicit.conjugate_gradient``). The meta-gradient is the mean of ``x_t`` over tasks.

Hessian-vector products (``hvp=``): ``"jvp"`` (default, forward-over-reverse, recomputed per product) or
``"double_backward"`` (support gradient built once with ``create_graph=True``, one more backward per product,
i.e. the forward and first backward are reused). Measured, jvp was faster; ``torch.func.linearize`` (reuse of
one linearisation) was slower than both and is not offered. Figures in :func:`batched_hvp_fn`.
``torch.compile`` of the batched inner step was not adopted (not measured to help; see the issue note).

Use from ``IMAML`` (``batched_tasks=True``): once per run, ``ok, why = probe_batching(model, sx, sy,
loss_fn=..., params=theta)`` and ``inner_optimizer in BATCHED_INNER_OPTIMIZERS``; if both hold, each step
calls ``grad, metrics = imaml_batched_meta_gradient(model, theta, (sx, sy, qx, qy), loss_fn=..., ...)``
(the ``(grad, metrics)`` of ``MetaLearner.meta_gradient``); otherwise (or on :class:`BatchingUnsupported`)
the per-task loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from . import inner

__all__ = [
    "BATCHED_INNER_OPTIMIZERS",
    "BatchedCGInfo",
    "BatchedMetaGradient",
    "BatchingUnsupported",
    "batched_conjugate_gradient",
    "batched_forward",
    "batched_hvp_fn",
    "batched_implicit_meta_gradient",
    "batched_implicit_solve",
    "batched_loss_and_grad",
    "batched_losses",
    "batched_proximal_adapt",
    "broadcast_params",
    "imaml_batched_meta_gradient",
    "probe_batching",
]

BATCHED_INNER_OPTIMIZERS = ("gd_armijo", "gd", "sgd", "adam")
"""Inner optimisers :func:`batched_proximal_adapt` runs batched; the others need the per-task loop."""

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class BatchingUnsupported(RuntimeError):
    """Raised when a request (model, optimiser or option) cannot run on the batched path; use the loop."""


class BatchedCGInfo(NamedTuple):
    """Per-task CG diagnostics, each a tensor of shape [T] (``steps`` int64, the flags bool)."""

    steps: Tensor
    residual_norm: Tensor
    negative_curvature: Tensor
    converged: Tensor


class BatchedMetaGradient(NamedTuple):
    """Result of :func:`batched_implicit_meta_gradient`.

    grad: mean over tasks of the per-task implicit gradients, same keys/shapes as theta (detached).
    query_loss, query_acc: per-task query loss / accuracy at phi, shape [T] (acc None for regression).
    support_loss: per-task support loss (without the proximal term) at phi, shape [T].
    cg_info: per-task :class:`BatchedCGInfo`.
    phi: the adapted batched parameters (detached), leading dim T.
    inner_info: per-task ``inner.InnerInfo`` of the inner solve (each field [T]).
    """

    grad: Params
    query_loss: Tensor
    query_acc: Tensor | None
    support_loss: Tensor
    cg_info: BatchedCGInfo
    phi: Params
    inner_info: inner.InnerInfo | None = None


# ------------------------------------------------------------------------------------------------------------
# helpers over batched dicts


def broadcast_params(theta: Mapping[str, Tensor], num_tasks: int) -> Params:
    """theta (unbatched dict) -> detached batched copy with a leading task dim of size ``num_tasks``."""
    return {k: v.detach().unsqueeze(0).expand(num_tasks, *v.shape).clone() for k, v in theta.items()}


def _bdot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Per-task inner product of two batched dicts -> [T]."""
    total = None
    for k in a:
        d = (a[k] * b[k]).reshape(a[k].shape[0], -1).sum(1)
        total = d if total is None else total + d
    return total


def _bcast(s: Tensor, like: Tensor) -> Tensor:
    """[T] -> [T, 1, 1, ...] to broadcast against a batched tensor."""
    return s.reshape(s.shape[0], *([1] * (like.dim() - 1)))


def _as_grad_input(x: Tensor) -> Tensor:
    # Tensors created under torch.inference_mode cannot be saved for backward; a clone made outside it can.
    return x.clone() if x.is_inference() else x


def _call(model: nn.Module, p: Params, x: Tensor, buffers: dict | None, cast) -> Tensor:
    """functional_call, optionally with the forward (only) under ``torch.autocast(*cast)``; low-precision
    outputs come back as float32 so that losses and what follows run in full precision (as metagrad.py)."""
    args = (p, buffers) if buffers else p
    if cast is None:
        return functional_call(model, args, (x,))
    with torch.autocast(device_type=cast[0], dtype=cast[1]):
        out = functional_call(model, args, (x,))
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def _per_task_fn(model: nn.Module, loss_fn: LossFn, buffers: Mapping[str, Tensor] | None, cast=None):
    buffers = dict(buffers) if buffers else None

    def f(p: Params, x: Tensor, y: Tensor):
        out = _call(model, p, x, buffers, cast)
        return loss_fn(out, y), out

    return f


# ------------------------------------------------------------------------------------------------------------
# forward / loss / gradient


def batched_forward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    buffers: Mapping[str, Tensor] | None = None,
    randomness: str = "different",
    cast: tuple[str, torch.dtype] | None = None,
) -> Tensor:
    """Per-task forward: ``out[t] = functional_call(model, params[t], x[t])`` for all t at once.

    params: batched dict (leading dim T); x: [T, n, ...]; buffers: unbatched dict (shared by all tasks).
    """
    buffers = dict(buffers) if buffers else None

    def f(p, xx):
        return _call(model, p, xx, buffers, cast)

    return vmap(f, randomness=randomness)(dict(params), x)


def batched_losses(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
    randomness: str = "different",
    cast: tuple[str, torch.dtype] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-task losses [T] and outputs [T, n, ...]; ``loss_fn(out_t, y_t)`` must return a scalar per task."""
    return vmap(_per_task_fn(model, loss_fn, buffers, cast), randomness=randomness)(dict(params), x, y)


def _accuracy(out: Tensor, y: Tensor) -> Tensor | None:
    if y.dtype.is_floating_point or out.dim() != y.dim() + 1:
        return None
    return (out.argmax(-1) == y).to(out.dtype).mean(-1)


def batched_loss_and_grad(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
    create_graph: bool = False,
    randomness: str = "different",
    cast: tuple[str, torch.dtype] | None = None,
) -> tuple[Tensor, Tensor, Params, Params]:
    """Per-task losses [T], outputs, and per-task gradients ``grad L_t(params_t)`` (batched dict).

    One backward of ``sum_t L_t``. Returns ``(losses, out, grads, leaves)`` where ``leaves`` are the
    requires-grad copies of ``params`` the graph was built on (needed to differentiate ``grads`` again when
    ``create_graph=True``). With ``create_graph=False`` everything returned is detached.
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    with torch.inference_mode(False), torch.enable_grad():
        losses, out = batched_losses(
            model, leaves, _as_grad_input(x), _as_grad_input(y), loss_fn, buffers, randomness, cast
        )
        gs = torch.autograd.grad(
            losses.sum(), list(leaves.values()), create_graph=create_graph, allow_unused=True
        )
    grads = {
        k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), gs, strict=False)
    }
    if not create_graph:
        return losses.detach(), out.detach(), grads, leaves
    return losses, out, grads, leaves


# ------------------------------------------------------------------------------------------------------------
# inner solver


_SGD_KEYS = {"momentum", "dampening", "nesterov", "weight_decay"}
_ADAM_KEYS = {"betas", "eps", "weight_decay", "amsgrad"}


def _vmapped_solver(
    model,
    theta,
    support_x,
    support_y,
    lam,
    steps,
    optimizer,
    lr,
    loss_fn,
    buffers,
    randomness,
    cast,
    optimizer_kwargs,
):
    """The per-task solvers of :mod:`lightning_imaml.inner` (``inner.VMAPPABLE``) under vmap: the very
    functions the looped path calls, one task per vmap lane, each with its own step sizes and masks."""
    solver = {"gd": inner.gd_adapt, "gd_armijo": inner.gd_armijo_adapt}[optimizer]
    if optimizer == "gd" and optimizer_kwargs:
        raise BatchingUnsupported(f"gd takes no optimizer kwargs, got {sorted(optimizer_kwargs)}")
    f = _per_task_fn(model, loss_fn, buffers, cast)

    def one_task(x, y):
        def support_loss(p):
            return f(p, x, y)[0]

        phi, info = solver(support_loss, theta, lam, steps, lr=lr, return_info=True, **optimizer_kwargs)
        return phi, tuple(info)

    with torch.inference_mode(False):
        phi, info = vmap(one_task, randomness=randomness)(
            _as_grad_input(support_x), _as_grad_input(support_y)
        )
    num_tasks = support_x.shape[0]
    # outputs that do not depend on the task (e.g. gd_armijo's constant rose=False) come back unbatched
    info = [t.expand(num_tasks) if t.dim() == 0 else t for t in info]
    return {k: v.detach() for k, v in phi.items()}, inner.InnerInfo(*info)


def batched_proximal_adapt(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    lam: float,
    steps: int,
    optimizer: str = "gd_armijo",
    lr: float = 0.1,
    loss_fn: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
    randomness: str = "different",
    cast: tuple[str, torch.dtype] | None = None,
    return_info: bool = False,
    **optimizer_kwargs,
):
    """Batched ``inner.proximal_adapt``: minimise ``L_t(phi_t) + lam/2 ||phi_t - theta||^2`` for every task.

    theta: unbatched dict (the meta-parameters); support_x/support_y: [T, n, ...]. Returns the batched phi
    (leading dim T), detached, or ``(phi, InnerInfo)`` with ``return_info`` (each field a [T] tensor).
    "gd_armijo" and "gd" are ``inner.gd_armijo_adapt`` / ``inner.gd_adapt`` themselves under vmap; "sgd"
    and "adam" are re-implemented here batched. Anything else raises :class:`BatchingUnsupported` (use the
    per-task loop).
    """
    optimizer = optimizer.lower()
    if optimizer not in BATCHED_INNER_OPTIMIZERS:
        raise BatchingUnsupported(
            f"inner optimizer {optimizer!r} is not batched (batched: {BATCHED_INNER_OPTIMIZERS})"
        )
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    theta = {k: v.detach() for k, v in theta.items()}
    if optimizer in inner.VMAPPABLE:
        phi, info = _vmapped_solver(
            model,
            theta,
            support_x,
            support_y,
            lam,
            steps,
            optimizer,
            lr,
            loss_fn,
            buffers,
            randomness,
            cast,
            optimizer_kwargs,
        )
        return (phi, info) if return_info else phi
    num_tasks = support_x.shape[0]
    phi = broadcast_params(theta, num_tasks)
    track = {"residual0": None, "rose": None, "prev": None}

    def prox_value(losses: Tensor, p: Params) -> Tensor:
        if lam == 0:
            return losses
        return losses + 0.5 * lam * _bdot({k: p[k] - theta[k] for k in p}, {k: p[k] - theta[k] for k in p})

    def prox_grad(p: Params) -> Params:
        losses, _, g, _ = batched_loss_and_grad(
            model, p, support_x, support_y, loss_fn, buffers, False, randomness, cast
        )
        if lam != 0:
            g = {k: g[k] + lam * (p[k] - theta[k]) for k in p}
        if return_info:
            val = prox_value(losses, p)
            if track["residual0"] is None:
                track["residual0"] = _bdot(g, g).sqrt()
                track["rose"] = torch.zeros_like(val, dtype=torch.bool)
            else:
                track["rose"] = track["rose"] | inner._rose(val, track["prev"])
            track["prev"] = val
        return g

    with torch.no_grad():
        if optimizer == "sgd":
            extra = set(optimizer_kwargs) - _SGD_KEYS
            if extra:
                raise BatchingUnsupported(f"sgd options {sorted(extra)} are not batched")
            momentum = float(optimizer_kwargs.get("momentum", 0.0))
            dampening = float(optimizer_kwargs.get("dampening", 0.0))
            nesterov = bool(optimizer_kwargs.get("nesterov", False))
            wd = float(optimizer_kwargs.get("weight_decay", 0.0))
            buf: Params | None = None
            for _ in range(steps):
                g = prox_grad(phi)
                if wd != 0:
                    g = {k: g[k] + wd * phi[k] for k in g}
                if momentum != 0:
                    if buf is None:
                        buf = {k: g[k].clone() for k in g}
                    else:
                        buf = {k: buf[k] * momentum + (1 - dampening) * g[k] for k in g}
                    g = {k: g[k] + momentum * buf[k] for k in g} if nesterov else buf
                phi = {k: phi[k] - lr * g[k] for k in phi}
        else:  # adam
            bad_opts = sorted(set(optimizer_kwargs) - _ADAM_KEYS)
            if optimizer_kwargs.get("amsgrad", False):
                bad_opts.append("amsgrad")
            if bad_opts:
                raise BatchingUnsupported(f"adam options {bad_opts} are not batched")
            beta1, beta2 = optimizer_kwargs.get("betas", (0.9, 0.999))
            eps = float(optimizer_kwargs.get("eps", 1e-8))
            wd = float(optimizer_kwargs.get("weight_decay", 0.0))
            m = {k: torch.zeros_like(v) for k, v in phi.items()}
            v2 = {k: torch.zeros_like(v) for k, v in phi.items()}
            for step in range(1, steps + 1):
                g = prox_grad(phi)
                if wd != 0:
                    g = {k: g[k] + wd * phi[k] for k in g}
                bc1 = 1 - beta1**step
                bc2_sqrt = (1 - beta2**step) ** 0.5
                for k in phi:
                    m[k] = m[k].lerp(g[k], 1 - beta1)  # as torch.optim.Adam (single-tensor path)
                    v2[k] = v2[k] * beta2 + (1 - beta2) * g[k] * g[k]
                    denom = v2[k].sqrt() / bc2_sqrt + eps
                    phi[k] = phi[k] - (lr / bc1) * m[k] / denom
    phi = {k: v.detach() for k, v in phi.items()}
    if not return_info:
        return phi
    g = prox_grad(phi)  # one more evaluation: the residual at the returned phi (and the last rise check)
    residual = _bdot(g, g).sqrt()
    residual0 = residual if track["residual0"] is None else track["residual0"]
    rose = track["rose"] if track["rose"] is not None else torch.zeros_like(residual, dtype=torch.bool)
    accepted = torch.full_like(residual, float(steps))
    return phi, inner.InnerInfo(residual, residual0, rose, accepted, track["prev"])


# ------------------------------------------------------------------------------------------------------------
# Hessian-vector products and CG


def batched_hvp_fn(
    model: nn.Module,
    phi: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
    mode: str = "jvp",
    randomness: str = "different",
    cast: tuple[str, torch.dtype] | None = None,
) -> tuple[Callable[[Params], Params], Tensor]:
    """Build ``v -> H v`` with ``(H v)_t = Hess L_t(phi_t) v_t`` for all tasks; also returns the losses [T].

    mode "jvp" (default): forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` of the summed
    batched loss, recomputed for every product. "double_backward": forward + first backward once
    (``create_graph=True``), each product one more backward through the retained graph.

    Measured (torch 2.14.1, 2 shared CPU cores, Omniglot Conv4 5-way 1-shot, T = 32, float32; building the
    HVP + 5 CG steps, interleaved, median of 3): jvp 22.4 s, double_backward (reuse of the forward and first
    backward) 32.3 s, ``torch.func.linearize`` of the batched gradient once + replay 51.7 s (make_fx tracing
    and the const-folded graph cost more than they save; it also segfaulted on a float64 tanh MLP), so
    linearize was dropped. Absolute figures are inflated by ~4x machine load; the ratios are what counts.
    """
    keys = list(phi)
    if mode == "double_backward":
        losses, _, grads, leaves = batched_loss_and_grad(
            model, phi, x, y, loss_fn, buffers, True, randomness, cast
        )
        glist = [grads[k] for k in keys]
        differentiable = [g.requires_grad for g in glist]

        def hvp(v: Params) -> Params:
            outs = [g for g, d in zip(glist, differentiable, strict=False) if d]
            vs = [v[k] for k, d in zip(keys, differentiable, strict=False) if d]
            with torch.inference_mode(False), torch.enable_grad():
                hs = torch.autograd.grad(
                    outs, [leaves[k] for k in keys], vs, retain_graph=True, allow_unused=True
                )
            return {
                k: (torch.zeros_like(v[k]) if h is None else h.detach())
                for k, h in zip(keys, hs, strict=False)
            }

        return hvp, losses.detach()

    f = _per_task_fn(model, loss_fn, buffers, cast)
    xg, yg = _as_grad_input(x), _as_grad_input(y)

    def grad_fn(p: Params) -> Params:
        def total(q):
            return vmap(f, randomness=randomness)(q, xg, yg)[0].sum()

        return torch.func.grad(total)(p)

    p0 = {k: v.detach() for k, v in phi.items()}
    with torch.no_grad():
        losses = batched_losses(model, p0, x, y, loss_fn, buffers, randomness, cast)[0]
    if mode == "jvp":

        def hvp(v: Params) -> Params:
            with torch.inference_mode(False):
                return torch.func.jvp(grad_fn, (p0,), (dict(v),))[1]

        return hvp, losses
    raise ValueError(f"unknown hvp mode {mode!r}")


def batched_conjugate_gradient(
    matvec: Callable[[Params], Params],
    b: Mapping[str, Tensor],
    max_steps: int,
    rtol: float = 1e-10,
    curvature_eps: float | None = None,
) -> tuple[Params, BatchedCGInfo]:
    """Solve ``A_t x_t = b_t`` for every task t with truncated CG, all tasks at once (x0 = 0).

    ``matvec`` maps a batched dict (leading dim T) to ``A_t v_t`` for all t. Per task this is exactly
    ``implicit.conjugate_gradient`` (same recurrences, same stopping rules, same returns), only vectorised:

    - each task has its own alpha = rs/pAp, beta = rs_new/rs, residual, and tolerance ``rtol ||b_t||``;
    - a task whose residual meets its tolerance is *converged* and masked: its x, r, p stop changing;
    - a task whose direction has ``p^T A p <= curvature_eps ||p||^2`` (or a non-finite value) is *truncated*
      (Steihaug) and masked with its last iterate; if that happens on its first direction it returns
      ``b_t`` (A replaced by I: for iMAML the first-order meta-gradient), as the looped CG does;
    - ``curvature_eps`` defaults to sqrt(machine eps) of b's dtype, as in the looped CG.
    Masked tasks still pass through the batched matvec (that is the price of batching) but nothing they
    produce is used. The loop ends early once no task is active (one host sync per step).
    Returns ``(x, BatchedCGInfo)``: per-task CG updates taken, residual norm at the last accepted iterate,
    truncation flag and convergence flag (``residual <= rtol ||b_t||`` at exit).
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    b = {k: v.detach() for k, v in b.items()}
    ref = next(iter(b.values()))
    if curvature_eps is None:
        dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
        curvature_eps = math.sqrt(torch.finfo(dtype).eps)
    num_tasks, dev = ref.shape[0], ref.device
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = b
    p = b
    rs = _bdot(r, r)
    r_norm = rs.sqrt()
    tol = rtol * r_norm
    converged = (r_norm <= tol) | (r_norm == 0)
    active = ~converged
    neg = torch.zeros(num_tasks, dtype=torch.bool, device=dev)
    steps = torch.zeros(num_tasks, dtype=torch.int64, device=dev)
    first = True
    for _ in range(max_steps):
        if not bool(active.any()):
            break
        ap = matvec(p)
        pap = _bdot(p, ap)
        pp = _bdot(p, p)
        bad = active & (~torch.isfinite(pap) | (pap <= curvature_eps * pp))
        neg = neg | bad
        if first and bool(bad.any()):
            # truncated on the very first direction: x0 + r0 = b (A replaced by I), as the looped CG
            x = {k: torch.where(_bcast(bad, x[k]), r[k], x[k]) for k in x}
        first = False
        active = active & ~bad
        one = torch.ones_like(pap)
        alpha = torch.where(active, rs / torch.where(active, pap, one), torch.zeros_like(rs))
        x = {k: torch.where(_bcast(active, x[k]), x[k] + _bcast(alpha, x[k]) * p[k], x[k]) for k in x}
        r = {k: torch.where(_bcast(active, r[k]), r[k] - _bcast(alpha, r[k]) * ap[k], r[k]) for k in r}
        steps = steps + active.to(torch.int64)
        rs_new = torch.where(active, _bdot(r, r), rs)
        r_norm = torch.where(active, rs_new.sqrt(), r_norm)
        done = active & (r_norm <= tol)
        active = active & ~done
        beta = torch.where(active, rs_new / torch.where(active, rs, one), torch.zeros_like(rs))
        p = {k: torch.where(_bcast(active, p[k]), r[k] + _bcast(beta, p[k]) * p[k], p[k]) for k in p}
        rs = rs_new
    info = BatchedCGInfo(steps=steps, residual_norm=r_norm, negative_curvature=neg, converged=r_norm <= tol)
    return x, info


def batched_implicit_solve(
    hvp: Callable[[Params], Params],
    query_grad: Mapping[str, Tensor],
    lam: float,
    cg_steps: int,
    cg_damping: float = 0.0,
    rtol: float = 1e-10,
) -> tuple[Params, BatchedCGInfo]:
    """Per task, solve ``((1 + cg_damping) I + H_t / lam) x_t = g_t`` with
    :func:`batched_conjugate_gradient`."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0 for the implicit gradient, got {lam}")
    if cg_steps < 1:
        raise ValueError(f"cg_steps must be >= 1, got {cg_steps}")
    scale, inv_lam = 1.0 + cg_damping, 1.0 / lam

    def matvec(v: Params) -> Params:
        hv = hvp(v)
        return {k: torch.add(v[k] * scale, hv[k], alpha=inv_lam) for k in v}  # as implicit.py

    return batched_conjugate_gradient(matvec, query_grad, cg_steps, rtol=rtol)


def batched_implicit_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    lam: float,
    inner_steps: int,
    inner_lr: float,
    inner_optimizer: str = "gd_armijo",
    cg_steps: int = 5,
    cg_damping: float = 0.0,
    loss_fn: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
    hvp: str = "jvp",
    cg_rtol: float = 1e-10,
    randomness: str = "different",
    cast: tuple[str, torch.dtype] | None = None,
    **optimizer_kwargs,
) -> BatchedMetaGradient:
    """iMAML meta-gradient of a whole meta-batch in one batched computation.

    1. phi = :func:`batched_proximal_adapt` (all tasks from theta);
    2. g_t = grad of the query loss at phi_t (one batched forward/backward), with per-task query
    loss/accuracy;
    3. x_t solves ``((1+d) I + H_t/lam) x_t = g_t`` (batched CG, :func:`batched_implicit_solve`);
    4. returns the mean over tasks of x_t (the meta-gradient for theta) and per-task diagnostics.
    Raises :class:`BatchingUnsupported` for an inner optimiser that is not batched.
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0 for the implicit gradient, got {lam}")
    phi, inner_info = batched_proximal_adapt(
        model,
        theta,
        support_x,
        support_y,
        lam,
        inner_steps,
        inner_optimizer,
        inner_lr,
        loss_fn,
        buffers,
        randomness,
        cast,
        True,
        **optimizer_kwargs,
    )
    q_loss, q_out, g, _ = batched_loss_and_grad(
        model, phi, query_x, query_y, loss_fn, buffers, False, randomness, cast
    )
    hvp_fn, s_loss = batched_hvp_fn(model, phi, support_x, support_y, loss_fn, buffers, hvp, randomness, cast)
    x, info = batched_implicit_solve(hvp_fn, g, lam, cg_steps, cg_damping, cg_rtol)
    grad = {k: x[k].mean(0).detach() for k in theta}
    return BatchedMetaGradient(
        grad=grad,
        query_loss=q_loss,
        query_acc=_accuracy(q_out, query_y),
        support_loss=s_loss,
        cg_info=info,
        phi=phi,
        inner_info=inner_info,
    )


def imaml_batched_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    loss_fn: LossFn,
    lam: float,
    inner_steps: int,
    inner_lr: float | None,
    inner_optimizer: str = "gd_armijo",
    cg_steps: int = 5,
    cg_damping: float = 0.0,
    inner_optimizer_kwargs: Mapping | None = None,
    cast: tuple[str, torch.dtype] | None = None,
    hvp: str = "jvp",
) -> tuple[Params, dict[str, Tensor]]:
    """Drop-in batched counterpart of ``MetaLearner.meta_gradient`` for IMAML: ``(grad, metrics)``.

    batch: (support_x, support_y, query_x, query_y) with the leading task dim B. grad: mean over tasks, keys
    and shapes of theta (detached). metrics: per-task float32 tensors [B]: ``query_loss``, ``support_loss``,
    ``query_acc`` (classification targets only), ``cg_steps``, ``cg_negative_curvature``, ``cg_residual``,
    ``inner_residual``, ``inner_residual_rel``, ``inner_rose``, ``inner_accepted`` -- the same keys the
    looped ``metagrad.imaml_task_meta_gradient`` path produces. ``cast`` = ``(device_type,
    dtype)`` (e.g. a ``metagrad.ForwardCast``): autocast for the model forwards only.
    Raises :class:`BatchingUnsupported` for inner optimisers/options that are not batched.
    """
    sx, sy, qx, qy = batch
    res = batched_implicit_meta_gradient(
        model,
        theta,
        sx,
        sy,
        qx,
        qy,
        lam=lam,
        inner_steps=inner_steps,
        inner_lr=0.1 if inner_lr is None else inner_lr,
        inner_optimizer=inner_optimizer.lower(),
        cg_steps=cg_steps,
        cg_damping=cg_damping,
        loss_fn=loss_fn,
        hvp=hvp,
        cast=None if cast is None else (cast[0], cast[1]),
        **dict(inner_optimizer_kwargs or {}),
    )
    metrics = {"query_loss": res.query_loss.float(), "support_loss": res.support_loss.float()}
    if res.query_acc is not None:
        metrics["query_acc"] = res.query_acc.float()
    metrics["cg_steps"] = res.cg_info.steps.float()
    metrics["cg_negative_curvature"] = res.cg_info.negative_curvature.float()
    metrics["cg_residual"] = res.cg_info.residual_norm.float()
    ii = res.inner_info
    metrics["inner_residual"] = ii.residual.float()
    metrics["inner_residual_rel"] = torch.where(
        ii.residual0 > 0, ii.residual / ii.residual0, torch.zeros_like(ii.residual)
    ).float()
    metrics["inner_rose"] = ii.rose.float()
    metrics["inner_accepted"] = ii.accepted.float()
    return res.grad, metrics


# ------------------------------------------------------------------------------------------------------------
# capability probe


def probe_batching(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
    params: Mapping[str, Tensor] | None = None,
    randomness: str = "different",
    cast: tuple[str, torch.dtype] | None = None,
) -> tuple[bool, str]:
    """Try the batched path once on the first (up to) two tasks of ``x [T, n, ...]``; ``(ok, reason)``.

    Checks a vmapped forward, the per-task gradient and one Hessian-vector product, and that the vmapped
    losses equal the per-task ones (to 1e-4 relative). Catches anything vmap refuses (BatchNorm with running
    statistics in training mode, in-place updates of unbatched buffers, data-dependent control flow) and
    reports it instead of raising, so the caller can fall back to the per-task loop.
    """
    params = dict(model.named_parameters()) if params is None else dict(params)
    if buffers is None:
        buffers = dict(model.named_buffers())
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats and mod.training:
            return (
                False,
                f"{name or type(mod).__name__}: BatchNorm with running statistics updates them in place",
            )
    has_random = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
    t = min(2, x.shape[0])
    xs, ys = x[:t], y[:t]
    try:
        pb = broadcast_params(params, t)
        losses, _, g, _ = batched_loss_and_grad(model, pb, xs, ys, loss_fn, buffers, False, randomness, cast)
        hvp, _ = batched_hvp_fn(model, pb, xs, ys, loss_fn, buffers, "jvp", randomness, cast)
        hvp(g)
        with torch.no_grad():
            pd = {k: v.detach() for k, v in params.items()}
            for i in range(t):
                out = _call(model, pd, xs[i], dict(buffers) if buffers else None, cast)
                ref = loss_fn(out, ys[i])
                if not has_random and not torch.allclose(losses[i], ref, rtol=1e-4, atol=1e-6):
                    return False, f"vmapped loss {losses[i].item()} != per-task loss {ref.item()}"
    except Exception as e:  # noqa: BLE001 - any failure means "use the loop"
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return True, "ok"
