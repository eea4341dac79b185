"""Batched tasks: the per-task functions of the engine run over a whole meta-batch with ``torch.func.vmap``.

Pure torch, no Lightning import. Nothing is re-implemented here: the inner solvers
(:mod:`lightning_imaml.inner`), conjugate gradient and the Hessian-vector product
(:mod:`lightning_imaml.implicit`) and the per-task meta-gradients (:mod:`lightning_imaml.metagrad`) are
written once, per task, with fixed iteration counts and ``torch.where`` masks; this module only maps them
over the leading task dimension of an episode (``support_x [T, n, ...]``, ``support_y [T, n]``, ...).
Under vmap every task keeps its own step sizes, accept / reject decisions, CG step sizes, convergence and
negative-curvature flags; a task that has finished is masked while the others go on, so each lane computes
exactly what the per-task loop computes (the loop only skips the masked work).

``chunk_size`` bounds memory: vmap runs that many tasks at a time (``torch.func.vmap(chunk_size=...)``);
None runs the whole meta-batch at once.

Models that cannot be batched (use the per-task loop; :func:`probe_batching` detects them by trying once on
two tasks and catching the error):
* BatchNorm WITH running statistics in training mode: it updates ``running_mean`` / ``running_var`` in
  place, which vmap refuses. Any other in-place update of an unbatched buffer from a batched value fails
  the same way.
* Data-dependent Python control flow (``if h.sum() > 0``, ``.item()``): vmap cannot turn a batched tensor
  into one Python bool.
* Losses whose double derivative torch.func cannot take: e.g. ``F.mse_loss`` under jvp-of-grad in torch
  2.14.1 (use :func:`lightning_imaml.metagrad.mse_loss`, which the learners do).
Random layers (dropout) run with ``randomness="different"``: independent masks per task, as in the loop
(not bitwise the loop's masks).

Not batched: ``inner.torch_optimizer_adapt`` with an arbitrary ``torch.optim`` class (in-place updates);
every named solver (:data:`BATCHED_INNER_OPTIMIZERS`) is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from . import inner
from .metagrad import ForwardCast, TaskResult, adapt, imaml_task_meta_gradient, make_task_loss

__all__ = [
    "BATCHED_INNER_OPTIMIZERS",
    "BatchingUnsupported",
    "batched_forward",
    "batched_proximal_adapt",
    "imaml_batched_meta_gradient",
    "probe_batching",
    "summarise_tasks",
    "vmap_tasks",
]

BATCHED_INNER_OPTIMIZERS = inner.OPTIMIZERS
"""Inner solvers the batched path runs: all named ones (each is one per-task function)."""

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


class BatchingUnsupported(RuntimeError):
    """Raised when a request (model, optimiser or option) cannot run on the batched path; use the loop."""


def _grad_input(x: Tensor) -> Tensor:
    # Tensors created under torch.inference_mode cannot be saved for backward; a clone made outside it can.
    return x.clone() if x.is_inference() else x


def vmap_tasks(
    task_fn: Callable[..., Any],
    tasks: tuple[Tensor, ...],
    chunk_size: int | None = None,
    randomness: str = "different",
) -> Any:
    """``task_fn(*task)`` for every task at once: ``tasks`` are tensors with a leading task dimension T,
    ``task_fn`` a per-task function of one slice of each; outputs (any pytree of tensors) gain the leading
    dimension T. ``chunk_size`` tasks per vmap call (None: all)."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an integer >= 1, got {chunk_size!r}")
    with torch.inference_mode(False), torch.enable_grad():
        return vmap(task_fn, randomness=randomness, chunk_size=chunk_size)(*(_grad_input(t) for t in tasks))


def summarise_tasks(results: TaskResult, query_y: Tensor, classification: bool) -> tuple[Params, dict]:
    """Per-task results with a leading task dimension -> ``(mean meta-gradient, per-task metrics [T])``:
    ``query_loss``, ``support_loss``, ``query_acc`` (classification) and every solver diagnostic. The mean
    dF/dlam of a learned lam is in the gradient under ``"lam:<name>"``."""
    grad = {k: v.mean(0) for k, v in results.grad.items()}
    grad.update({f"lam:{k}": v.mean(0) for k, v in results.lam_grad.items()})
    metrics = {"query_loss": results.query_loss.float(), "support_loss": results.support_loss.float()}
    if classification:
        metrics["query_acc"] = (results.query_out.argmax(-1) == query_y).float().mean(-1)
    metrics.update({k: v.float() for k, v in results.info.items()})
    return grad, metrics


def batched_forward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    randomness: str = "different",
    cast: ForwardCast | None = None,
) -> Tensor:
    """Per-task forward ``out[t] = model(x[t]; params[t])`` for batched ``params`` (leading dim T on every
    tensor) and ``x [T, n, ...]``. Under vmap, T convolutions become one grouped convolution, T linear layers
    one batched matmul; BatchNorm without running statistics normalises each task on its own."""
    from .metagrad import task_forward

    return vmap(lambda p, xx: task_forward(model, p, xx, cast), randomness=randomness)(dict(params), x)


def batched_proximal_adapt(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    lam: float,
    steps: int,
    optimizer: str = "gd_armijo",
    lr: float | None = None,
    loss_fn: LossFn = F.cross_entropy,
    hf_cg_steps: int = 5,
    return_info: bool = False,
    chunk_size: int | None = None,
    cast: ForwardCast | None = None,
    **optimizer_kwargs,
):
    """``inner.proximal_adapt`` for every task of ``support_x [T, n, ...]``, ``support_y [T, n]`` at once.

    theta: unbatched dict (the meta-parameters). Returns the batched phi (leading dim T), detached, or
    ``(phi, InnerInfo)`` with ``return_info`` (each field [T]).
    """
    if optimizer.lower() not in BATCHED_INNER_OPTIMIZERS:
        raise BatchingUnsupported(f"inner optimizer {optimizer!r} is not one of {BATCHED_INNER_OPTIMIZERS}")
    theta = {k: v.detach() for k, v in theta.items()}

    def one(x, y):
        return adapt(
            model, theta, x, y, loss_fn=loss_fn, lam=lam, steps=steps, lr=lr, optimizer=optimizer,
            hf_cg_steps=hf_cg_steps, optimizer_kwargs=optimizer_kwargs, cast=cast, return_info=return_info,
        )  # fmt: skip

    return vmap_tasks(one, (support_x, support_y), chunk_size)


def imaml_batched_meta_gradient(
    model: nn.Module,
    theta: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    *,
    loss_fn: LossFn,
    chunk_size: int | None = None,
    classification: bool | None = None,
    **settings,
) -> tuple[Params, dict[str, Tensor]]:
    """The iMAML meta-gradient of a whole meta-batch: ``metagrad.imaml_task_meta_gradient`` vmapped over the
    tasks, averaged. Returns ``(grad, metrics)`` as ``MetaLearner.meta_gradient``: grad with theta's keys and
    shapes; metrics per-task [B] tensors (``query_loss``, ``support_loss``, ``query_acc``, ``cg_*``,
    ``inner_*``). ``settings``: the keyword arguments of ``imaml_task_meta_gradient`` (lam, inner_steps,
    inner_lr, inner_optimizer, cg_steps, ...). Raises :class:`BatchingUnsupported` for a solver that is not
    batched.
    """
    optimizer = settings.get("inner_optimizer", "gd_armijo")
    if optimizer.lower() not in BATCHED_INNER_OPTIMIZERS:
        raise BatchingUnsupported(f"inner optimizer {optimizer!r} is not one of {BATCHED_INNER_OPTIMIZERS}")
    theta = {k: v.detach() for k, v in theta.items()}
    results = vmap_tasks(
        lambda *task: imaml_task_meta_gradient(model, theta, task, loss_fn=loss_fn, **settings),
        batch,
        chunk_size,
    )
    if classification is None:
        classification = not batch[3].dtype.is_floating_point
    return summarise_tasks(results, batch[3], classification)


def probe_batching(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = F.cross_entropy,
    params: Mapping[str, Tensor] | None = None,
    cast: ForwardCast | None = None,
) -> tuple[bool, str]:
    """Try the batched path once on the first (up to) two tasks of ``x [T, n, ...]``; ``(ok, reason)``.

    Runs a vmapped loss, gradient and Hessian-vector product through the engine and checks the vmapped
    losses against per-task ones (1e-4 relative; 4 eps of the autocast dtype under ``cast``). Catches
    anything vmap refuses (BatchNorm with running statistics in training mode, in-place buffer updates,
    data-dependent control flow, a loss torch.func cannot differentiate twice; in torch 2.14 also BatchNorm
    under a CPU autocast) and reports it instead of raising, so the caller can loop instead.
    """
    from .implicit import grad_and_hvp

    params = {
        k: v.detach() for k, v in (dict(model.named_parameters()) if params is None else params).items()
    }
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats and mod.training:
            return (
                False,
                f"{name or type(mod).__name__}: BatchNorm with running statistics updates them in place",
            )
    has_random = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
    t = min(2, x.shape[0])
    # an autocast forward rounds to its low precision: vmapped and per-task kernels then differ by a few of
    # its eps (measured 1e-4 to 7e-4 relative on a CPU bfloat16 loss), which is not a batching error
    rtol = 1e-4 if cast is None else max(1e-4, 4 * torch.finfo(cast.dtype).eps)

    def one(xx, yy):
        loss, g, hvp = grad_and_hvp(make_task_loss(model, xx, yy, loss_fn, cast), params)
        return loss, hvp(g)

    try:
        losses, _ = vmap_tasks(one, (x[:t], y[:t]))
        with torch.no_grad():
            for i in range(t):
                ref = make_task_loss(model, x[i], y[i], loss_fn, cast)(params)
                if not has_random and not torch.allclose(losses[i], ref, rtol=rtol, atol=1e-6):
                    return False, f"vmapped loss {losses[i].item()} != per-task loss {ref.item()}"
    except Exception as e:  # noqa: BLE001 - any failure means "use the loop"
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return True, "ok"
