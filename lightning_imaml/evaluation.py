"""Metrics of the meta-learners: what a training step logs and, at validation / test, the per-task query
loss and accuracy before and after adaptation, gathered over ranks by torchmetrics and summarised as mean and
95 % confidence half-width."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchmetrics import CatMetric

from .functional import ForwardCast, forward_tasks, task_losses
from .inner import InnerSolver
from .metagrad import adapt_tasks

__all__ = ["EvalMetrics", "adapt_and_predict", "autograd_in_evaluation", "training_log"]

_NAMES = ("loss", "loss_pre", "acc", "acc_pre")


class EvalMetrics(nn.Module):
    """Per-task values of one stage ("val" / "test"); ``summarise`` returns ``{stage}/loss``, ``/loss_pre``,
    ``/acc``, ``/acc_pre`` (classification) or ``/mse``, ``/mse_pre`` (regression), the 95 % CI half-width
    1.96 std / sqrt(n) of the headline metric (``{stage}/acc_ci95`` or ``/mse_ci95``) and
    ``{stage}/n_tasks``."""

    def __init__(self, classification: bool):
        super().__init__()
        self.classification = classification
        self.metrics = nn.ModuleDict(
            {f"{s}_{n}": CatMetric(nan_strategy="disable") for s in ("val", "test") for n in _NAMES}
        )

    def update(self, stage: str, loss_fn: Callable, out_pre: Tensor, out: Tensor, y: Tensor) -> None:
        """Outputs ``[T, n, ...]`` before and after adaptation and targets ``[T, n, ...]`` of T tasks."""
        self.metrics[f"{stage}_loss_pre"].update(task_losses(loss_fn, out_pre, y).float())
        self.metrics[f"{stage}_loss"].update(task_losses(loss_fn, out, y).float())
        if self.classification:
            self.metrics[f"{stage}_acc_pre"].update((out_pre.argmax(-1) == y).float().mean(-1))
            self.metrics[f"{stage}_acc"].update((out.argmax(-1) == y).float().mean(-1))

    def summarise(self, stage: str) -> dict[str, float]:
        """Mean over all tasks of the epoch (all ranks), and the CI; resets the stage."""
        out: dict[str, float] = {}
        headline = "acc" if self.classification else "loss"
        for name in _NAMES if self.classification else _NAMES[:2]:
            metric = self.metrics[f"{stage}_{name}"]
            if not metric.update_called:
                continue
            values = metric.compute().reshape(-1).double()
            metric.reset()
            n = values.numel()
            mean = float(values.mean())
            out[f"{stage}/{name}"] = mean
            if not self.classification:  # the loss is the MSE: also report it under that name
                out[f"{stage}/{name.replace('loss', 'mse')}"] = mean
            if name == headline:
                std = float(values.std(correction=1)) if n > 1 else 0.0
                out[f"{stage}/{'acc' if self.classification else 'mse'}_ci95"] = 1.96 * std / math.sqrt(n)
                out[f"{stage}/n_tasks"] = float(n)
        return out


def adapt_and_predict(
    model: nn.Module,
    theta: dict[str, Tensor],
    tasks: tuple[Tensor, Tensor, Tensor, Tensor],
    loss_fn: Callable,
    lam,
    solver: InnerSolver,
    cast: ForwardCast | None = None,
    mode: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The query outputs ``[T, Q, ...]`` of T tasks at theta and after adapting on their support sets."""
    support_x, support_y, query_x, _ = tasks
    phi, _ = adapt_tasks(
        model, theta, support_x, support_y, loss_fn=loss_fn, lam=lam, solver=solver, cast=cast, mode=mode
    )
    with torch.no_grad():
        at_theta = {k: v.expand(query_x.shape[0], *v.shape) for k, v in theta.items()}
        return forward_tasks(model, at_theta, query_x, cast, mode), forward_tasks(
            model, phi, query_x, cast, mode
        )


@contextlib.contextmanager
def autograd_in_evaluation(device_type: str):
    """Adaptation needs autograd and full precision, but the Trainer evaluates under ``inference_mode`` (and
    autocast with mixed precision): both switched off inside."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        yield


_TRAIN_NAMES = {"query_loss": "loss", "query_acc": "acc"}


def training_log(metrics: dict[str, Tensor], skipped_steps: int, lam: dict[str, Tensor] | None = None):
    """``(name, value, prog_bar)`` of every training-step log: the mean over the meta-batch of each per-task
    metric as ``train/<name>`` (``query_loss`` as ``train/loss``, ``query_acc`` as ``train/acc``), the maximum
    of ``inner_residual`` and ``cg_residual`` (``_max``), ``train/skipped_steps``, and a learned lam per
    parameter tensor (``train/lam/<name>``, mean over its entries)."""
    for key, value in metrics.items():
        yield f"train/{_TRAIN_NAMES.get(key, key)}", value.mean(), key in _TRAIN_NAMES
        if key in ("inner_residual", "cg_residual"):
            yield f"train/{key}_max", value.max(), False
    yield "train/skipped_steps", float(skipped_steps), False
    for name, value in (lam or {}).items():
        yield f"train/lam/{name}", value.float().mean(), False
