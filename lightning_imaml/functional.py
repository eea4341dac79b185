"""A network evaluated for a batch of tasks at once, each with its own parameters: the forward the engine
differentiates (pure torch).

``forward_tasks(model, params, x)`` returns ``out[t] = model(x[t]; params[t])`` for parameter leaves
``[T, *shape]`` and inputs ``x [T, n, ...]``. Derivatives are taken *outside* it by plain autograd: task t's
output depends only on row t, so one backward of the summed per-task losses gives every task's own gradient.
Three ways to evaluate it, the same numbers:

* ``"loop"`` (T = 1): ``torch.func.functional_call`` on the task's parameters; any module works, including
  ones that cannot be batched (BatchNorm updating running statistics, data-dependent control flow).
* ``"native"``: an ``nn.Sequential`` of standard layers (Conv2d, BatchNorm2d without running statistics,
  pooling, padding, activations, Dropout, Flatten, Linear) run directly on the stacked parameters: T
  convolutions become one grouped convolution over a ``[n, T * C, H, W]`` layout, T BatchNorms one
  BatchNorm over T * C channels, T linear layers one batched matmul. No copies between layers.
* ``"vmap"``: ``torch.func.vmap`` of ``functional_call`` over the task dimension, for any other module
  (``randomness="different"``: independent dropout masks per task).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .kernels import batch_norm_tasks, conv2d_tasks
from .params import ParamSpec

__all__ = [
    "ForwardCast",
    "TaskLoss",
    "active_cast",
    "forward_tasks",
    "mse_loss",
    "native_supported",
    "task_forward",
    "task_losses",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


class ForwardCast(NamedTuple):
    """Autocast setting for model forwards only: ``torch.autocast(device_type, dtype)``."""

    device_type: str
    dtype: torch.dtype


def active_cast(device_type: str) -> ForwardCast | None:
    """The autocast open now (e.g. around a Lightning step under ``precision="bf16-mixed"``), if any."""
    for dev in dict.fromkeys(("cuda", "cpu", device_type)):
        try:
            if torch.is_autocast_enabled(dev):
                return ForwardCast(dev, torch.get_autocast_dtype(dev))
        except (TypeError, RuntimeError):  # pragma: no cover - a device type this torch does not know
            continue
    return None


def autocast_ctx(cast: ForwardCast | None):
    if cast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=cast.device_type, dtype=cast.dtype)


def _float_out(out: Tensor) -> Tensor:
    # low-precision outputs of an autocast forward: losses and everything after them run in float32
    return out.float() if out.dtype in (torch.float16, torch.bfloat16) else out


def task_forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, cast: ForwardCast | None = None):
    """One task: ``model(x)`` with ``params`` substituted (functional_call); float32 out of an autocast."""
    with autocast_ctx(cast):
        out = functional_call(model, dict(params), (x,))
    return _float_out(out)


def mse_loss(out: Tensor, target: Tensor) -> Tensor:
    """Mean squared error, ``((out - target) ** 2).mean()``: the value of ``F.mse_loss``, written out because
    ``torch.func``'s forward-over-reverse Hessian-vector product fails on ``F.mse_loss`` in torch 2.14.1
    ("ZeroTensors are immutable")."""
    return ((out - target) ** 2).mean()


_ELEMENTWISE = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d,
)  # fmt: skip
"""Layers that act on each channel (and each sample) on their own: indifferent to how tasks are laid out."""


_SPATIAL = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d)


def native_supported(model: nn.Module) -> bool:
    """Whether :func:`forward_tasks` can run ``model`` natively (see the module docstring): an
    ``nn.Sequential`` of those layers, images through spatial layers, then a Flatten, then linear layers (or
    linear layers only)."""
    if not isinstance(model, nn.Sequential):
        return False
    images = flat = False
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                return False
        elif isinstance(layer, nn.BatchNorm2d):
            if layer.track_running_stats:
                return False
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return False
            flat = True
        elif not isinstance(layer, (nn.Linear, *_ELEMENTWISE)):
            return False
        if isinstance(layer, _SPATIAL):
            images = True
            if flat:  # a spatial layer after the Flatten
                return False
        if isinstance(layer, nn.Linear) and images and not flat:  # a linear layer on images
            return False
    return True


def _native(model: nn.Sequential, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    T, n = x.shape[:2]

    def param(prefix: str, name: str, layer: nn.Module) -> Tensor | None:
        key = f"{prefix}.{name}"
        if key in params:
            return params[key]
        own = getattr(layer, name)
        return None if own is None else own.expand(T, *own.shape)

    if x.dim() == 3:  # [T, n, features]: task-major from the start
        h, grouped = x, False
    else:  # images: [n, T * C, H, W], so that a grouped convolution sees one task per group
        h, grouped = x.transpose(0, 1).reshape(n, T * x.shape[2], *x.shape[3:]), True
    for prefix, layer in model.named_children():
        if isinstance(layer, nn.Conv2d):
            w, b = param(prefix, "weight", layer), param(prefix, "bias", layer)
            w = w.reshape(T * w.shape[1], *w.shape[2:])
            h = conv2d_tasks(
                h, w, None if b is None else b.reshape(-1), layer.stride, layer.padding, layer.dilation, T
            )
        elif isinstance(layer, nn.BatchNorm2d):
            w, b = param(prefix, "weight", layer), param(prefix, "bias", layer)
            w = None if w is None else w.reshape(-1)
            b = None if b is None else b.reshape(-1)
            h = batch_norm_tasks(h, w, b, layer.eps)
        elif isinstance(layer, nn.Flatten):
            h = h.reshape(n, T, -1).transpose(0, 1) if grouped else h.flatten(2)
            grouped = False
        elif isinstance(layer, nn.Linear):
            w, b = param(prefix, "weight", layer), param(prefix, "bias", layer)
            if b is None:
                h = torch.bmm(h, w.transpose(1, 2))
            else:
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
        else:
            h = layer(h)
    if grouped:
        return h.reshape(n, T, -1, *h.shape[2:]).transpose(0, 1)
    return h


def forward_tasks(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    cast: ForwardCast | None = None,
    mode: str = "auto",
) -> Tensor:
    """``out[t] = model(x[t]; params[t])``: params leaves ``[T, *shape]`` (the model's own tensors for any
    name not given), ``x [T, n, ...]`` -> ``[T, n, ...]``. mode: "loop" (T = 1), "native", "vmap", or "auto"
    (loop for T = 1, else native where :func:`native_supported` and no ``cast``, else vmap: under a bfloat16
    autocast the native path's gradient measured 3-13 % from float32's on conv nets, vmap's 0.3 %)."""
    T = x.shape[0]
    if mode == "auto":
        mode = "loop" if T == 1 else ("native" if native_supported(model) and cast is None else "vmap")
    with autocast_ctx(cast):
        if mode == "loop":
            if T != 1:
                raise ValueError(f"mode 'loop' evaluates one task at a time, got {T} tasks")
            out = functional_call(model, {k: v[0] for k, v in params.items()}, (x[0],)).unsqueeze(0)
        elif mode == "native":
            out = _native(model, params, x)
        elif mode == "vmap":
            out = torch.func.vmap(lambda p, xx: functional_call(model, p, (xx,)), randomness="different")(
                dict(params), x
            )
        else:
            raise ValueError(f"mode must be 'auto', 'loop', 'native' or 'vmap', got {mode!r}")
    return _float_out(out)


def task_losses(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    """``loss_fn(out[t], y[t])`` for every task -> ``[T]``; cross-entropy and :func:`mse_loss` in one
    kernel."""
    T = out.shape[0]
    if loss_fn is F.cross_entropy:
        return F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none").view(T, -1).mean(1)
    if loss_fn is mse_loss:
        return ((out - y) ** 2).reshape(T, -1).mean(1)
    if T == 1:
        return loss_fn(out[0], y[0]).reshape(1)
    return torch.func.vmap(loss_fn)(out, y)


class TaskLoss:
    """Per-task losses of T tasks as a function of their parameters: ``phi [T, P] -> [T]``.

    model, spec: the network and the layout of its (trainable) parameters in a row of phi; x ``[T, n, ...]``,
    y ``[T, n, ...]`` the tasks' data; ``mode`` as :func:`forward_tasks`. Inputs created under
    ``torch.inference_mode`` are cloned (they cannot be saved for backward).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ParamSpec,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        cast: ForwardCast | None = None,
        mode: str = "auto",
    ):
        self.model, self.spec, self.loss_fn, self.cast, self.mode = model, spec, loss_fn, cast, mode
        self.x = x.clone() if x.is_inference() else x
        self.y = y.clone() if y.is_inference() else y

    def select(self, rows: Tensor) -> TaskLoss:
        """The losses of the tasks ``rows`` only (a LongTensor of task indices)."""
        return TaskLoss(self.model, self.spec, self.x[rows], self.y[rows], self.loss_fn, self.cast, self.mode)

    def outputs(self, phi: Tensor) -> Tensor:
        """The network's outputs ``[T, n, ...]`` at ``phi``."""
        return forward_tasks(self.model, self.spec.unflatten(phi), self.x, self.cast, self.mode)

    def losses(self, out: Tensor) -> Tensor:
        return task_losses(self.loss_fn, out, self.y)

    def __call__(self, phi: Tensor) -> Tensor:
        return self.losses(self.outputs(phi))
