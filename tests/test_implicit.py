"""Tests of lightning_imaml.implicit against independent ground truths: dense solves, dense Hessians,
closed-form ridge meta-gradients, finite differences. Measured errors are printed (pytest -s)."""

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from lightning_imaml.implicit import (
    CGInfo,
    conjugate_gradient,
    grad_and_hvp,
    hessian_vector_product,
    implicit_meta_gradient,
)
from lightning_imaml.params import flatten, unflatten

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_spd(n, cond, gen, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    eig = torch.logspace(0, math.log10(cond), n, dtype=dtype)
    return q @ torch.diag(eig) @ q.T


# --------------------------------------------------------------------------------------------- CG


@pytest.mark.parametrize("n", [10, 30, 50])
def test_cg_matches_dense_solve_on_random_spd(n):
    gen = torch.Generator().manual_seed(n)
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = M @ M.T / n + torch.eye(n, dtype=torch.float64)  # random SPD, like I + H/lam with H = M M^T / n
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=n, rtol=0.0)
    err = rel(x, torch.linalg.solve(A, b))
    print(f"CG random SPD n={n} cond={torch.linalg.cond(A):.1f}: {info.steps} steps, rel err {err:.2e}")
    assert isinstance(info, CGInfo) and info.steps == n and not info.negative_curvature
    assert err < 1e-10


@pytest.mark.parametrize("n,cond", [(30, 30.0), (50, 100.0)])
def test_cg_ill_conditioned_spd(n, cond):
    gen = torch.Generator().manual_seed(n)
    A = random_spd(n, cond, gen)  # log-spaced spectrum 1..cond: the hard case for finite-precision CG
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    ref = torch.linalg.solve(A, b)
    x_n, _ = conjugate_gradient(lambda v: A @ v, b, max_steps=n, rtol=0.0)
    # rounding destroys exact n-step termination here (measured: 1.8e-8 at n=30, 1.6e-7 at n=50),
    # CG keeps converging past n steps
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=2 * n, rtol=1e-14)
    err = rel(x, ref)
    print(
        f"CG log-spectrum n={n} cond={cond:g}: err at n steps {rel(x_n, ref):.2e}, "
        f"at {info.steps} steps {err:.2e}"
    )
    assert err < 1e-10 and info.converged


def test_cg_exact_at_n_steps_on_dicts():
    gen = torch.Generator().manual_seed(1)
    n = 12
    A = random_spd(n, 20.0, gen)
    like = {"w": torch.zeros(3, 3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    b = unflatten(torch.randn(n, generator=gen, dtype=torch.float64), like)

    def matvec(v):
        return unflatten(A @ flatten(v), like)

    x, info = conjugate_gradient(matvec, b, max_steps=n, rtol=0.0)
    err = rel(flatten(x), torch.linalg.solve(A, flatten(b)))
    print(f"CG on dict, n={n} steps: rel err={err:.2e}")
    assert set(x) == {"w", "b"} and x["w"].shape == (3, 3)
    assert err < 1e-10


def test_cg_matvec_count_and_x0():
    gen = torch.Generator().manual_seed(2)
    A = random_spd(8, 5.0, gen)
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    _, info = conjugate_gradient(matvec, b, max_steps=3, rtol=0.0)
    assert info.steps == 3 and len(calls) == 3  # no matvec spent on b - A*0
    calls.clear()
    x_star = torch.linalg.solve(A, b)
    x, info = conjugate_gradient(matvec, b, max_steps=5, x0=x_star)
    assert info.steps == 0 and info.converged and len(calls) == 1  # exactly one matvec for b - A x0
    assert rel(x, x_star) < 1e-12
    x, info = conjugate_gradient(matvec, torch.zeros_like(b), max_steps=5)
    assert info.converged and info.steps == 0 and torch.all(x == 0)


def test_cg_indefinite_stops_on_negative_curvature():
    gen = torch.Generator().manual_seed(3)
    n = 20
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.linspace(0.5, 3.0, n, dtype=torch.float64)
    eig[:3] = torch.tensor([-5.0, -1.0, -0.2], dtype=torch.float64)  # like I + H/lam with H < -lam
    A = q @ torch.diag(eig) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=n)
    print(f"indefinite CG: stopped after {info.steps} steps, residual {info.residual_norm:.3e}")
    assert info.negative_curvature and not info.converged
    assert 0 <= info.steps < n
    assert torch.isfinite(x).all() and x.norm() < 1e3 * b.norm()
    # every accepted iterate lowers q(x) = x'Ax/2 - b'x, so the truncated answer beats x = 0
    assert (0.5 * x @ A @ x - b @ x).item() < 0


def test_cg_first_direction_negative_returns_b():
    b = torch.tensor([1.0, -2.0, 3.0])
    x, info = conjugate_gradient(lambda v: -v, b, max_steps=5)
    assert info.negative_curvature and info.steps == 0
    torch.testing.assert_close(x, b)  # A replaced by I: the first-order answer, not zero
    x, info = conjugate_gradient(lambda v: v * float("nan"), b, max_steps=5)
    assert info.negative_curvature and torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_cg_dtypes_devices(dtype, device):
    gen = torch.Generator().manual_seed(4)
    A = random_spd(6, 4.0, gen).to(dtype=dtype, device=device)
    b = torch.randn(6, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=12, rtol=1e-6)
    assert x.dtype == dtype and x.device.type == device
    assert rel(x.double(), torch.linalg.solve(A.double(), b.double())) < 1e-4


def test_cg_bad_input():
    with pytest.raises(ValueError, match="max_steps"):
        conjugate_gradient(lambda v: v, torch.ones(2), max_steps=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        conjugate_gradient(lambda v: v, torch.ones(2), max_steps=2, x0=torch.ones(3))


# -------------------------------------------------------------------------------------------- HVP


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
    like = {k: v.detach() for k, v in params.items()}
    P = sum(v.numel() for v in like.values())
    Hd = torch.func.hessian(lambda flat: loss_fn(unflatten(flat, like)))(flatten(like))
    return Hd.reshape(P, P)


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
        ref = dense_hessian(loss_fn, params) @ flatten(v)
    else:
        # BatchNorm: torch.func.hessian (vmap of reverse-over-reverse) is WRONG here in torch 2.14.1 - its
        # "Hessian" is asymmetric by ~3% - so the ground truth is central differences of the gradient
        grad = torch.func.grad(loss_fn)
        h = 1e-5
        plus = grad({k: params[k] + h * v[k] for k in params})
        minus = grad({k: params[k] - h * v[k] for k in params})
        ref = (flatten(plus) - flatten(minus)) / (2 * h)
    err = rel(flatten(hv), ref)
    print(f"HVP {net} {method}: rel err vs {'dense Hessian' if net == 'mlp' else 'central FD'} {err:.2e}")
    assert err < (1e-10 if net == "mlp" else 1e-7)
    assert all(not t.requires_grad for t in hv.values())


# ---------------------------------------------------------------------------------- ridge meta-grad


def ridge_task(seed, d=4, n=15, m=12):
    g = torch.Generator().manual_seed(seed)
    Xs, Xq = (torch.randn(k, d, generator=g, dtype=torch.float64) for k in (n, m))
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    ys = Xs @ w0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64) + 0.5
    yq = Xq @ w0 + 0.1 * torch.randn(m, generator=g, dtype=torch.float64) + 0.5
    theta = {"w": torch.randn(d, generator=g, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}

    def lin_loss(X, y):
        return lambda p: 0.5 * ((X @ p["w"] + p["b"] - y) ** 2).mean()

    def phi_star(th, lam):
        # argmin ||Xa phi - y||^2/(2n) + lam/2 ||phi - th||^2 = (Xa'Xa/n + lam I)^-1 (Xa'y/n + lam th)
        Xa = torch.cat([Xs, torch.ones(n, 1, dtype=torch.float64)], 1)
        A = Xa.T @ Xa / n + lam * torch.eye(d + 1, dtype=torch.float64)
        sol = torch.linalg.solve(A, Xa.T @ ys / n + lam * torch.cat([th["w"], th["b"]]))
        return {"w": sol[:d], "b": sol[d:]}

    return theta, lin_loss(Xs, ys), lin_loss(Xq, yq), phi_star


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_implicit_grad_equals_exact_ridge_metagradient(lam):
    theta, support, query, phi_star = ridge_task(seed=int(lam * 10))
    # exact: autograd through the closed form F(theta) = L_q(phi*(theta))
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    F_theta = query(phi_star(th, lam))
    exact = dict(zip(th, torch.autograd.grad(F_theta, list(th.values())), strict=True))
    phi = phi_star(theta, lam)
    gq = torch.func.grad(query)(phi)
    x, info = implicit_meta_gradient(support, phi, gq, lam=lam, cg_steps=20, return_info=True)
    err = rel(flatten(x), flatten(exact))
    # finite differences of F, re-solving the inner problem at theta +- h e_i
    h, fd = 1e-5, []
    flat = flatten(theta)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        fp = query(phi_star(unflatten(flat + e, theta), lam))
        fm = query(phi_star(unflatten(flat - e, theta), lam))
        fd.append(((fp - fm) / (2 * h)).item())
    fd_err = rel(flatten(x), torch.tensor(fd, dtype=torch.float64))
    print(f"ridge lam={lam}: implicit vs exact {err:.2e}, vs central FD {fd_err:.2e}, CG steps {info.steps}")
    assert err <= 1e-6 and fd_err <= 1e-6
    assert info.converged


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
    ref = torch.linalg.solve(A, flatten(g))
    errs = []
    for k in [1, 2, 4, 8, 16, 32, 64]:
        xk = implicit_meta_gradient(support, phi, g, lam=lam, cg_steps=k, rtol=0.0)
        errs.append(rel(flatten(xk), ref))
    print(f"nonconvex MLP lam=1, cond(A)={torch.linalg.cond(A):.1f}: rel err by cg_steps 1,2,4,...,64:")
    print("  " + ", ".join(f"{e:.2e}" for e in errs))
    # CG's 2-norm error is monotone (Hestenes-Stiefel); allow roundoff at the floor
    assert all(b <= a * (1 + 1e-6) + 1e-12 for a, b in zip(errs, errs[1:], strict=False))
    assert errs[0] > 1e-2 and errs[-1] < 1e-8


@pytest.mark.parametrize("hvp", ["retain", "linearize", "double_backward", "forward_over_reverse"])
def test_every_hvp_strategy_solves_the_dense_system(hvp):
    """Each way of getting H v gives the same implicit gradient: against a dense solve on a nonconvex MLP,
    and under vmap (where every strategy becomes forward-over-reverse) task by task."""
    model = small_mlp()
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(12, 2, generator=gen, dtype=torch.float64), torch.randn(12, 1, generator=gen).double()

    def support(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    phi = {k: v.detach() + 0.1 for k, v in model.named_parameters()}
    g = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in phi.items()}
    A = (
        torch.eye(sum(v.numel() for v in phi.values()), dtype=torch.float64)
        + dense_hessian(support, phi) / 1.5
    )
    ref = torch.linalg.solve(A, flatten(g))
    xk = implicit_meta_gradient(support, phi, g, lam=1.5, cg_steps=60, rtol=1e-13, hvp=hvp)
    assert rel(flatten(xk), ref) < 1e-9
    xs = torch.func.vmap(lambda gg: flatten(implicit_meta_gradient(support, phi, gg, lam=1.5, cg_steps=60,
                                                                     rtol=1e-13, hvp=hvp)))(
        {k: torch.stack([v, 2 * v]) for k, v in g.items()}
    )  # fmt: skip
    assert rel(xs[0], ref) < 1e-9 and rel(xs[1], 2 * ref) < 1e-9
    with pytest.raises(ValueError, match="unknown hvp strategy 'exact'"):
        implicit_meta_gradient(support, phi, g, lam=1.5, cg_steps=2, hvp="exact")


def test_implicit_on_indefinite_system_is_finite_and_reported():
    d = torch.tensor([-10.0, 1.0, 2.0, 3.0], dtype=torch.float64)  # eigenvalue -10 < -lam

    def support(p):
        return 0.5 * (d * p["w"] ** 2).sum()

    phi = {"w": torch.ones(4, dtype=torch.float64)}
    g = {"w": torch.tensor([1.0, 0.5, 0.5, 0.5], dtype=torch.float64)}
    x, info = implicit_meta_gradient(support, phi, g, lam=2.0, cg_steps=10, return_info=True)
    print(f"indefinite implicit: steps={info.steps}, negative_curvature={info.negative_curvature}")
    # I + H/lam = diag(-4, 1.5, 2, 2.5): g'Ag = -4 + 0.25 * 6 = -2.5 < 0, so CG truncates on its first
    # direction and returns g itself (the first-order meta-gradient), exactly
    assert info.negative_curvature and int(info.steps) == 0
    assert torch.equal(x["w"], g["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_implicit_dtypes_devices(dtype, device):
    model = small_mlp().to(dtype=dtype, device=device)
    x = torch.randn(8, 2, dtype=dtype, device=device)

    def support(p):
        return (functional_call(model, p, (x,)) ** 2).mean()

    phi = {k: v.detach() for k, v in model.named_parameters()}
    g = {k: torch.ones_like(v) for k, v in phi.items()}
    out = implicit_meta_gradient(support, phi, g, lam=1.0, cg_steps=3)
    assert all(out[k].dtype == dtype and out[k].device.type == device for k in out)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_implicit_bad_inputs():
    phi = {"w": torch.ones(3)}
    g = {"w": torch.ones(3)}

    def support(p):
        return (p["w"] ** 2).sum()

    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            implicit_meta_gradient(support, phi, g, lam=lam, cg_steps=2)
    for steps in (0, -3, 1.5):
        with pytest.raises(ValueError, match="cg_steps"):
            implicit_meta_gradient(support, phi, g, lam=1.0, cg_steps=steps)
    with pytest.raises(ValueError, match=r"only in query_grad: \['v'\]"):
        implicit_meta_gradient(support, phi, {"w": torch.ones(3), "v": torch.ones(1)}, lam=1.0, cg_steps=2)
    with pytest.raises(ValueError, match=r"'w'.*\(3,\).*\(4,\)"):
        implicit_meta_gradient(support, phi, {"w": torch.ones(4)}, lam=1.0, cg_steps=2)
    with pytest.raises(ValueError, match="cg_damping"):
        implicit_meta_gradient(support, phi, g, lam=1.0, cg_steps=2, cg_damping=-0.5)


def test_cg_damping_solves_damped_system():
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    phi = {"w": torch.zeros(3, dtype=torch.float64)}
    g = {"w": torch.ones(3, dtype=torch.float64)}
    x = implicit_meta_gradient(
        lambda p: 0.5 * (d * p["w"] ** 2).sum(), phi, g, lam=2.0, cg_steps=5, cg_damping=0.5
    )
    torch.testing.assert_close(x["w"], 1.0 / (1.5 + d / 2.0), rtol=1e-12, atol=0)


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
    assert torch.allclose(g["a"], ga, rtol=1e-14, atol=0) and torch.equal(
        g["b"], torch.zeros(2, dtype=torch.float64)
    )
    H = torch.func.hessian(lambda a: loss({"a": a, "b": params["b"]}))(params["a"])
    hv = hvp(v)
    assert torch.allclose(hv["a"], H @ v["a"], rtol=1e-13, atol=1e-15)
    assert torch.equal(hv["b"], torch.zeros(2, dtype=torch.float64))


def test_hvp_errors_name_the_arguments():
    loss, params, v = _partly_used_loss()
    with pytest.raises(
        ValueError, match=r"key mismatch between params and v: only in params: \['b'\], only in v: \[\]"
    ):
        hessian_vector_product(loss, params, {"a": v["a"]})
    with pytest.raises(
        ValueError, match=r"unknown method 'newton'; valid: 'double_backward', 'forward_over_reverse'"
    ):
        hessian_vector_product(loss, params, v, method="newton")


def test_per_parameter_lam_errors_say_which_keys_and_values_are_wrong():
    loss, params, _ = _partly_used_loss()
    g = {k: torch.ones_like(t) for k, t in params.items()}
    one = torch.tensor(1.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"keys of params: missing \['b'\], unknown \[\]"):
        implicit_meta_gradient(loss, params, g, lam={"a": one}, cg_steps=2)
    with pytest.raises(ValueError, match=r"keys of params: missing \[\], unknown \['c'\]"):
        implicit_meta_gradient(loss, params, g, lam={"a": one, "b": one, "c": one}, cg_steps=2)
    for bad in (0.0, -1.0, math.inf):
        lam = {"a": one, "b": torch.tensor(bad, dtype=torch.float64)}
        with pytest.raises(
            ValueError, match=r"^every per-parameter lam must be > 0 and finite for the implicit gradient$"
        ):
            implicit_meta_gradient(loss, params, g, lam=lam, cg_steps=2)


def test_scalar_lam_may_be_a_one_element_tensor_but_nothing_else():
    loss, params, _ = _partly_used_loss()
    g = {k: torch.ones_like(t) for k, t in params.items()}
    ref = implicit_meta_gradient(loss, params, g, lam=2.0, cg_steps=3)
    got = implicit_meta_gradient(loss, params, g, lam=torch.tensor(2.0), cg_steps=3)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    for bad in (torch.tensor([2.0, 3.0]), "2.0", [2.0]):
        with pytest.raises(ValueError, match=r"lam must be a positive number or a dict name -> tensor, got"):
            implicit_meta_gradient(loss, params, g, lam=bad, cg_steps=3)


def test_implicit_gradient_input_errors_name_what_to_fix():
    loss, params, _ = _partly_used_loss()
    g = {k: torch.ones_like(t) for k, t in params.items()}
    msg = (
        r"^lam must be > 0 and finite for the implicit gradient \(it divides H\), got 0.0; "
        r"lam = 0 means no proximal term, where the implicit gradient does not exist$"
    )
    with pytest.raises(ValueError, match=msg):
        implicit_meta_gradient(loss, params, g, lam=0.0, cg_steps=2)
    with pytest.raises(ValueError, match=r"^return_lam_grad needs theta: d F / d lam = -<y, phi - theta>$"):
        implicit_meta_gradient(loss, params, g, lam=1.0, cg_steps=2, return_lam_grad=True)
    # one argument a tensor, the other a dict, either way round
    for p, q, names in ((params["a"], g, "Tensor and dict"), (params, g["a"], "dict and Tensor")):
        with pytest.raises(
            ValueError, match=rf"^params and query_grad must be dicts name -> Tensor, got {names}$"
        ):
            implicit_meta_gradient(loss, p, q, lam=1.0, cg_steps=2)
    with pytest.raises(ValueError, match=r"key mismatch between params and query_grad"):
        implicit_meta_gradient(loss, params, {"a": g["a"]}, lam=1.0, cg_steps=2)


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
        x, info = implicit_meta_gradient(loss, params, g, lam=lam, cg_steps=3, rtol=rtol, return_info=True)
        assert int(info.steps) == int(ref.steps), rtol
    assert int(ref.steps) < 3  # the loose tolerance did stop early
    if per_param:
        exact = torch.linalg.solve(A, g["a"])
        x, _ = implicit_meta_gradient(loss, params, g, lam=lam, cg_steps=3, return_info=True)
        x32, _ = implicit_meta_gradient(
            loss, params, g, lam={"a": torch.tensor(5.3, dtype=torch.float32)}, cg_steps=3, return_info=True
        )
        assert rel(x["a"], exact) < 1e-13
        # float32 5.3 is 5.30000019: the answer is the float64 one for that value, not a float32-rounded one
        lam32 = float(torch.tensor(5.3, dtype=torch.float32))
        exact32 = torch.linalg.solve(torch.eye(3, dtype=torch.float64) + H / lam32, g["a"])
        assert rel(x32["a"], exact32) < 1e-13


# ------------------------------------------------------------------------- CG: stopping rules exactly
# Small systems whose arithmetic is exact in binary floating point, so each comparison in CG's stopping and
# truncation rules can be put exactly on its boundary: a "<=" that became "<" shows as one step more or less.


def test_cg_stops_on_the_tolerance_boundary_exactly():
    A = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=torch.float64))
    b = torch.ones(4, dtype=torch.float64)  # ||b|| = 2
    # step 1 from 0: alpha = b'b / b'Ab = 4 / 8, r = b - A b / 2 = (1, 1, -1, -1) / 2, ||r|| = 1 = rtol ||b||
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=5, rtol=0.5)
    assert int(info.steps) == 1 and bool(info.converged) and info.residual_norm.item() == 1.0
    assert torch.equal(x, b / 2)
    # ||r0|| = ||b|| = rtol ||b|| with rtol = 1: converged before any step, no matvec spent
    calls = []
    x, info = conjugate_gradient(lambda v: calls.append(1) or A @ v, b, max_steps=5, rtol=1.0)
    assert int(info.steps) == 0 and bool(info.converged) and not calls
    assert torch.equal(x, torch.zeros(4, dtype=torch.float64))
    # a right-hand side of norm exactly 1 is solved, not taken for converged (two eigenvalues: two steps)
    x, info = conjugate_gradient(lambda v: A @ v, b / 2, max_steps=5)
    assert int(info.steps) == 2 and bool(info.converged)
    exact = torch.tensor([0.5, 0.5, 0.5 / 3, 0.5 / 3], dtype=torch.float64)
    torch.testing.assert_close(x, exact, rtol=1e-15, atol=0)
    assert info.steps.dtype == torch.int64  # documented: a step count, not a float


def test_cg_curvature_threshold_is_the_one_passed_and_inclusive():
    A = torch.diag(torch.tensor([0.5, 2.0], dtype=torch.float64))
    b = torch.tensor([1.0, 0.0], dtype=torch.float64)  # Rayleigh quotient along b: exactly 0.5
    # p'Ap <= eps ||p||^2 truncates (docstring): at eps = 0.5 exactly, the first direction is rejected -> b
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=3, curvature_eps=0.5)
    assert bool(info.negative_curvature) and int(info.steps) == 0 and torch.equal(x, b)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=3, curvature_eps=0.49)
    assert not bool(info.negative_curvature) and torch.equal(x, torch.tensor([2.0, 0.0]).double())
    # float64's default, sqrt(eps64) = 1.5e-8, accepts a Rayleigh quotient of 1e-6 (float32's 3.5e-4 does not)
    A = torch.diag(torch.tensor([1e-6, 1.0], dtype=torch.float64))
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=3)
    assert not bool(info.negative_curvature) and bool(info.converged)
    torch.testing.assert_close(x, torch.tensor([1e6, 0.0]).double(), rtol=1e-12, atol=0)
    x, info = conjugate_gradient(lambda v: A.float() @ v, b.float(), max_steps=3)
    assert bool(info.negative_curvature) and torch.equal(x, b.float())  # float32: rounding noise, truncated


def test_cg_error_messages_name_the_bad_value():
    with pytest.raises(ValueError, match=r"rtol must be >= 0, got -0\.1"):
        conjugate_gradient(lambda v: v, torch.ones(2), max_steps=2, rtol=-0.1)
    with pytest.raises(ValueError, match=re.escape("shape mismatch: b has shape (2,), x0 has (3,)")):
        conjugate_gradient(lambda v: v, torch.ones(2), max_steps=2, x0=torch.ones(3))
    with pytest.raises(ValueError, match="but b is torch.int64; cast it"):
        conjugate_gradient(lambda v: v, torch.ones(2, dtype=torch.int64), max_steps=2)
    with pytest.raises(ValueError, match="but w is torch.int32"):
        conjugate_gradient(lambda v: v, {"v": torch.ones(2), "w": torch.ones(2, dtype=torch.int32)}, 2)


def test_under_functorch_without_the_private_hook_takes_the_torch_func_path(monkeypatch):
    from lightning_imaml import implicit

    assert implicit.under_functorch() is False  # plain call, the hook exists in this torch
    monkeypatch.delattr(torch._C._functorch, "peek_interpreter_stack")
    assert implicit.under_functorch() is True  # torch.func works everywhere; autograd.grad not under vmap


@pytest.mark.parametrize("strategy", ["retain", "linearize", "double_backward", "forward_over_reverse"])
def test_make_hvp_runs_the_strategy_asked_for(strategy, monkeypatch):
    """The four strategies agree to rounding (tested above), so check the dispatch itself: the function that
    computes H v is the one named, and its product matches the dense Hessian."""
    from lightning_imaml import implicit

    ran = []
    for name in ("_hvp_double_backward", "_hvp_forward_over_reverse", "_grad_of_grads"):
        real = getattr(implicit, name)
        monkeypatch.setattr(implicit, name, lambda *a, _r=real, _n=name, **k: ran.append(_n) or _r(*a, **k))
    real_linearize = torch.func.linearize
    monkeypatch.setattr(torch.func, "linearize", lambda *a: ran.append("linearize") or real_linearize(*a))
    model = small_mlp()
    x, y = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)

    def loss(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    phi = {k: v.detach() for k, v in model.named_parameters()}
    v = {k: torch.randn_like(t) for k, t in phi.items()}
    hv = implicit._make_hvp(loss, phi, strategy)(v)
    expected = {
        "retain": ["_grad_of_grads"],
        "linearize": ["linearize"],
        "double_backward": ["_hvp_double_backward", "_grad_of_grads"],
        "forward_over_reverse": ["_hvp_forward_over_reverse"],
    }[strategy]
    assert ran == expected
    ref = dense_hessian(loss, phi) @ flatten(v)
    assert rel(flatten(hv), ref) < 1e-12
    valid = "'retain', 'linearize', 'double_backward', 'forward_over_reverse'"
    with pytest.raises(ValueError, match=re.escape(f"unknown hvp strategy 'exact'; valid: {valid}")):
        implicit._make_hvp(loss, phi, "exact")
