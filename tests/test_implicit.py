"""Tests of lightning_imaml.implicit against independent ground truths: dense Hessians (torch.func.hessian),
dense solves (torch.linalg.solve), closed-form ridge meta-gradients, finite differences, and the one-task dict
API for the [T, P] row API. Measured errors are printed (pytest -s). Conjugate gradient itself: test_cg.py."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import rel, ridge_task
from torch.func import functional_call

from lightning_imaml.cg import CG, CGInfo, conjugate_gradient
from lightning_imaml.implicit import (
    ImplicitGradient,
    RetainedHVP,
    grad_and_hvp,
    hessian_vector_product,
    implicit_meta_gradient,
    implicit_solve,
    value_and_grad,
)
from lightning_imaml.params import ParamSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def flat(d):
    """A dict of tensors as one vector, in the dict's order (ParamSpec's layout)."""
    return ParamSpec.of(d).flatten(d)


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def small_convbn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 3),
    ).double()


def dense_hessian(loss_fn, params):
    """The P x P Hessian of a dict loss by torch.func.hessian of the flat vector (ParamSpec's layout)."""
    spec = ParamSpec.of(params)
    H = torch.func.hessian(lambda v: loss_fn(spec.unflatten(v)))(
        spec.flatten({k: v.detach() for k, v in params.items()})
    )
    return H.reshape(spec.numel, spec.numel)


def mlp_tasks(T=3, n=10, seed=0):
    """T regression tasks for small_mlp: (model, per-task dict losses, per-task parameter dicts, all
    different)."""
    model = small_mlp()
    gen = torch.Generator().manual_seed(seed)
    base = {k: v.detach() for k, v in model.named_parameters()}
    losses, params = [], []
    for t in range(T):
        x = (1.0 + t) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        y = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        losses.append(lambda p, x=x, y=y: ((functional_call(model, p, (x,)) - y) ** 2).mean())
        params.append(
            {k: v + 0.2 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in base.items()}
        )
    return model, losses, params


def rows_loss(losses, spec):
    """Per-task dict losses as one loss of [T, P] rows -> [T] (task t reads row t only)."""
    return lambda phi: torch.stack([fn(spec.unflatten(phi[t])) for t, fn in enumerate(losses)])


# -------------------------------------------------------------------------------------------- HVP


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("net", ["mlp", "convbn"])
def test_hvp_matches_dense_hessian(method, net):
    gen = torch.Generator().manual_seed(5)
    if net == "mlp":
        model = small_mlp()
        x, y = torch.randn(10, 2, generator=gen, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)

        def loss_fn(p):
            return ((functional_call(model, p, (x,)) - y) ** 2).mean()
    else:
        model = small_convbn()
        x, y = torch.randn(3, 1, 6, 6, generator=gen, dtype=torch.float64), torch.arange(3)

        def loss_fn(p):
            return F.cross_entropy(functional_call(model, p, (x,)), y)

    params = {k: v.detach() for k, v in model.named_parameters()}
    v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in params.items()}
    hv = hessian_vector_product(loss_fn, params, v, method=method)
    if net == "mlp":
        ref = dense_hessian(loss_fn, params) @ flat(v)
    else:
        # BatchNorm: torch.func.hessian (vmap of reverse-over-reverse) is WRONG here in torch 2.14.1 - its
        # "Hessian" is asymmetric by ~3% - so the ground truth is central differences of the gradient
        grad = torch.func.grad(loss_fn)
        h = 1e-5
        plus = grad({k: params[k] + h * v[k] for k in params})
        minus = grad({k: params[k] - h * v[k] for k in params})
        ref = (flat(plus) - flat(minus)) / (2 * h)
    err = rel(flat(hv), ref)
    print(f"HVP {net} {method}: rel err vs {'dense Hessian' if net == 'mlp' else 'central FD'} {err:.2e}")
    assert err < (1e-10 if net == "mlp" else 1e-7)
    assert set(hv) == set(params) and all(hv[k].shape == params[k].shape for k in params)
    assert all(not t.requires_grad for t in hv.values())


def test_grad_and_hvp_match_torch_func_and_the_dense_hessian():
    _, losses, params = mlp_tasks(T=1)
    loss, p = losses[0], params[0]
    gen = torch.Generator().manual_seed(1)
    value, g, hvp = grad_and_hvp(loss, p)
    assert value.item() == pytest.approx(loss(p).item(), rel=1e-15) and value.dim() == 0
    assert rel(g, torch.func.grad(loss)(p)) < 1e-14
    H = dense_hessian(loss, p)
    for _ in range(2):  # the graph is kept: several products from one forward
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in p.items()}
        assert rel(flat(hvp(v)), H @ flat(v)) < 1e-10


def test_retained_hvp_and_value_and_grad_on_rows_equal_per_task_dict_results():
    """[T, P] rows: task t's row of the product / gradient is task t's own, computed by the one-task dict API
    and by a dense Hessian; rows do not interact."""
    T = 3
    _, losses, params = mlp_tasks(T)
    spec = ParamSpec.of(params[0])
    phi = torch.stack([spec.flatten(p) for p in params])
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(T, spec.numel, generator=gen, dtype=torch.float64)
    loss = rows_loss(losses, spec)

    hv = RetainedHVP(loss, phi)
    HV = hv(V)
    val, grad = value_and_grad(loss, phi)
    assert HV.shape == (T, spec.numel) and hv.grad.shape == (T, spec.numel) and hv.value.shape == (T,)
    for t in range(T):
        H_t = dense_hessian(losses[t], params[t])
        assert rel(HV[t], H_t @ V[t]) < 1e-10, t
        dict_hv = hessian_vector_product(losses[t], params[t], spec.unflatten(V[t]))
        assert rel(HV[t], spec.flatten(dict_hv)) < 1e-13, t
        g_t = torch.func.grad(losses[t])(params[t])
        assert rel(grad[t], flat(g_t)) < 1e-13 and rel(hv.grad[t], flat(g_t)) < 1e-13, t
        assert val[t].item() == pytest.approx(losses[t](params[t]).item(), rel=1e-14)
        assert hv.value[t].item() == pytest.approx(val[t].item(), rel=1e-15)
    # rows do not interact: a direction in row 1 only moves row 1 of H v
    only1 = torch.zeros_like(V)
    only1[1] = V[1]
    out = hv(only1)
    assert torch.all(out[[0, 2]] == 0) and rel(out[1], HV[1]) < 1e-13
    # every product is one more backward through the kept graph: linear in v
    assert rel(hv(2.0 * V - only1), 2.0 * HV - out) < 1e-12
    assert not HV.requires_grad and not grad.requires_grad and not val.requires_grad


def test_value_and_grad_runs_under_no_grad_and_leaves_phi_alone():
    _, losses, params = mlp_tasks(T=2)
    spec = ParamSpec.of(params[0])
    phi = torch.stack([spec.flatten(p) for p in params]).requires_grad_(True)
    loss = rows_loss(losses, spec)
    val, g = value_and_grad(loss, phi)
    with torch.no_grad():
        val2, g2 = value_and_grad(loss, phi)
        hv = RetainedHVP(loss, phi)
        hv_out = hv(torch.ones_like(phi))
    assert torch.equal(val, val2) and torch.equal(g, g2) and torch.equal(hv.grad, g)
    assert torch.isfinite(hv_out).all() and phi.grad is None


# ---------------------------------------------------------------------------------- ridge meta-grad


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_implicit_grad_equals_exact_ridge_metagradient(lam):
    theta, support, query, phi_star = ridge_task(seed=int(lam * 10))
    spec = ParamSpec.of(theta)
    # exact: autograd through the closed form F(theta) = L_q(phi*(theta)) (torch.linalg.solve)
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    exact = dict(zip(th, torch.autograd.grad(query(phi_star(th, lam)), list(th.values())), strict=True))
    phi = phi_star(theta, lam)
    gq = torch.func.grad(query)(phi)
    out = implicit_meta_gradient(support, phi, gq, lam=lam, cg_steps=20)
    assert isinstance(out, ImplicitGradient) and isinstance(out.info, CGInfo) and out.lam_grad is None
    err = rel(out.grad, exact)
    # finite differences of F, re-solving the inner problem at theta +- h e_i
    h, fd = 1e-5, []
    theta_flat = spec.flatten(theta)
    for i in range(spec.numel):
        e = torch.zeros_like(theta_flat)
        e[i] = h
        fp = query(phi_star(spec.unflatten(theta_flat + e), lam))
        fm = query(phi_star(spec.unflatten(theta_flat - e), lam))
        fd.append(((fp - fm) / (2 * h)).item())
    fd_err = rel(flat(out.grad), torch.tensor(fd, dtype=torch.float64))
    print(
        f"ridge lam={lam}: implicit vs exact {err:.2e}, vs central FD {fd_err:.2e}, CG steps {out.info.steps}"
    )
    assert err <= 1e-6 and fd_err <= 1e-6
    assert bool(out.info.converged) and all(f.dim() == 0 for f in out.info)
    # with theta, the same call also gives dF/dlam: the exact derivative of the closed form
    la = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    (exact_lam,) = torch.autograd.grad(query(phi_star(theta, la)), la)
    with_theta = implicit_meta_gradient(support, phi, gq, lam=lam, cg_steps=20, theta=theta)
    assert with_theta.lam_grad.dim() == 0
    assert abs(with_theta.lam_grad.item() - exact_lam.item()) <= 1e-8 * abs(exact_lam.item())
    assert all(torch.equal(with_theta.grad[k], out.grad[k]) for k in theta)


# ------------------------------------------------------------------------------ nonconvex + indefinite


def test_error_falls_with_cg_steps_on_nonconvex_mlp():
    model = small_mlp()
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 2, generator=gen, dtype=torch.float64), torch.randn(12, 1, generator=gen).double()
    xq, yq = (
        torch.randn(12, 2, generator=gen, dtype=torch.float64),
        torch.randn(12, 1, generator=gen).double(),
    )

    def support(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    def query(p):
        return ((functional_call(model, p, (xq,)) - yq) ** 2).mean()

    phi = {k: v.detach() for k, v in model.named_parameters()}
    H = dense_hessian(support, phi)
    eig = torch.linalg.eigvalsh(H)
    lam = 1.0  # min eig(H) = -0.85 here: I + H/lam is PD with condition number ~30
    A = torch.eye(H.shape[0], dtype=torch.float64) + H / lam
    assert eig.min() < 0 and torch.linalg.eigvalsh(A).min() > 0  # nonconvex loss, PD system
    g = torch.func.grad(query)(phi)
    ref = torch.linalg.solve(A, flat(g))
    errs = []
    for k in [1, 2, 4, 8, 16, 32, 64]:
        xk = implicit_meta_gradient(support, phi, g, lam=lam, cg_steps=k, rtol=0.0).grad
        errs.append(rel(flat(xk), ref))
    print(f"nonconvex MLP lam=1, cond(A)={torch.linalg.cond(A):.1f}: rel err by cg_steps 1,2,4,...,64:")
    print("  " + ", ".join(f"{e:.2e}" for e in errs))
    # CG's 2-norm error is monotone (Hestenes-Stiefel); allow roundoff at the floor
    assert all(b <= a * (1 + 1e-6) + 1e-12 for a, b in zip(errs, errs[1:], strict=False))
    assert errs[0] > 1e-2 and errs[-1] < 1e-8


def test_implicit_gradient_solves_the_dense_system_away_from_a_minimum():
    """(Ported from the per-strategy test, whose strategies are gone.) At a point that is not a stationary
    point of the support loss the solution is still (I + H/lam)^{-1} g, H the dense Hessian there."""
    model = small_mlp()
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 2, generator=gen, dtype=torch.float64), torch.randn(12, 1, generator=gen).double()

    def support(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    phi = {k: v.detach() + 0.1 for k, v in model.named_parameters()}
    g = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in phi.items()}
    A = torch.eye(ParamSpec.of(phi).numel, dtype=torch.float64) + dense_hessian(support, phi) / 1.5
    ref = torch.linalg.solve(A, flat(g))
    out = implicit_meta_gradient(support, phi, g, lam=1.5, cg_steps=60, rtol=1e-13)
    assert rel(flat(out.grad), ref) < 1e-9
    # linear in g: twice the query gradient, twice the answer
    out2 = implicit_meta_gradient(
        support, phi, {k: 2 * v for k, v in g.items()}, lam=1.5, cg_steps=60, rtol=1e-13
    )
    assert rel(flat(out2.grad), 2 * ref) < 1e-9


def test_cg_damping_solves_damped_system():
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    phi = {"w": torch.zeros(3, dtype=torch.float64)}
    g = {"w": torch.ones(3, dtype=torch.float64)}
    out = implicit_meta_gradient(
        lambda p: 0.5 * (d * p["w"] ** 2).sum(), phi, g, lam=2.0, cg_steps=5, cg_damping=0.5
    )
    torch.testing.assert_close(out.grad["w"], 1.0 / (1.5 + d / 2.0), rtol=1e-12, atol=0)
    # a dense (non-diagonal) Hessian: ((1 + d) I + H/lam) x = g by torch.linalg.solve
    model = small_mlp()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 2, generator=gen, dtype=torch.float64)

    def support(p):
        return (functional_call(model, p, (x,)) ** 2).mean()

    phi = {k: v.detach() for k, v in model.named_parameters()}
    g = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in phi.items()}
    P = ParamSpec.of(phi).numel
    for damping in (0.0, 0.3, 2.0):
        A = (1 + damping) * torch.eye(P, dtype=torch.float64) + dense_hessian(support, phi) / 0.7
        out = implicit_meta_gradient(support, phi, g, lam=0.7, cg_steps=80, cg_damping=damping, rtol=1e-13)
        assert rel(flat(out.grad), torch.linalg.solve(A, flat(g))) < 1e-9, damping


def test_implicit_on_indefinite_system_is_finite_and_reported():
    d = torch.tensor([-10.0, 1.0, 2.0, 3.0], dtype=torch.float64)  # eigenvalue -10 < -lam

    def support(p):
        return 0.5 * (d * p["w"] ** 2).sum()

    phi = {"w": torch.ones(4, dtype=torch.float64)}
    g = {"w": torch.tensor([1.0, 0.5, 0.5, 0.5], dtype=torch.float64)}
    out = implicit_meta_gradient(support, phi, g, lam=2.0, cg_steps=10)
    info = out.info
    print(f"indefinite implicit: steps={info.steps}, negative_curvature={info.negative_curvature}")
    # I + H/lam = diag(-4, 1.5, 2, 2.5): g'Ag = -4 + 0.25 * 6 = -2.5 < 0, so CG truncates on its first
    # direction and returns g itself (the first-order meta-gradient), exactly
    assert bool(info.negative_curvature) and int(info.steps) == 0 and not bool(info.converged)
    assert torch.equal(out.grad["w"], g["w"])
    # a direction that starts positive: truncated later, still finite and reported
    g2 = {"w": torch.tensor([0.1, 1.0, 1.0, 1.0], dtype=torch.float64)}
    out = implicit_meta_gradient(support, phi, g2, lam=2.0, cg_steps=10)
    assert bool(out.info.negative_curvature) and int(out.info.steps) >= 1
    assert torch.isfinite(out.grad["w"]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_implicit_dtypes_devices(dtype, device):
    model = small_mlp().to(dtype=dtype, device=device)
    x = torch.randn(8, 2, dtype=dtype, device=device)

    def support(p):
        return (functional_call(model, p, (x,)) ** 2).mean()

    phi = {k: v.detach() for k, v in model.named_parameters()}
    g = {k: torch.ones_like(v) for k, v in phi.items()}
    out = implicit_meta_gradient(
        support, phi, g, lam=1.0, cg_steps=3, theta={k: v + 0.1 for k, v in phi.items()}
    )
    assert all(v.dtype == dtype and v.device.type == device for v in out.grad.values())
    assert all(torch.isfinite(v).all() for v in out.grad.values())
    assert out.lam_grad.dtype == dtype and out.lam_grad.device.type == device


# ------------------------------------------------------------------ API edges: unused parameters, messages


def _partly_used_loss():
    """L(a, b) = sum(tanh(W a)^2) + a.a^2/8: b is a parameter the loss never reads."""
    W = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.1]], dtype=torch.float64)

    def loss(p):
        return (torch.tanh(W @ p["a"]) ** 2).sum() + (p["a"] @ p["a"]) ** 2 / 8

    params = {
        "a": torch.tensor([0.4, -0.2, 0.9], dtype=torch.float64),
        "b": torch.tensor([1.0, 2.0], dtype=torch.float64),
    }
    v = {
        "a": torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64),
        "b": torch.tensor([3.0, -1.0], dtype=torch.float64),
    }
    return loss, params, v


@pytest.mark.parametrize("method", [None, "double_backward", "forward_over_reverse"])
def test_hvp_with_a_parameter_the_loss_ignores_is_zero_there(method):
    loss, params, v = _partly_used_loss()
    H = torch.func.hessian(lambda a: loss({"a": a, "b": params["b"]}))(params["a"])
    kw = {} if method is None else {"method": method}  # None: the default, double backward
    hv = hessian_vector_product(loss, params, v, **kw)
    assert torch.allclose(hv["a"], H @ v["a"], rtol=1e-13, atol=1e-15)
    assert torch.equal(hv["b"], torch.zeros(2, dtype=torch.float64))


def test_grad_and_hvp_with_a_parameter_the_loss_ignores():
    loss, params, v = _partly_used_loss()
    value, g, hvp = grad_and_hvp(loss, params)
    ga = torch.func.grad(lambda a: loss({"a": a, "b": params["b"]}))(params["a"])
    assert value.item() == pytest.approx(loss(params).item(), rel=1e-15)
    assert torch.allclose(g["a"], ga, rtol=1e-14, atol=0)
    assert torch.equal(g["b"], torch.zeros(2, dtype=torch.float64))
    H = torch.func.hessian(lambda a: loss({"a": a, "b": params["b"]}))(params["a"])
    hv = hvp(v)
    assert torch.allclose(hv["a"], H @ v["a"], rtol=1e-13, atol=1e-15)
    assert torch.equal(hv["b"], torch.zeros(2, dtype=torch.float64))


def test_rows_api_with_losses_that_ignore_phi_or_are_linear_in_it():
    phi = torch.randn(2, 3, dtype=torch.float64)
    v = torch.randn(2, 3, dtype=torch.float64)
    other = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)  # e.g. a parameter outside phi
    const = lambda rows: (other * 0.0).expand(rows.shape[0])  # noqa: E731 - reads nothing of phi
    val, g = value_and_grad(const, phi)
    assert torch.equal(val, torch.zeros(2, dtype=torch.float64)) and torch.equal(g, torch.zeros_like(phi))
    assert torch.equal(RetainedHVP(const, phi)(v), torch.zeros_like(v))
    detached_const = lambda rows: torch.ones(rows.shape[0], dtype=rows.dtype)  # noqa: E731 - no graph at all
    val, g = value_and_grad(detached_const, phi)
    assert torch.equal(val, torch.ones(2, dtype=torch.float64)) and torch.equal(g, torch.zeros_like(phi))
    no_graph = RetainedHVP(detached_const, phi)
    assert torch.equal(no_graph.grad, torch.zeros_like(phi)) and torch.equal(no_graph(v), torch.zeros_like(v))
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    linear = RetainedHVP(lambda rows: rows @ w, phi)  # gradient w per row, Hessian 0
    assert torch.equal(linear.grad, w.expand(2, 3)) and torch.equal(linear(v), torch.zeros_like(v))
    # linear in phi with a coefficient that has a graph of its own: the gradient needs grad, H is still 0
    scaled = RetainedHVP(lambda rows: (rows @ w) * other, phi)
    assert torch.equal(scaled.grad, 0.5 * w.expand(2, 3)) and torch.equal(scaled(v), torch.zeros_like(v))
    # a parameter the loss ignores has H = 0 in its block, so there the implicit gradient is g itself
    loss, params, _ = _partly_used_loss()
    g = {
        "a": torch.tensor([0.3, -1.0, 0.2], dtype=torch.float64),
        "b": torch.tensor([0.7, -0.4], dtype=torch.float64),
    }
    out = implicit_meta_gradient(loss, params, g, lam=5.3, cg_steps=5, rtol=1e-14)
    H = torch.zeros(5, 5, dtype=torch.float64)
    H[:3, :3] = torch.func.hessian(lambda a: loss({"a": a, "b": params["b"]}))(params["a"])
    A = torch.eye(5, dtype=torch.float64) + H / 5.3
    assert torch.linalg.eigvalsh(A).min() > 0.1
    ref = torch.linalg.solve(A, flat(g))
    assert rel(flat(out.grad), ref) < 1e-12
    torch.testing.assert_close(out.grad["b"], g["b"], rtol=1e-14, atol=0)  # H = 0 in that block: x = g


def test_hvp_errors_name_the_arguments():
    loss, params, v = _partly_used_loss()
    with pytest.raises(ValueError, match=r"params and v.*only in params: \['b'\]"):
        hessian_vector_product(loss, params, {"a": v["a"]})
    with pytest.raises(ValueError, match=r"'b'.*\(2,\).*\(3,\)"):
        hessian_vector_product(loss, params, {"a": v["a"], "b": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"method 'newton'"):
        hessian_vector_product(loss, params, v, method="newton")


def test_hvp_of_a_float32_vector_at_float64_parameters_is_taken_in_float64():
    loss, params, v = _partly_used_loss()
    H = torch.func.hessian(lambda a: loss({"a": a, "b": params["b"]}))(params["a"])
    v32 = {k: t.float() for k, t in v.items()}
    hv = hessian_vector_product(loss, params, v32)
    assert hv["a"].dtype == torch.float64
    torch.testing.assert_close(hv["a"], H @ v["a"].float().double(), rtol=1e-13, atol=1e-15)
    zero = hessian_vector_product(lambda p: p["a"].sum() + p["b"].sum(), params, v32)  # linear: H = 0
    assert all(t.dtype == torch.float64 and not t.any() for t in zero.values())


def test_per_parameter_lam_errors_say_which_keys_and_values_are_wrong():
    loss, params, _ = _partly_used_loss()
    g = {k: torch.ones_like(t) for k, t in params.items()}
    one = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \[\]"):
        implicit_meta_gradient(loss, params, g, lam={"a": one}, cg_steps=2)
    with pytest.raises(ValueError, match=r"missing \[\], unknown \['c'\]"):
        implicit_meta_gradient(loss, params, g, lam={"a": one, "b": one, "c": one}, cg_steps=2)
    for bad in (0.0, -1.0, math.inf, math.nan):
        lam = {"a": one, "b": torch.tensor(bad, dtype=torch.float64)}
        with pytest.raises(ValueError, match=r"per-parameter lam must be > 0 and finite.*\['b'\]"):
            implicit_meta_gradient(loss, params, g, lam=lam, cg_steps=2)
    with pytest.raises(ValueError, match=r"\['a'\]"):  # one bad entry of a full-shape lam
        implicit_meta_gradient(
            loss, params, g, lam={"a": torch.tensor([1.0, 0.0, 1.0]), "b": one}, cg_steps=2
        )


@pytest.mark.parametrize("case", ["swapped", "short"])
def test_per_parameter_lam_of_the_wrong_shape_names_the_key(case):
    """A per-parameter lam is 0-d or of its parameter's shape (documented; proximal_adapt checks it). Here a
    has 3 entries and b 2. "swapped": 2 for a and 3 for b, the right total, must not be laid over the
    parameters in the wrong place; "short": one entry missing must be a ValueError naming the key, not a
    broadcast error."""
    loss, params, _ = _partly_used_loss()
    g = {k: torch.ones_like(t) for k, t in params.items()}
    lam_a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    lam_b = (
        torch.tensor([3.0, 4.0, 5.0], dtype=torch.float64)
        if case == "swapped"
        else torch.tensor(1.0).double()
    )
    with pytest.raises(ValueError, match=r"'a'"):
        implicit_meta_gradient(loss, params, g, lam={"a": lam_a, "b": lam_b}, cg_steps=2)


def test_scalar_lam_may_be_a_one_element_tensor_but_nothing_else():
    loss, params, _ = _partly_used_loss()
    g = {k: torch.ones_like(t) for k, t in params.items()}
    ref = implicit_meta_gradient(loss, params, g, lam=2.0, cg_steps=3)
    for lam in (torch.tensor(2.0), torch.tensor([2.0], dtype=torch.float64), 2):
        got = implicit_meta_gradient(loss, params, g, lam=lam, cg_steps=3)
        assert all(torch.equal(got.grad[k], ref.grad[k]) for k in ref.grad)
    for bad in (torch.tensor([2.0, 3.0]), "2.0", [2.0], None):
        with pytest.raises(ValueError, match=r"lam must be a positive number or a dict"):
            implicit_meta_gradient(loss, params, g, lam=bad, cg_steps=3)


def test_implicit_gradient_input_errors_name_what_to_fix():
    loss, params, _ = _partly_used_loss()
    g = {k: torch.ones_like(t) for k, t in params.items()}
    for lam in (0.0, -1.0, float("nan"), float("inf"), torch.tensor(0.0)):
        with pytest.raises(ValueError, match=r"lam must be > 0 and finite.*lam = 0 means no proximal term"):
            implicit_meta_gradient(loss, params, g, lam=lam, cg_steps=2)
    for steps in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="cg_steps"):
            implicit_meta_gradient(loss, params, g, lam=1.0, cg_steps=steps)
    for damping in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cg_damping"):
            implicit_meta_gradient(loss, params, g, lam=1.0, cg_steps=2, cg_damping=damping)
    with pytest.raises(ValueError, match="rtol"):
        implicit_meta_gradient(loss, params, g, lam=1.0, cg_steps=2, rtol=-1.0)
    # one argument a tensor, the other a dict, either way round
    for p, q, names in ((params["a"], g, "Tensor and dict"), (params, g["a"], "dict and Tensor")):
        with pytest.raises(ValueError, match=rf"params and query_grad must be dicts name -> Tensor.*{names}"):
            implicit_meta_gradient(loss, p, q, lam=1.0, cg_steps=2)
    with pytest.raises(ValueError, match=r"params and query_grad.*only in params: \['b'\]"):
        implicit_meta_gradient(loss, params, {"a": g["a"]}, lam=1.0, cg_steps=2)
    with pytest.raises(ValueError, match=r"only in query_grad: \['v'\]"):
        implicit_meta_gradient(loss, params, {**g, "v": torch.ones(1)}, lam=1.0, cg_steps=2)
    with pytest.raises(ValueError, match=r"'a'.*\(3,\).*\(4,\)"):
        implicit_meta_gradient(loss, params, {**g, "a": torch.ones(4)}, lam=1.0, cg_steps=2)
    # lam_grad needs theta: without it the result has none (the old return_lam_grad error is gone)
    assert implicit_meta_gradient(loss, params, g, lam=1.0, cg_steps=2).lam_grad is None


@pytest.mark.parametrize("per_param", [False, True])
def test_rtol_reaches_cg_and_lam_dtype_does_not_cost_precision(per_param):
    """A loose rtol stops CG where plain CG on the dense system I + H/lam stops; a float32 per-parameter lam
    gives the float64 answer (it is cast to the gradient's dtype before its square root is used)."""
    loss, params, _ = _partly_used_loss()
    params = {"a": params["a"]}
    g = {"a": torch.tensor([1.0, -0.3, 0.7], dtype=torch.float64)}
    H = torch.func.hessian(lambda a: loss({"a": a}))(params["a"])
    lam = {"a": torch.tensor(5.3, dtype=torch.float64)} if per_param else 5.3
    A = torch.eye(3, dtype=torch.float64) + H / 5.3
    assert torch.linalg.eigvalsh(A).min() > 0.1  # positive definite: CG runs to its tolerance
    for rtol in (1e-10, 0.3):
        _, ref = conjugate_gradient(lambda v: A @ v, g["a"], 3, rtol=rtol)
        out = implicit_meta_gradient(loss, params, g, lam=lam, cg_steps=3, rtol=rtol)
        assert int(out.info.steps) == int(ref.steps), rtol
        assert bool(out.info.converged) == bool(ref.converged), rtol
    assert int(ref.steps) < 3  # the loose tolerance did stop early
    if per_param:
        exact = torch.linalg.solve(A, g["a"])
        x = implicit_meta_gradient(loss, params, g, lam=lam, cg_steps=3).grad
        x32 = implicit_meta_gradient(
            loss, params, g, lam={"a": torch.tensor(5.3, dtype=torch.float32)}, cg_steps=3
        ).grad
        assert rel(x["a"], exact) < 1e-13
        # float32 5.3 is 5.30000019: the answer is the float64 one for that value, not a float32-rounded one
        lam32 = float(torch.tensor(5.3, dtype=torch.float32))
        exact32 = torch.linalg.solve(torch.eye(3, dtype=torch.float64) + H / lam32, g["a"])
        assert x32["a"].dtype == torch.float64 and rel(x32["a"], exact32) < 1e-13
        # a float32 per-scalar lam too
        x32s = implicit_meta_gradient(loss, params, g, lam={"a": torch.full((3,), 5.3)}, cg_steps=3).grad
        assert rel(x32s["a"], exact32) < 1e-13


# ------------------------------------------------------------------------- implicit_solve on [T, P] rows


def _per_parameter_lam(params, low):
    """lam per parameter tensor (0-d) for some tensors, per scalar for the others, all different, >= low."""
    gen = torch.Generator().manual_seed(4)
    return {
        k: (
            torch.tensor(low + i, dtype=torch.float64)
            if i % 2
            else low + 2 * torch.rand(v.shape, generator=gen).double()
        )
        for i, (k, v) in enumerate(params.items())
    }


@pytest.mark.parametrize("damping,low", [(0.0, 0.5), (0.0, 8.0), (0.4, 8.0)])
def test_implicit_solve_with_a_vector_lam_equals_the_dict_lam_per_task(damping, low):
    """Small lam (low=0.5): H + Lam is indefinite for some tasks, whose rows stop on negative curvature while
    the others go on -- still each row equals its own one-task solve. Large lam: positive definite, and the
    rows equal the dense solve."""
    T = 3
    _, losses, params = mlp_tasks(T, seed=1)
    spec = ParamSpec.of(params[0])
    gen = torch.Generator().manual_seed(5)
    phi = torch.stack([spec.flatten(p) for p in params])
    theta = phi + 0.1 * torch.randn(phi.shape, generator=gen, dtype=torch.float64)
    G = torch.randn(phi.shape, generator=gen, dtype=torch.float64)
    lam = _per_parameter_lam(params[0], low)
    lam_flat = spec.expand(lam)
    assert lam_flat.shape == (spec.numel,)
    hvp = RetainedHVP(rows_loss(losses, spec), phi)
    X, dlam, info = implicit_solve(hvp, G, lam_flat, CG(steps=60, rtol=1e-13), damping, diff=phi - theta)
    assert X.shape == dlam.shape == (T, spec.numel) and info.steps.shape == (T,)
    for t in range(T):
        out = implicit_meta_gradient(
            losses[t], params[t], spec.unflatten(G[t]), lam, cg_steps=60, cg_damping=damping, rtol=1e-13,
            theta=spec.unflatten(theta[t]),
        )  # fmt: skip
        assert rel(X[t], flat(out.grad)) < 1e-10, t
        assert int(info.steps[t]) == int(out.info.steps), t
        per_entry = spec.unflatten(dlam[t])
        for k in lam:
            expected = per_entry[k].sum() if lam[k].dim() == 0 else per_entry[k]
            assert out.lam_grad[k].shape == lam[k].shape and rel(out.lam_grad[k], expected) < 1e-10, (t, k)
        # ground truth: y = (H + (1 + d) Lam)^{-1} g, dF/dtheta = Lam y, dF/dLam_i = -y_i (phi - theta)_i
        M = dense_hessian(losses[t], params[t]) + (1 + damping) * torch.diag(lam_flat)
        definite = bool(torch.linalg.eigvalsh(M).min() > 0)
        assert definite != bool(info.negative_curvature[t]), t
        if definite:
            y = torch.linalg.solve(M, G[t])
            assert rel(X[t], lam_flat * y) < 1e-9, t
            assert rel(dlam[t], -y * (phi[t] - theta[t])) < 1e-9, t
    if low == 0.5:
        print(f"vector lam 0.5+: steps {info.steps.tolist()}, negative {info.negative_curvature.tolist()}")
        assert info.negative_curvature.any() and not info.negative_curvature.all()
    else:
        assert not info.negative_curvature.any()
    # no diff, no lam gradient
    _, none, _ = implicit_solve(hvp, G, lam_flat, CG(steps=3), damping)
    assert none is None


def test_implicit_solve_with_a_number_lam_equals_the_dense_solve_and_the_dict_api():
    T = 2
    _, losses, params = mlp_tasks(T, seed=2)
    spec = ParamSpec.of(params[0])
    gen = torch.Generator().manual_seed(6)
    phi = torch.stack([spec.flatten(p) for p in params])
    theta = phi - 0.05 * torch.randn(phi.shape, generator=gen, dtype=torch.float64)
    G = torch.randn(phi.shape, generator=gen, dtype=torch.float64)
    lam = 8.0  # above every task's most negative Hessian eigenvalue: I + H/lam positive definite
    hvp = RetainedHVP(rows_loss(losses, spec), phi)
    X, dlam, info = implicit_solve(hvp, G, lam, CG(steps=60, rtol=1e-13), diff=phi - theta)
    assert dlam.shape == (T,)
    for t in range(T):
        A = torch.eye(spec.numel, dtype=torch.float64) + dense_hessian(losses[t], params[t]) / lam
        assert torch.linalg.eigvalsh(A).min() > 0
        x = torch.linalg.solve(A, G[t])
        assert rel(X[t], x) < 1e-9
        # dF/dlam = -<y, phi - theta>, y = x / lam
        assert dlam[t].item() == pytest.approx(-((x / lam) @ (phi[t] - theta[t])).item(), rel=1e-9)
        out = implicit_meta_gradient(losses[t], params[t], spec.unflatten(G[t]), lam, cg_steps=60, rtol=1e-13,
                                     theta=spec.unflatten(theta[t]))  # fmt: skip
        assert rel(X[t], flat(out.grad)) < 1e-11 and out.lam_grad.item() == pytest.approx(
            dlam[t].item(), rel=1e-10
        )
