"""The tasks' forward (lightning_imaml.functional) and its kernels (lightning_imaml.kernels).

forward_tasks evaluates ``out[t] = model(x[t]; params[t])`` three ways: "native" (one grouped convolution /
BatchNorm / batched matmul for T tasks, with the kernels' own first and second derivatives), "vmap"
(torch.func) and "loop" (functional_call on one task). References, all float64: the per-task
``functional_call`` of the module (outputs), plain autograd of the summed per-task losses w.r.t. the stacked
parameters (gradients), one more backward of that gradient (Hessian-vector products), compared task by task
against the "loop" mode; the kernels against torch.autograd.gradcheck / gradgradcheck and against the first
and second derivatives of F.conv2d / F.batch_norm. Tasks have unlike parameters (theta plus per-task noise),
so a row mixed up with another shows.
"""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyCNN, rel
from torch import nn
from torch.func import functional_call

from lightning_imaml.functional import (
    ForwardCast,
    TaskLoss,
    forward_tasks,
    mse_loss,
    native_supported,
    task_forward,
    task_losses,
)
from lightning_imaml.kernels import batch_norm_tasks, conv2d_tasks, fastest
from lightning_imaml.models import MiniImageNetConv4, OmniglotConv4, SinusoidMLP
from lightning_imaml.params import ParamSpec

DT = torch.float64


def stacked_params(model, T, seed=0, scale=0.1):
    """The model's trainable parameters, one perturbed copy per task: {name: [T, *shape]} (unlike tasks)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v.detach() + scale * torch.randn(T, *v.shape, generator=g, dtype=v.dtype)
        for k, v in model.named_parameters()
        if v.requires_grad
    }


def directions(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}


def derivatives(model, params, x, y, loss_fn, mode, v):
    """(outputs, per-task losses, gradients, Hessian-vector products), each a list / tensor with the task
    dimension first: autograd of the summed per-task losses w.r.t. the stacked parameters, then one more
    backward of that gradient along v (double backward)."""
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    out = forward_tasks(model, leaves, x, mode=mode)
    losses = task_losses(loss_fn, out, y)
    grads = torch.autograd.grad(losses.sum(), list(leaves.values()), create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves.values(), grads, strict=True)]
    pairs = [(g, v[k]) for g, k in zip(grads, leaves, strict=True) if g.requires_grad]
    hv = torch.autograd.grad(
        [g for g, _ in pairs], list(leaves.values()), [w for _, w in pairs], allow_unused=True
    )
    hv = [torch.zeros_like(p) if h is None else h for p, h in zip(leaves.values(), hv, strict=True)]
    row = lambda ts: torch.cat([t.detach().reshape(t.shape[0], -1) for t in ts], 1)  # noqa: E731
    return out.detach(), losses.detach(), row(grads), row(hv)


def assert_modes_agree(model, x, y, loss_fn, modes=("native", "vmap"), tol=1e-10):
    T = x.shape[0]
    params = stacked_params(model, T)
    v = directions(params)
    # reference: each task on its own (mode "loop", T = 1) and, for the outputs, the module itself
    loop = [
        derivatives(
            model,
            {k: p[t : t + 1] for k, p in params.items()},
            x[t : t + 1],
            y[t : t + 1],
            loss_fn,
            "loop",
            {k: d[t : t + 1] for k, d in v.items()},
        )
        for t in range(T)
    ]
    for t in range(T):
        own = {k: p.detach() for k, p in model.named_parameters()} | {k: p[t] for k, p in params.items()}
        torch.testing.assert_close(
            loop[t][0][0], functional_call(model, own, (x[t],)), rtol=1e-13, atol=1e-13
        )
    assert len({round(float(r[1]), 10) for r in loop}) == T  # unlike tasks
    errs = {}
    for mode in modes:
        out, losses, grads, hv = derivatives(model, params, x, y, loss_fn, mode, v)
        assert out.shape == (T, *loop[0][0].shape[1:])
        e = [
            max(rel(out[t], r[0][0]), rel(losses[t], r[1][0]), rel(grads[t], r[2][0]), rel(hv[t], r[3][0]))
            for t, r in enumerate(loop)
        ]
        errs[mode] = max(e)
        assert all(r[2].norm() > 0 and r[3].norm() > 0 for r in loop)
    print(f"{type(model).__name__}: max rel. difference to the per-task loop {errs}")
    assert max(errs.values()) < tol, errs


@pytest.mark.parametrize("head", ["zero", "paper"])
def test_omniglot_conv4_modes_agree(head):
    torch.manual_seed(0)
    model = OmniglotConv4(5, hidden=8, head_init=head).double()
    x = torch.randn(3, 5, 1, 28, 28, dtype=DT)
    x[1] = 4 * x[1] + 1  # other batch statistics per task
    y = torch.arange(5).repeat(3, 1)
    assert native_supported(model)
    assert_modes_agree(model, x, y, F.cross_entropy)


def test_miniimagenet_conv4_modes_agree():
    torch.manual_seed(0)
    model = MiniImageNetConv4(5, hidden=8, head_init="paper").double()
    x = torch.randn(2, 2, 3, 84, 84, dtype=DT)
    y = torch.tensor([[0, 3], [4, 1]])
    assert native_supported(model)
    assert_modes_agree(model, x, y, F.cross_entropy)


def test_sinusoid_mlp_modes_agree():
    torch.manual_seed(0)
    model = SinusoidMLP(hidden=16).double()
    x = torch.linspace(-5, 5, 3 * 7, dtype=DT).reshape(3, 7, 1)
    y = torch.sin(x + torch.tensor([0.0, 1.0, 2.0], dtype=DT).view(3, 1, 1))
    assert native_supported(model)
    assert_modes_agree(model, x, y, mse_loss)


def odd_layers():
    """MaxPool2d, ZeroPad2d, a Conv2d without bias, BatchNorm2d(affine=False), AvgPool2d, other
    activations."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4, affine=False, track_running_stats=False),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.ZeroPad2d((1, 0, 0, 1)),
        nn.Conv2d(4, 3, 3, stride=2, dilation=1, bias=False),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.Tanh(),
        nn.AvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    )


def test_sequential_of_odd_layers_modes_agree():
    torch.manual_seed(0)
    model = odd_layers().double()
    x = torch.randn(3, 6, 2, 10, 10, dtype=DT)
    y = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 3, 2, 1, 0, 0], [1, 2, 3, 0, 1, 2]])
    assert native_supported(model)
    assert_modes_agree(model, x, y, F.cross_entropy)


@pytest.mark.parametrize(
    "layers,x_shape,out",
    [
        (
            lambda: (nn.Flatten(), nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)),
            (6,),
            (3,),
        ),
        (lambda: (nn.Flatten(), nn.Linear(36, 3, bias=False)), (1, 6, 6), (3,)),
        (lambda: (nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3, bias=False)), (1, 6, 6), (2, 2, 2)),
    ],
    ids=["features-flatten-bias-free-linear", "images-flatten-bias-free-linear", "ends-on-images"],
)
def test_sequential_edge_layouts_modes_agree(layers, x_shape, out):
    """The native forward's other layouts: bias-free linear layers (batched matmul without the bias) after a
    Flatten of feature vectors (a no-op there) or of images, and a conv net whose output is still an image
    batch; against the per-task loop (outputs, gradients, Hessian-vector products)."""
    torch.manual_seed(0)
    model = nn.Sequential(*layers()).double()
    assert native_supported(model)
    x = torch.randn(3, 4, *x_shape, dtype=DT)
    params = stacked_params(model, 3)
    assert forward_tasks(model, params, x, mode="native").shape == (3, 4, *out)

    def loss_fn(o, y):
        return ((o.flatten(1) - y) ** 2).mean()

    y = torch.randn(3, 4, math.prod(out), dtype=DT)
    assert_modes_agree(model, x, y, loss_fn)


def test_frozen_parameters_are_taken_from_the_module():
    torch.manual_seed(0)
    model = OmniglotConv4(5, hidden=8, head_init="paper").double()
    for name in ("conv1.weight", "bn2.weight", "fc.bias"):
        model.get_parameter(name).requires_grad_(False)
    with torch.no_grad():
        model.fc.bias.copy_(torch.arange(5.0, dtype=DT))  # a frozen value that shows in the logits
    params = stacked_params(model, 2)
    assert "conv1.weight" not in params and "fc.weight" in params
    x = torch.randn(2, 3, 1, 28, 28, dtype=DT)
    frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    ref = torch.stack(
        [functional_call(model, frozen | {k: p[t] for k, p in params.items()}, (x[t],)) for t in range(2)]
    )
    for mode in ("native", "vmap", "auto"):
        torch.testing.assert_close(
            forward_tasks(model, params, x, mode=mode), ref, rtol=1e-12, atol=1e-12, msg=mode
        )
    for t in range(2):
        one = forward_tasks(model, {k: p[t : t + 1] for k, p in params.items()}, x[t : t + 1], mode="loop")
        torch.testing.assert_close(one[0], ref[t], rtol=1e-12, atol=1e-12)


def test_gradients_flow_through_a_frozen_convolution():
    """A frozen convolution inside the net (its weight not trained, so autograd wants the input gradient
    only) passes the gradient on to the layers before it: the native gradients and HVPs as the loop's."""
    torch.manual_seed(0)
    model = OmniglotConv4(5, hidden=4, head_init="paper").double()
    for name in ("conv2.weight", "fc.weight"):  # a frozen linear weight comes from the module too
        model.get_parameter(name).requires_grad_(False)
    x = torch.randn(2, 3, 1, 28, 28, dtype=DT)
    y = torch.tensor([[0, 1, 2], [3, 4, 0]])
    assert "conv1.weight" in stacked_params(model, 2) and "conv2.weight" not in stacked_params(model, 2)
    assert_modes_agree(model, x, y, F.cross_entropy, modes=("native",))


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize(
    "model,ok",
    [
        (OmniglotConv4(5, hidden=4), True),
        (MiniImageNetConv4(5, hidden=4), True),
        (SinusoidMLP(), True),
        (TinyCNN(), True),
        (odd_layers(), True),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), False),  # running statistics
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), False),  # grouped convolution
        (NotSequential(), False),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), False),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")), False),
        (nn.Sequential(nn.Flatten(2)), False),
        (nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), False),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(4, 3)), False),  # a linear layer on images
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Conv2d(1, 2, 1)), False),  # spatial after Flatten
    ],
)
def test_native_supported(model, ok):
    assert native_supported(model) is ok


def test_forward_tasks_auto_mode_and_mode_errors():
    torch.manual_seed(0)
    model = NotSequential().double()  # not native: auto takes vmap
    params = stacked_params(model, 2)
    x = torch.randn(2, 4, 3, dtype=DT)
    ref = torch.stack(
        [functional_call(model, {k: p[t] for k, p in params.items()}, (x[t],)) for t in range(2)]
    )
    torch.testing.assert_close(forward_tasks(model, params, x), ref, rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match=r"2 tasks"):
        forward_tasks(model, params, x, mode="loop")
    with pytest.raises(ValueError, match=r"'batched'"):
        forward_tasks(model, params, x, mode="batched")


# ----------------------------------------------------------------------------------------- ForwardCast


def test_forward_cast_output_is_float32_and_rounded_like_a_self_autocasting_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    params = stacked_params(model, 2)
    x = torch.randn(2, 5, 3)
    cast = ForwardCast("cpu", torch.bfloat16)
    out = forward_tasks(model, params, x, cast, mode="vmap")
    full = forward_tasks(model, params, x, mode="vmap")
    assert out.dtype == torch.float32
    assert (out - full).abs().max() > 1e-4 * full.abs().max()  # bfloat16 rounding shows
    for t in range(2):
        one = task_forward(model, {k: p[t] for k, p in params.items()}, x[t], cast)
        assert one.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = functional_call(model, {k: p[t] for k, p in params.items()}, (x[t],)).float()
        torch.testing.assert_close(one, ref, rtol=0, atol=0)
        # vmap runs another kernel: the same to a few bfloat16 eps of the outputs' scale
        torch.testing.assert_close(out[t], ref, rtol=0, atol=4 * 2**-8 * ref.abs().max().item())


@pytest.mark.parametrize(
    "model_fn",
    [TinyCNN, lambda: OmniglotConv4(5, hidden=4, head_init="paper")],
    ids=["TinyCNN", "OmniglotConv4"],
)
def test_native_forward_under_a_forward_cast_is_differentiable_like_vmap(model_fn):
    """Under a ForwardCast, mode "native" is differentiable twice (a gradient and a Hessian-vector product),
    and "auto" takes vmap (bit for bit): the native path's bfloat16 gradient is measured, not promised, to be
    as close to float32 as vmap's (it was not on OmniglotConv4)."""
    torch.manual_seed(0)
    model = model_fn()
    size = 28 if isinstance(model, OmniglotConv4) else 8
    x = torch.randn(2, 5, 1, size, size)
    y = torch.arange(5).repeat(2, 1)
    params = stacked_params(model, 2)
    v = directions(params)
    cast = ForwardCast("cpu", torch.bfloat16)
    res = {}
    for mode in ("vmap", "native", "auto"):
        leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        loss = task_losses(F.cross_entropy, forward_tasks(model, leaves, x, cast, mode), y)
        g = torch.autograd.grad(loss.sum(), list(leaves.values()), create_graph=True)
        hv = torch.autograd.grad(g, list(leaves.values()), [v[k] for k in leaves], allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h for p, h in zip(leaves.values(), hv, strict=True)]
        res[mode] = [torch.cat([t.detach().reshape(2, -1) for t in ts], 1) for ts in (g, hv)] + [
            loss.detach()
        ]
        assert all(torch.isfinite(t).all() for t in res[mode])
    assert all(torch.equal(a, b) for a, b in zip(res["auto"], res["vmap"], strict=True))
    errs = [rel(a, b) for a, b in zip(res["native"], res["vmap"], strict=True)]
    print(f"native vs vmap under bfloat16: gradient {errs[0]:.1e}, H v {errs[1]:.1e}, losses {errs[2]:.1e}")
    assert errs[2] < 1e-2


# ------------------------------------------------------------------------------------------------ kernels


def _conv_args(stride, bias, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2 * groups, 5, 5, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(3 * groups, 2, 3, 3, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(3 * groups, generator=g, dtype=DT, requires_grad=True) if bias else None
    return x, w, b, dict(stride=(stride, stride), padding=(1, 1), dilation=(1, 1), groups=groups)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_tasks_gradcheck_and_gradgradcheck(stride, bias, groups):
    x, w, b, kw = _conv_args(stride, bias, groups)
    inputs = (x, w) if b is None else (x, w, b)

    def fn(x, w, b=None):
        return conv2d_tasks(x, w, b, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_tasks_gradcheck_and_gradgradcheck(affine):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 3, generator=g, dtype=DT, requires_grad=True)
    x.data[:, 1] = 5 * x.data[:, 1] + 2  # channels with other statistics
    gamma = (1 + 0.5 * torch.randn(4, generator=g, dtype=DT)).requires_grad_(True)
    beta = torch.randn(4, generator=g, dtype=DT, requires_grad=True)
    if affine:
        inputs, fn = (x, gamma, beta), lambda x, gm, bt: batch_norm_tasks(x, gm, bt, 1e-5)
    else:
        inputs, fn = (x,), lambda x: batch_norm_tasks(x, None, None, 1e-5)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def first_and_second(fn, inputs, seed=2):
    """(out, d L / d inputs, d <d L / d inputs, v> / d inputs) for L = sum(r * out^2) (a nonlinear loss)."""
    g = torch.Generator().manual_seed(seed)
    out = fn(*inputs)
    r = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grads = torch.autograd.grad((r * out**2).sum(), inputs, create_graph=True)
    v = [torch.randn(i.shape, generator=g, dtype=i.dtype) for i in inputs]
    second = torch.autograd.grad(sum((a * b).sum() for a, b in zip(grads, v, strict=True)), inputs)
    return out.detach(), [a.detach() for a in grads], list(second)


def assert_same_derivatives(ours, ref, tol=1e-12):
    (o1, g1, s1), (o2, g2, s2) = ours, ref
    assert rel(o1, o2) < tol
    for a, b in zip(g1 + s1, g2 + s2, strict=True):
        assert rel(a, b) < tol


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_tasks_equals_f_conv2d_with_first_and_second_derivatives(stride, groups):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3 * groups, 12, 12, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(8 * groups, 3, 3, 3, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(8 * groups, generator=g, dtype=DT, requires_grad=True)
    args = ((stride, stride), (1, 1), (1, 1), groups)
    ours = first_and_second(lambda x, w, b: conv2d_tasks(x, w, b, *args), (x, w, b))
    ref = first_and_second(lambda x, w, b: F.conv2d(x, w, b, *args), (x, w, b))
    assert_same_derivatives(ours, ref)


def test_conv2d_tasks_takes_the_integer_arguments_f_conv2d_takes():
    """The docstring promises F.conv2d(x, w, b, stride, padding, dilation, groups): ints included."""
    x, w, b, _ = _conv_args(2, True, 1)
    ours = first_and_second(lambda x, w, b: conv2d_tasks(x, w, b, 2, 1, 1, 1), (x, w, b))
    ref = first_and_second(lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 1), (x, w, b))
    assert_same_derivatives(ours, ref)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6, 4, 5, 5), (2, 16, 14, 14), (40, 3, 1, 1)])
def test_batch_norm_tasks_equals_f_batch_norm_with_first_and_second_derivatives(shape, affine):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g, dtype=DT) + 1).requires_grad_(True)
    gamma = torch.randn(shape[1], generator=g, dtype=DT, requires_grad=True)
    beta = torch.randn(shape[1], generator=g, dtype=DT, requires_grad=True)
    inputs = (x, gamma, beta) if affine else (x,)

    def ours(x, gm=None, bt=None):
        return batch_norm_tasks(x, gm, bt, 1e-3)

    def ref(x, gm=None, bt=None):
        return F.batch_norm(x, None, None, gm, bt, training=True, eps=1e-3)

    assert_same_derivatives(first_and_second(ours, inputs), first_and_second(ref, inputs), tol=1e-11)


def force_conv_choice(x_shape, w_shape, dtype, stride, groups, choice):
    """As :func:`force_batch_norm_forward`, for conv2d_tasks' three primitives (forward, input gradient,
    weight gradient; padding 1, dilation 2) on inputs of ``x_shape``: 0 the grouped call, 1 one call per
    group."""
    for kind in ("fwd", "gin", "gw"):
        key = ("cpu", kind, tuple(x_shape), tuple(w_shape), dtype, (stride, stride), (1, 1), (2, 2), groups,
               torch.get_num_threads())  # fmt: skip
        force_choice(key, choice)


@pytest.mark.parametrize("choice", [0, 1])
def test_grouped_conv_of_t_tasks_equals_t_separate_convs(choice):
    """Either of the grouped call and the per-group calls (forced) for groups = T gives what T one-group
    convolutions (no choice there) and F.conv2d give, derivatives included."""
    T = 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, T * 2, 9 + choice, 9, generator=g, dtype=DT, requires_grad=True)
    for stride in (1, 2):
        force_conv_choice(x.shape, (T * 5, 2, 3, 3), DT, stride, T, choice)  # padding 1, dilation 2
    w = torch.randn(T * 5, 2, 3, 3, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(T * 5, generator=g, dtype=DT, requires_grad=True)
    for stride in (1, 2):
        args = ((stride, stride), (1, 1), (2, 2))  # padding unlike dilation: neither stands in for the other

        def separate(x, w, b, args=args):
            parts = zip(x.chunk(T, 1), w.chunk(T, 0), b.chunk(T, 0), strict=True)
            return torch.cat([conv2d_tasks(xi, wi, bi, *args, 1) for xi, wi, bi in parts], 1)

        grouped = first_and_second(lambda x, w, b, args=args: conv2d_tasks(x, w, b, *args, T), (x, w, b))
        assert_same_derivatives(grouped, first_and_second(separate, (x, w, b)))
        assert_same_derivatives(
            grouped, first_and_second(lambda x, w, b, a=args: F.conv2d(x, w, b, *a, T), (x, w, b))
        )


def test_fastest_returns_a_candidate_index_and_remembers_it():
    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.02)  # vs a no-op: the choice cannot be in doubt
        return torch.zeros(1)

    def quick():
        calls.append("quick")
        return torch.zeros(1)

    key = ("cpu", "test_functional", time.time_ns())  # a key no kernel uses
    assert fastest(key, slow, quick) == 1 and calls.count("slow") >= 2 and calls.count("quick") >= 2
    calls.clear()
    assert fastest(key, quick, slow) == 1 and calls == []  # remembered for the key: not measured again
    # off the CPU: the first candidate, nothing measured
    assert fastest(("cuda", "test_functional", time.time_ns()), slow, quick) == 0 and calls == []


def force_batch_norm_forward(shape, dtype, choice):
    """Decide batch_norm_tasks' forward for inputs of ``shape`` and ``dtype`` (0: the fused kernel, 1: two
    passes) before it is measured: ``fastest`` remembers the first decision for a key, so deciding it through
    ``fastest`` itself with a slow and a quick candidate forces either one. The key is the one kernels.py
    builds (device, "bn", shape, dtype, threads); shapes are used by one test each, so nothing else sees
    it."""
    force_choice(("cpu", "bn", tuple(shape), dtype, torch.get_num_threads()), choice)


def force_choice(key, choice):
    """Decide ``fastest``'s choice for ``key`` (0 or 1) through ``fastest`` itself: a slow and a quick
    candidate."""

    def slow():
        time.sleep(0.02)  # vs a no-op: the choice cannot be in doubt

    assert fastest(key, *((lambda: None, slow) if choice == 0 else (slow, lambda: None))) == choice


@pytest.mark.parametrize("choice", [0, 1])
def test_batch_norm_tasks_gives_the_same_numbers_whichever_forward_is_chosen(choice):
    """Both forwards of the BatchNorm kernel (the fused one and the two-pass one, forced), first and second
    derivatives included."""
    shape = (3, 5, 7, 4 + choice)  # a shape of its own per choice
    force_batch_norm_forward(shape, DT, choice)
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(shape, generator=g, dtype=DT) - 1).requires_grad_(True)
    gamma = torch.randn(shape[1], generator=g, dtype=DT, requires_grad=True)
    beta = torch.randn(shape[1], generator=g, dtype=DT, requires_grad=True)
    ours = first_and_second(lambda x, gm, bt: batch_norm_tasks(x, gm, bt, 1e-5), (x, gamma, beta))
    ref = first_and_second(
        lambda x, gm, bt: F.batch_norm(x, None, None, gm, bt, training=True), (x, gamma, beta)
    )
    assert_same_derivatives(ours, ref, tol=1e-11)


def test_conv2d_tasks_under_autocast_differentiates_like_f_conv2d():
    """What the native forward meets under a ForwardCast: a convolution run under torch.autocast. Output
    dtype, values and weight and bias gradients as F.conv2d's (to bfloat16 rounding)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=g)
    w = torch.randn(6, 3, 3, 3, generator=g, requires_grad=True)
    b = 3 + torch.randn(6, generator=g, requires_grad=True)  # large: a wrong sign would show in the outputs
    res = []
    for conv in (conv2d_tasks, F.conv2d):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x, w, b, (1, 1), (1, 1), (1, 1), 1)
        res.append((out.detach(), torch.autograd.grad((out.float() ** 2).sum(), (w, b))))
    assert (
        res[0][0].dtype == res[1][0].dtype == torch.bfloat16
        and rel(res[0][0].float(), res[1][0].float()) < 1e-2
    )
    assert all(rel(a, c) < 1e-2 for a, c in zip(res[0][1], res[1][1], strict=True))


@pytest.mark.parametrize("choice", [0, 1])
def test_batch_norm_tasks_of_bfloat16_activations_differentiates_like_f_batch_norm(choice):
    """What the native forward meets under a ForwardCast: BatchNorm of bfloat16 activations (a convolution's
    autocast output) with float32 affine parameters. Output dtype and gradients as F.batch_norm's, with
    either forward forced (see test_batch_norm_tasks_gives_the_same_numbers_whichever_forward_is_chosen)."""
    shape = (4, 3, 5, 6 + choice)
    force_batch_norm_forward(shape, torch.bfloat16, choice)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(shape, generator=g).bfloat16().requires_grad_(True)
    gamma = torch.ones(3, requires_grad=True)
    beta = torch.zeros(3, requires_grad=True)
    res = []
    for bn in (
        lambda: batch_norm_tasks(h, gamma, beta, 1e-5),
        lambda: F.batch_norm(h, None, None, gamma, beta, True),
    ):
        out = bn()
        res.append((out.dtype, torch.autograd.grad((out.float() ** 2).sum(), (h, gamma))))
    assert res[0][0] == res[1][0] == torch.bfloat16
    assert all(rel(a.float(), b.float()) < 1e-2 for a, b in zip(res[0][1], res[1][1], strict=True))


@pytest.mark.parametrize("choice", [0, 1])
def test_batch_norm_tasks_without_affine_parameters_keeps_float32_statistics(choice):
    """BatchNorm without affine parameters (gamma, beta None) of bfloat16 activations: the same numbers as
    with float32 ones and zeros given, i.e. the statistics stay in float32 (in bfloat16 they would round)."""
    shape = (2, 3, 5, 9 + choice)
    force_batch_norm_forward(shape, torch.bfloat16, choice)
    g = torch.Generator().manual_seed(0)
    h = (3 + torch.randn(shape, generator=g)).bfloat16().requires_grad_(True)
    res = []
    for gamma, beta in ((None, None), (torch.ones(3), torch.zeros(3))):
        out = batch_norm_tasks(h, gamma, beta, 1e-5)
        res.append((out, torch.autograd.grad((out.float() ** 3).sum(), h)[0]))
    assert res[0][0].dtype == torch.bfloat16
    for a, b in zip(res[0], res[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(batch_norm_tasks(h, None, None, 1e-5), res[1][0], rtol=0, atol=0)


@pytest.mark.parametrize("choice", [0, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_batch_norm_tasks_under_autocast_keeps_the_statistics_dtype(choice, dtype):
    """Under an autocast, BatchNorm of bfloat16 activations with bfloat16 parameters (a model cast to
    bfloat16) keeps float32 statistics, as F.batch_norm does, and float64 stays float64: the same numbers
    as outside the autocast with float32 (float64) parameters."""
    shape = (2, 3, 5, 11 + choice + 2 * (dtype == torch.float64))
    force_batch_norm_forward(shape, dtype, choice)
    g = torch.Generator().manual_seed(0)
    h = (3 + torch.randn(shape, generator=g)).to(dtype)
    gamma = (1 + 0.1 * torch.randn(3, generator=g, dtype=torch.float64)).to(dtype)
    beta = (0.1 * torch.randn(3, generator=g, dtype=torch.float64)).to(dtype)
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    ref = batch_norm_tasks(h, gamma.to(wide), beta.to(wide), 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch_norm_tasks(h, gamma, beta, 1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------- TaskLoss, task_losses


@pytest.mark.parametrize("mode", ["auto", "native", "vmap"])
def test_task_loss_rows_equal_per_task_losses(mode):
    torch.manual_seed(0)
    model = TinyCNN().double()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    spec = ParamSpec.of(theta)
    T = 3
    phi = spec.flatten(stacked_params(model, T), batch_dims=1)
    x = torch.randn(T, 5, 1, 8, 8, dtype=DT)
    y = torch.tensor([[0, 1, 2, 3, 4], [4, 4, 0, 1, 2], [1, 1, 1, 0, 0]])
    loss = TaskLoss(model, spec, x, y, F.cross_entropy, mode=mode)
    rows = loss(phi)
    out = loss.outputs(phi)
    assert rows.shape == (T,) and out.shape == (T, 5, 5)
    torch.testing.assert_close(loss.losses(out), rows, rtol=0, atol=0)
    for t in range(T):
        logits = functional_call(model, spec.unflatten(phi[t]), (x[t],))
        torch.testing.assert_close(out[t], logits, rtol=1e-12, atol=1e-13)
        assert rows[t].item() == pytest.approx(F.cross_entropy(logits, y[t]).item(), rel=1e-12)
        one = TaskLoss(model, spec, x[t : t + 1], y[t : t + 1], F.cross_entropy, mode="loop")
        assert one(phi[t : t + 1])[0].item() == pytest.approx(rows[t].item(), rel=1e-12)


@pytest.mark.parametrize("mode", ["native", "vmap"])
def test_task_loss_select_keeps_the_forward_cast_and_mode(mode):
    """select(rows) (a batched solve dropping its finished tasks) is the same loss on fewer rows: same data,
    same autocast, same forward mode; under a bfloat16 cast the two modes round differently, so a lost setting
    shows in the last bits."""
    torch.manual_seed(0)
    model = TinyCNN()
    spec = ParamSpec.of({k: v.detach() for k, v in model.named_parameters()})
    T = 4
    phi = spec.flatten(stacked_params(model, T), batch_dims=1)
    x = torch.randn(T, 5, 1, 8, 8)
    y = torch.arange(5).repeat(T, 1)
    cast = ForwardCast("cpu", torch.bfloat16)
    rows = torch.tensor([3, 1])
    picked = TaskLoss(model, spec, x, y, F.cross_entropy, cast, mode).select(rows)(phi[rows])
    ref = TaskLoss(model, spec, x[rows], y[rows], F.cross_entropy, cast, mode)(phi[rows])
    torch.testing.assert_close(picked, ref, rtol=0, atol=0)
    other = "vmap" if mode == "native" else "native"
    for cast_, mode_ in ((None, mode), (cast, other)):
        changed = TaskLoss(model, spec, x[rows], y[rows], F.cross_entropy, cast_, mode_)(phi[rows])
        assert not torch.equal(changed, ref), (cast_, mode_)


def test_task_loss_of_inference_mode_inputs_is_differentiable():
    """Lightning evaluates under torch.inference_mode: inputs made there still give gradients (outside it)."""
    torch.manual_seed(0)
    model = TinyCNN().double()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    spec = ParamSpec.of(theta)
    with torch.inference_mode():
        x = torch.randn(2, 5, 1, 8, 8, dtype=DT)
        y = torch.arange(5).repeat(2, 1)
    phi = spec.flatten(stacked_params(model, 2), batch_dims=1).requires_grad_(True)
    (g,) = torch.autograd.grad(TaskLoss(model, spec, x, y, F.cross_entropy)(phi).sum(), phi)
    phi2 = phi.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(
        TaskLoss(model, spec, x.clone(), y.clone(), F.cross_entropy)(phi2).sum(), phi2
    )
    assert torch.equal(g, ref) and g.norm() > 0


def smooth_ce(out, y):
    return F.cross_entropy(out, y, label_smoothing=0.2)


@pytest.mark.parametrize(
    "loss_fn,kind",
    [
        (F.cross_entropy, "classification"),
        (mse_loss, "regression"),
        (F.mse_loss, "regression"),  # not the fast path: vmap of the function
        (smooth_ce, "classification"),
        (functools.partial(F.cross_entropy, reduction="sum"), "classification"),
        (lambda out, y: (out - y).abs().mean() + (out**2).sum(), "regression"),
    ],
)
@pytest.mark.parametrize("T", [1, 3])
def test_task_losses_equal_the_loss_function_task_by_task(loss_fn, kind, T):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(T, 6, 4, generator=g, dtype=DT, requires_grad=True)
    if kind == "classification":
        y = torch.randint(0, 4, (T, 6), generator=g)
    else:
        y = torch.randn(T, 6, 4, generator=g, dtype=DT)
    rows = task_losses(loss_fn, out, y)
    assert rows.shape == (T,)
    (grad,) = torch.autograd.grad(rows.sum(), out)
    for t in range(T):
        o = out[t].detach().requires_grad_(True)
        ref = loss_fn(o, y[t])
        assert rows[t].item() == pytest.approx(ref.item(), rel=1e-12)
        torch.testing.assert_close(grad[t], torch.autograd.grad(ref, o)[0], rtol=1e-12, atol=1e-15)
