"""Convolution and BatchNorm for T tasks at once, with first and second derivatives written out (pure torch).

The engine's Hessian-vector products differentiate a gradient that itself went through these layers, so
their double backward runs as often as their forward. PyTorch's own double backward of a grouped convolution
loops over the groups (one small convolution per task) and the one of BatchNorm is a chain of ~35 elementwise
kernels; here both are expressed in the same few primitives as the first derivatives:

* convolution: the forward, the input gradient and the weight gradient (three calls of ``torch``'s kernels);
  the double backward is two forwards, one input and one weight gradient.
* BatchNorm over batch statistics: the fused forward and backward kernels; the double backward in closed
  form with the projection P(v) = v - mean(v) - xhat mean(v xhat) (derivation in :class:`_BatchNormBackward`).

On CPU each convolution primitive is run either as one grouped call or as one call per group, whichever
:func:`fastest` measured faster for that shape (oneDNN's grouped input gradient of a strided convolution
and its grouped forward of a one-channel convolution measured 2-4x slower per task than the per-task calls,
while the other shapes favour the grouped call). Every choice gives the same numbers up to float rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

__all__ = ["batch_norm_tasks", "conv2d_tasks", "fastest"]

_CHOICES: dict[tuple, int] = {}


def fastest(key: tuple, *candidates: Callable[[], Tensor]) -> int:
    """Index of the fastest of ``candidates`` (interchangeable ways to compute one result) for this ``key``
    (operation and shapes): measured once, best of 3 each after a warm-up, then remembered. Off the CPU:
    always the first."""
    if key not in _CHOICES:
        if key[0] != "cpu":
            _CHOICES[key] = 0
        else:
            times = []
            for fn in candidates:
                fn()
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - start)
                times.append(best)
            _CHOICES[key] = times.index(min(times))
    return _CHOICES[key]


class _Conv:
    """The three convolution primitives for one layer's settings (stride, padding, dilation, groups)."""

    def __init__(self, stride, padding, dilation, groups):
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def _key(self, kind, x, w):
        return (x.device.type, kind, tuple(x.shape), tuple(w.shape), x.dtype, self.stride, self.padding,
                self.dilation, self.groups, torch.get_num_threads())  # fmt: skip

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        g = self.groups

        def grouped():
            return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, g)

        def per_group():
            xs, ws = x.chunk(g, 1), w.chunk(g, 0)
            return torch.cat(
                [
                    F.conv2d(a, b, None, self.stride, self.padding, self.dilation)
                    for a, b in zip(xs, ws, strict=True)
                ],
                1,
            )

        return (
            grouped if g == 1 else (grouped, per_group)[fastest(self._key("fwd", x, w), grouped, per_group)]
        )()

    def _backward(self, gy, x, w, mask, groups):
        return torch.ops.aten.convolution_backward(
            gy, x, w, None, self.stride, self.padding, self.dilation, False, [0, 0], groups, mask
        )

    def input_grad(self, gy: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """d <gy, conv(x, w)> / dx (x only gives the shape)."""
        g = self.groups

        def grouped():
            return self._backward(gy, x, w, [True, False, False], g)[0]

        def per_group():
            parts = zip(gy.chunk(g, 1), x.chunk(g, 1), w.chunk(g, 0), strict=True)
            return torch.cat([self._backward(a, b, c, [True, False, False], 1)[0] for a, b, c in parts], 1)

        return (
            grouped if g == 1 else (grouped, per_group)[fastest(self._key("gin", x, w), grouped, per_group)]
        )()

    def weight_grad(self, gy: Tensor, x: Tensor, w: Tensor) -> Tensor:
        """d <gy, conv(x, w)> / dw (w only gives the shape)."""
        g = self.groups

        def grouped():
            return self._backward(gy, x, w, [False, True, False], g)[1]

        def per_group():
            parts = zip(gy.chunk(g, 1), x.chunk(g, 1), w.chunk(g, 0), strict=True)
            return torch.cat([self._backward(a, b, c, [False, True, False], 1)[1] for a, b, c in parts], 0)

        return (
            grouped if g == 1 else (grouped, per_group)[fastest(self._key("gw", x, w), grouped, per_group)]
        )()


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, conv):
        ctx.save_for_backward(x, w)
        ctx.conv = conv
        return conv.forward(x, w)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx, gw = _ConvBackwardFn.apply(gy, x, w, ctx.conv, ctx.needs_input_grad[0])
        return gx, gw, None


class _ConvBackwardFn(torch.autograd.Function):
    """(gy, x, w) -> (dx, dw) of <gy, conv(x, w)>; bilinear in (gy, w) and (gy, x), so its backward is again
    made of convolutions (see the module docstring)."""

    @staticmethod
    def forward(ctx, gy, x, w, conv, want_gx):
        ctx.save_for_backward(gy, x, w)
        ctx.conv = conv
        gx = conv.input_grad(gy, x, w) if want_gx else None
        return gx, conv.weight_grad(gy, x, w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ggx, ggw):
        gy, x, w = ctx.saved_tensors
        conv = ctx.conv
        d_gy = d_x = d_w = None
        # <ggx, dx(gy, w)> = <conv(ggx, w), gy>: d/dgy = conv(ggx, w), d/dw = weight grad (input ggx, output
        # gy)
        # <ggw, dw(gy, x)> = <conv(x, ggw), gy>: d/dgy = conv(x, ggw), d/dx = input grad (weight ggw)
        if ggx is not None:
            d_gy = conv.forward(ggx, w)
            if ctx.needs_input_grad[2]:
                d_w = conv.weight_grad(gy, ggx, w)
        if ggw is not None:
            term = conv.forward(x, ggw)
            d_gy = term if d_gy is None else d_gy + term
            if ctx.needs_input_grad[1]:
                d_x = conv.input_grad(gy, x, ggw)
        return d_gy, d_x, d_w, None, None


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def conv2d_tasks(x: Tensor, w: Tensor, b: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """``F.conv2d(x, w, b, stride, padding, dilation, groups)`` with the derivatives of this module. Under
    autocast the inputs are cast to its dtype first (as autocast does for ``F.conv2d``), so the saved tensors
    and the backward run in one dtype."""
    conv = _Conv(_pair(stride), _pair(padding), _pair(dilation), groups)
    dtype = _autocast_dtype(x)
    if dtype is None:
        out = _ConvFn.apply(x, w, conv)
        return out if b is None else out + b.view(1, -1, 1, 1)
    with torch.autocast(x.device.type, enabled=False):
        out = _ConvFn.apply(x.to(dtype), w.to(dtype), conv)
        return out if b is None else out + b.to(dtype).view(1, -1, 1, 1)


def _project(v: Tensor, xhat: Tensor) -> Tensor:
    """P(v) = v - mean(v) - xhat mean(v xhat), per channel (means over dims 0, 2, 3)."""
    dims = (0, 2, 3)
    return v - v.mean(dims, keepdim=True) - xhat * (v * xhat).mean(dims, keepdim=True)


class _BatchNormFn(torch.autograd.Function):
    """y = gamma xhat + beta, xhat = (x - mean) r, r = (var + eps)^-1/2, statistics of the batch per
    channel."""

    @staticmethod
    def forward(ctx, x, gamma, beta, eps):
        def native():
            return torch.ops.aten.native_batch_norm(x, gamma, beta, None, None, True, 0.0, eps)

        def two_pass():  # 2.4x faster than native on [5, 512, 14, 14] NCHW, slower on small images
            xv = x.reshape(x.shape[0], x.shape[1], -1).to(gamma.dtype)  # statistics in the parameters' dtype
            m = xv.shape[0] * xv.shape[2]
            mean = xv.sum(2).sum(0) / m
            xc = xv - mean.view(1, -1, 1)
            rstd = torch.rsqrt(torch.linalg.vecdot(xc, xc, dim=2).sum(0) / m + eps)
            y = torch.addcmul(beta.view(1, -1, 1), xc, (gamma * rstd).view(1, -1, 1))
            return y.view(x.shape).to(x.dtype), mean, rstd

        key = (x.device.type, "bn", tuple(x.shape), x.dtype, torch.get_num_threads())
        y, mean, rstd = (native, two_pass)[fastest(key, native, two_pass)]()
        ctx.save_for_backward(x, gamma, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, gamma, mean, rstd = ctx.saved_tensors
        return (*_BatchNormBackward.apply(gy.to(x.dtype), x, gamma, mean, rstd, ctx.eps), None)


class _BatchNormBackward(torch.autograd.Function):
    """(gy, x, gamma) -> (dx, dgamma, dbeta): dx = gamma r P(gy), dgamma = sum gy xhat, dbeta = sum gy.

    Double backward, with cotangents u (for dx), a (dgamma), c (dbeta), per channel over m entries, means over
    the m entries, A = mean(gy), B = mean(gy xhat), since delta xhat = r P(delta x) and
    delta r = -r^2 mean(xhat delta x):
        d/dgy    = gamma r P(u) + a xhat + c
        d/dgamma = r sum(u P(gy))
        d/dx     = a r P(gy) + gamma r^2 [ -(mean(u gy) - mean(u) A) xhat + B mean(u xhat) xhat - B P(u)
                                          - mean(u xhat) P(gy) ]
    """

    @staticmethod
    def forward(ctx, gy, x, gamma, mean, rstd, eps):
        ctx.save_for_backward(gy, x, gamma, mean, rstd)
        return torch.ops.aten.native_batch_norm_backward(
            gy, x, gamma, None, None, mean, rstd, True, eps, [True, True, True]
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, u, a, c):
        gy, x, gamma, mean, rstd = ctx.saved_tensors
        dims = (0, 2, 3)
        shape = (1, -1, 1, 1)
        r = rstd.view(shape)
        g = gamma.view(shape)
        xhat = (x - mean.view(shape)) * r
        p_gy = _project(gy, xhat)
        d_gy = d_x = d_gamma = None
        if u is not None:
            p_u = _project(u, xhat)
            d_gy = g * r * p_u
            if ctx.needs_input_grad[2]:
                d_gamma = (u * p_gy).sum(dims) * rstd
            if ctx.needs_input_grad[1]:
                A = gy.mean(dims, keepdim=True)
                B = (gy * xhat).mean(dims, keepdim=True)
                u_gy = (u * gy).mean(dims, keepdim=True) - u.mean(dims, keepdim=True) * A
                u_xhat = (u * xhat).mean(dims, keepdim=True)
                d_x = (g * r * r) * ((B * u_xhat - u_gy) * xhat - B * p_u - u_xhat * p_gy)
        if a is not None:
            a = a.view(shape)
            d_gy = a * xhat if d_gy is None else d_gy + a * xhat
            if ctx.needs_input_grad[1]:
                term = a * r * p_gy
                d_x = term if d_x is None else d_x + term
        if c is not None:
            c = c.view(shape)
            d_gy = c.expand_as(gy) if d_gy is None else d_gy + c

        def cast(t, like):  # mixed precision: each gradient in its input's dtype
            return None if t is None else t.to(like.dtype)

        return cast(d_gy, gy), cast(d_x, x), cast(d_gamma, gamma), None, None, None


def batch_norm_tasks(x: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float) -> Tensor:
    """``F.batch_norm(x, None, None, gamma, beta, training=True, eps=eps)`` for ``[N, C, H, W]`` with the
    derivatives of this module."""
    # the fused kernels' backward wants both affine parameters: constants where the layer has none (in float32
    # for a low-precision x, as autocast keeps BatchNorm's parameters)
    low = x.dtype in (torch.float16, torch.bfloat16)
    pdtype = torch.float32 if low else x.dtype
    gamma = x.new_ones(x.shape[1], dtype=pdtype) if gamma is None else gamma
    beta = x.new_zeros(x.shape[1], dtype=pdtype) if beta is None else beta
    if _autocast_dtype(x) is None:
        return _BatchNormFn.apply(x, gamma, beta, eps)
    with torch.autocast(
        x.device.type, enabled=False
    ):  # x keeps its dtype, statistics in float32 (as F.batch_norm)
        return _BatchNormFn.apply(x, gamma.float() if low else gamma, beta.float() if low else beta, eps)
