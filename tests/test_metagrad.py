"""Per-task meta-gradients (lightning_imaml.metagrad) against independent answers, on linear least squares
(float64), where every quantity is a few dense matrices: the one-step MAML gradient (I - alpha H) grad L_q,
first-order MAML's hand-unrolled proximal GD, iMAML's 5-step CG iterate as the exact minimiser over the
Krylov space K_5(A, b) (dense, by QR), the damped system by a dense solve, torch.optim.SGD with momentum as
the inner solver, unused parameters, and the forward-only autocast (``ForwardCast``) against a model that
autocasts its own forward.

These pin the documented defaults (MAML / FOMAML: lam 0, one step of lr 0.1; FOMAML: fixed-step "gd"; iMAML:
"gd_armijo", 5 CG steps; Hessian-free: 5 CG steps per Newton direction) by behaviour, not by signature.
Tolerances: about 100x the measured errors, which the tests print (0 - 8e-13 in float64 here; a wrong term
or a default off by one shows as 1e-4 or more)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

from lightning_imaml.inner import InnerInfo, hessian_free_adapt
from lightning_imaml.metagrad import (
    ForwardCast,
    adapt,
    fomaml_task_meta_gradient,
    imaml_task_meta_gradient,
    inner_diagnostics,
    loss_for_task_type,
    make_task_loss,
    maml_task_meta_gradient,
    mse_loss,
)

D = 6  # inputs; parameters: D weights + 1 bias = 7 > 5 CG steps, so 5 steps are not yet exact


def make_task(seed=0, n=9, m=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sx, qx = (torch.randn(k, D, generator=g, dtype=dtype) for k in (n, m))
    # uneven feature scales: a spread spectrum, so truncated CG is visibly short of the solution
    scale = torch.tensor([3.0, 1.5, 1.0, 0.7, 0.4, 0.2], dtype=dtype)
    sx, qx = sx * scale, qx * scale
    w = torch.randn(D, 1, generator=g, dtype=dtype)
    sy = sx @ w + 0.3 * torch.randn(n, 1, generator=g, dtype=dtype)
    qy = qx @ w + 0.3 * torch.randn(m, 1, generator=g, dtype=dtype)
    return sx, sy, qx, qy


def make_model(seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Linear(D, 1).to(dtype)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, theta


def flat(params, names=("weight", "bias")):
    return torch.cat([params[k].reshape(-1) for k in names])


def flat_loss(model, x, y, prefix=""):
    """v (7,) -> mse of the linear model with weight v[:D], bias v[D:] (for torch.func's own derivatives)."""

    def f(v):
        p = {prefix + "weight": v[:D].reshape(1, D), prefix + "bias": v[D:]}
        return mse_loss(functional_call(model, p, (x,)), y)

    return f


def problem():
    """The linear model, theta, a task, and its support and query losses as functions of the flat vector."""
    model, theta = make_model()
    task = make_task()
    sx, sy, qx, qy = task
    return model, theta, task, flat_loss(model, sx, sy), flat_loss(model, qx, qy)


def krylov_minimiser(A, b, k):
    """argmin over x in K_k(A, b) of 1/2 x^T A x - b^T x: what k exact CG steps from 0 return."""
    K = torch.stack([torch.linalg.matrix_power(A, i) @ b for i in range(k)], dim=1)
    V, _ = torch.linalg.qr(K)
    return V @ torch.linalg.solve(V.T @ A @ V, V.T @ b)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_maml_defaults_are_one_step_of_lr_0p1_without_proximal_term_and_match_the_closed_form():
    model, theta, task, Ls, Lq = problem()
    v = flat(theta)
    phi = v - 0.1 * grad(Ls)(v)
    ref = (torch.eye(D + 1, dtype=v.dtype) - 0.1 * hessian(Ls)(v)) @ grad(Lq)(phi)
    res = maml_task_meta_gradient(model, theta, task, loss_fn=mse_loss)
    err = rel(flat(res.grad), ref)
    print(f"MAML one step vs (I - 0.1 H) grad L_q: {err:.1e}")
    assert err < 1e-13
    assert abs(res.query_loss.item() - Lq(phi).item()) < 1e-12
    assert abs(res.support_loss.item() - Ls(phi).item()) < 1e-12
    # lam 0 by default shows from the second step on (at the first, phi - theta is 0): three steps, with
    # the unrolled loop differentiated by torch.func, and with lam = 1 for contrast
    for lam in (None, 1.0):

        def unrolled(w, lam=lam or 0.0):
            phi = w
            for _ in range(3):
                phi = phi - 0.1 * (grad(Ls)(phi) + lam * (phi - w))
            return Lq(phi)

        kw = {} if lam is None else {"lam": lam}
        res = maml_task_meta_gradient(model, theta, task, loss_fn=mse_loss, inner_steps=3, **kw)
        assert rel(flat(res.grad), grad(unrolled)(v)) < 1e-13, lam
    assert rel(grad(unrolled)(v), grad(lambda w: unrolled(w, 0.0))(v)) > 1e-4  # lam shows


def test_fomaml_defaults_and_proximal_gd_by_hand():
    model, theta, task, Ls, Lq = problem()
    v = flat(theta)
    # defaults: one fixed GD step of lr 0.1, lam 0
    res = fomaml_task_meta_gradient(model, theta, task, loss_fn=mse_loss)
    assert rel(flat(res.grad), grad(Lq)(v - 0.1 * grad(Ls)(v))) < 1e-13
    phi = v.clone()
    for _ in range(3):  # lam 0 by default shows from the second step on
        phi = phi - 0.1 * grad(Ls)(phi)
    res = fomaml_task_meta_gradient(model, theta, task, loss_fn=mse_loss, inner_steps=3)
    assert rel(flat(res.grad), grad(Lq)(phi)) < 1e-13
    # three steps of lr 0.3 on L_s + 0.5/2 ||phi - theta||^2
    phi = v.clone()
    G = [Ls(phi).item()]  # the proximal objective along the way (lr 0.3 is past GD's stability edge here)
    for _ in range(3):
        phi = phi - 0.3 * (grad(Ls)(phi) + 0.5 * (phi - v))
        G.append(Ls(phi).item() + 0.25 * ((phi - v) ** 2).sum().item())
    res = fomaml_task_meta_gradient(
        model, theta, task, loss_fn=mse_loss, lam=0.5, inner_steps=3, inner_lr=0.3
    )
    err = rel(flat(res.grad), grad(Lq)(phi))
    print(f"FOMAML 3 proximal GD steps vs by hand: {err:.1e}")
    assert err < 1e-13
    assert abs(res.support_loss.item() - Ls(phi).item()) < 1e-12
    assert set(res.info) == {"inner_residual", "inner_residual_rel", "inner_rose", "inner_accepted"}
    # the solve quality it reports: the proximal gradient norm at phi, relative to ||grad L_s(theta)||
    residual = (grad(Ls)(phi) + 0.5 * (phi - v)).norm().item()
    assert res.info["inner_residual"].item() == pytest.approx(residual, rel=1e-12)
    assert res.info["inner_residual_rel"].item() == pytest.approx(
        residual / grad(Ls)(v).norm().item(), rel=1e-12
    )
    rose = any(b > a for a, b in zip(G, G[1:], strict=False))
    assert res.info["inner_accepted"].item() == 3.0 and res.info["inner_rose"].item() == float(rose)
    assert all(t.dtype == torch.float64 for t in res.info.values())


@pytest.mark.parametrize("fn", ["imaml", "fomaml"])
def test_hessian_free_inner_solver_takes_5_cg_steps_per_direction_unless_told(fn):
    model, theta = make_model()
    task = make_task()
    sx, sy, qx, qy = task
    support = make_task_loss(model, sx, sy, mse_loss)
    kw = dict(loss_fn=mse_loss, lam=0.5, inner_steps=1, inner_lr=1.0, inner_optimizer="hf")
    call = imaml_task_meta_gradient if fn == "imaml" else fomaml_task_meta_gradient
    for hf_cg_steps in (None, 2):
        extra = {} if hf_cg_steps is None else {"hf_cg_steps": hf_cg_steps}
        res = call(model, theta, task, **kw, **extra)
        # one Newton-CG step is short of the optimum with 5 or 2 CG steps (7 parameters), and each count lands
        # somewhere else: the support loss at phi tells which count ran
        phi = hessian_free_adapt(support, theta, lam=0.5, steps=1, hf_cg_steps=hf_cg_steps or 5, lr=1.0)
        assert abs(res.support_loss.item() - support(phi).item()) < 1e-12, hf_cg_steps
    phi5 = hessian_free_adapt(support, theta, lam=0.5, steps=1, hf_cg_steps=5, lr=1.0)
    phi6 = hessian_free_adapt(support, theta, lam=0.5, steps=1, hf_cg_steps=6, lr=1.0)
    assert abs(support(phi5).item() - support(phi6).item()) > 1e-8  # the check above can tell 5 from 6


def _exact_phi(Ls, v, lam):
    # L_s is quadratic: phi* = v - (H + lam I)^-1 grad L_s(v)
    H = hessian(Ls)(v)
    return v - torch.linalg.solve(H + lam * torch.eye(len(v), dtype=v.dtype), grad(Ls)(v)), H


def test_imaml_defaults_gd_armijo_and_5_cg_steps_against_the_krylov_minimiser():
    model, theta, task, Ls, Lq = problem()
    v, lam = flat(theta), 2.0
    phi, H = _exact_phi(Ls, v, lam)
    A = torch.eye(D + 1, dtype=v.dtype) + H / lam
    b = grad(Lq)(phi)
    x5, x6 = krylov_minimiser(A, b, 5), krylov_minimiser(A, b, 6)
    assert rel(x5, x6) > 1e-6  # 5 steps are distinguishable from 6
    # inner_lr 0.5 is past fixed-step GD's stability edge here (2 / (max eig H + lam) < 0.5): only a
    # safeguarded default reaches phi*
    assert 2.0 / (torch.linalg.eigvalsh(H).max().item() + lam) < 0.5
    res = imaml_task_meta_gradient(
        model, theta, task, loss_fn=mse_loss, lam=lam, inner_steps=300, inner_lr=0.5
    )
    err = rel(flat(res.grad), x5)
    print(f"iMAML defaults vs 5-step Krylov minimiser: {err:.1e} (6-step one is {rel(x6, x5):.1e} away)")
    assert err < 1e-12
    assert abs(res.support_loss.item() - Ls(phi).item()) < 1e-12
    # what it logs: these keys, floating (so they average and log), cg_steps the count taken
    assert set(res.info) == {
        "cg_steps",
        "cg_residual",
        "cg_negative_curvature",
        "inner_residual",
        "inner_residual_rel",
        "inner_rose",
        "inner_accepted",
    }
    assert all(t.dtype == torch.float64 and t.dim() == 0 for t in res.info.values())
    assert res.info["cg_steps"].item() == 5.0 and res.info["cg_negative_curvature"].item() == 0.0
    assert res.info["cg_residual"].item() == pytest.approx((A @ x5 - b).norm().item(), rel=1e-6)


def test_imaml_cg_damping_against_a_dense_solve():
    model, theta, task, Ls, Lq = problem()
    v, lam = flat(theta), 2.0
    phi, H = _exact_phi(Ls, v, lam)
    b = grad(Lq)(phi)
    ref = torch.linalg.solve(1.5 * torch.eye(D + 1, dtype=v.dtype) + H / lam, b)
    res = imaml_task_meta_gradient(
        model, theta, task, loss_fn=mse_loss, lam=lam, inner_steps=300, inner_lr=0.5, cg_steps=D + 1,
        cg_damping=0.5,
    )  # fmt: skip
    err = rel(flat(res.grad), ref)
    print(f"iMAML damped 0.5 vs dense solve: {err:.1e}")
    assert err < 1e-11
    assert rel(ref, torch.linalg.solve(torch.eye(D + 1, dtype=v.dtype) + H / lam, b)) > 1e-2


def test_inner_optimizer_options_reach_the_solver_sgd_momentum_vs_torch_optim():
    model, theta, task, Ls, Lq = problem()
    v, lam, lr, steps = flat(theta), 2.0, 0.05, 4
    p = v.clone().requires_grad_(True)
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        (Ls(p) + 0.5 * lam * ((p - v) ** 2).sum()).backward()
        opt.step()
    phi = p.detach()
    ref = torch.linalg.solve(torch.eye(D + 1, dtype=v.dtype) + hessian(Ls)(phi) / lam, grad(Lq)(phi))
    res = imaml_task_meta_gradient(
        model, theta, task, loss_fn=mse_loss, lam=lam, inner_steps=steps, inner_lr=lr, inner_optimizer="sgd",
        inner_optimizer_kwargs={"momentum": 0.9}, cg_steps=D + 1,
    )  # fmt: skip
    err = rel(flat(res.grad), ref)
    print(f"iMAML with SGD momentum 0.9 vs torch.optim.SGD + dense solve: {err:.1e}")
    assert err < 1e-11
    assert abs(res.support_loss.item() - Ls(phi).item()) < 1e-12
    # first-order MAML hands the same options to the same solver: grad L_q at that phi
    res = fomaml_task_meta_gradient(
        model, theta, task, loss_fn=mse_loss, lam=lam, inner_steps=steps, inner_lr=lr, inner_optimizer="sgd",
        inner_optimizer_kwargs={"momentum": 0.9},
    )  # fmt: skip
    assert rel(flat(res.grad), grad(Lq)(phi)) < 1e-12


class WithUnused(nn.Module):
    """The linear model plus a parameter that the forward never touches (a frozen-in-practice head, say)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin
        self.unused = nn.Parameter(torch.ones(3, dtype=lin.weight.dtype))

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("method", ["maml", "maml_first_order", "fomaml", "imaml"])
def test_parameters_the_loss_does_not_use_get_a_zero_meta_gradient(method):
    lin, theta = make_model()
    task = make_task()
    wrapped = WithUnused(lin)
    theta_w = {"lin." + k: v for k, v in theta.items()} | {"unused": wrapped.unused.detach().clone()}
    kw = dict(loss_fn=mse_loss, lam=0.5, inner_steps=2, inner_lr=0.1)
    if method.startswith("maml"):
        call = lambda m, t: maml_task_meta_gradient(m, t, task, first_order=method.endswith("order"), **kw)  # noqa: E731
    elif method == "fomaml":
        call = lambda m, t: fomaml_task_meta_gradient(m, t, task, **kw)  # noqa: E731
    else:
        call = lambda m, t: imaml_task_meta_gradient(m, t, task, inner_optimizer="gd", **kw)  # noqa: E731
    plain, with_unused = call(lin, theta), call(wrapped, theta_w)
    assert torch.equal(with_unused.grad["unused"], torch.zeros(3, dtype=torch.float64))
    for k in theta:
        assert torch.allclose(with_unused.grad["lin." + k], plain.grad[k], rtol=1e-12, atol=0), k


class AutocastItself(nn.Module):
    """What ``ForwardCast`` promises: the model's forward under torch.autocast, its output back in float32."""

    def __init__(self, inner, dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        with torch.autocast("cpu", dtype=self.dtype):
            out = self.inner(x)
        return out.float()


@pytest.mark.parametrize(
    "method,dtype",
    [
        ("imaml", torch.bfloat16),
        ("maml", torch.bfloat16),
        ("fomaml", torch.bfloat16),
        ("imaml", torch.float16),
    ],
)
def test_forward_cast_applies_to_every_forward_support_and_query(method, dtype):
    lin, theta = make_model(dtype=torch.float32)
    task = make_task(dtype=torch.float32)
    ref_model = AutocastItself(lin, dtype)
    theta_ref = {"inner." + k: v for k, v in theta.items()}
    kw = dict(loss_fn=mse_loss, lam=0.5, inner_steps=2, inner_lr=0.1)
    if method == "imaml":
        kw.update(inner_optimizer="gd", cg_steps=3)
    call = {
        "imaml": imaml_task_meta_gradient,
        "maml": maml_task_meta_gradient,
        "fomaml": fomaml_task_meta_gradient,
    }[method]
    cast = call(lin, theta, task, cast=ForwardCast("cpu", dtype), **kw)
    ref = call(ref_model, theta_ref, task, **kw)
    full = call(lin, theta, task, **kw)
    for k in theta:
        assert torch.allclose(cast.grad[k], ref.grad["inner." + k], rtol=1e-6, atol=1e-7), k
    for name in ("query_loss", "support_loss"):
        a, b, c = (getattr(r, name).item() for r in (cast, ref, full))
        assert a == pytest.approx(b, rel=1e-6), name
        assert abs(a - c) > 1e-4 * abs(c), name  # bfloat16 forwards differ visibly from float32 ones
    assert cast.query_out.dtype == torch.float32


def test_adapt_is_proximal_adapt_from_theta_and_detached():
    model, theta = make_model()
    sx, sy, _, _ = make_task()
    Ls = flat_loss(model, sx, sy)
    v = flat(theta)
    phi = v.clone()
    for _ in range(4):
        phi = phi - 0.2 * (grad(Ls)(phi) + 1.5 * (phi - v))
    out = adapt(model, theta, sx, sy, loss_fn=mse_loss, lam=1.5, steps=4, lr=0.2)
    assert rel(flat(out), phi) < 1e-12
    assert all(not t.requires_grad for t in out.values())
    # Hessian-free: 5 CG steps per Newton direction unless told
    support = make_task_loss(model, sx, sy, mse_loss)
    out = adapt(model, theta, sx, sy, loss_fn=mse_loss, lam=1.5, steps=1, lr=1.0, optimizer="hf")
    ref = hessian_free_adapt(support, theta, lam=1.5, steps=1, hf_cg_steps=5, lr=1.0)
    assert rel(flat(out), flat(ref)) < 1e-13


def test_unknown_task_type_says_which_are_known():
    with pytest.raises(
        ValueError, match=r"task_type must be 'classification' or 'regression', got 'ranking'"
    ):
        loss_for_task_type("ranking")


def test_inner_diagnostics_relative_residual_and_flags():
    f = torch.tensor
    info = InnerInfo(f(0.5), f(2.0), f(True), f(7), f(1.0))
    d = inner_diagnostics(info)
    assert d["inner_residual"].item() == 0.5 and d["inner_residual_rel"].item() == 0.25
    assert d["inner_rose"].item() == 1.0 and d["inner_accepted"].item() == 7.0
    assert all(t.dtype == torch.float32 for t in d.values())
    # theta already stationary (||grad L(theta)|| = 0): relative residual 0, not NaN or inf
    d = inner_diagnostics(InnerInfo(f(0.0), f(0.0), f(False), f(0), f(1.0)))
    assert d["inner_residual_rel"].item() == 0.0
    d = inner_diagnostics(InnerInfo(f(0.3), f(0.0), f(False), f(0), f(1.0)))
    assert d["inner_residual_rel"].item() == 0.0
    # a residual below 1 over a scale below 1 is still their ratio
    d = inner_diagnostics(InnerInfo(f(0.25), f(0.5), f(False), f(0), f(1.0)))
    assert d["inner_residual_rel"].item() == 0.5


def test_scalar_lam_gradient_against_the_closed_form_and_finite_differences():
    """dF/dlam for one scalar lam, F(lam) = L_q(phi*(lam)), phi*(lam) = v - (H + lam I)^-1 grad L_s(v)."""
    model, theta, task, Ls, Lq = problem()
    v, lam = flat(theta), 2.0

    def F(lam):
        return Lq(_exact_phi(Ls, v, lam)[0])

    phi, H = _exact_phi(Ls, v, lam)
    y = torch.linalg.solve(H + lam * torch.eye(D + 1, dtype=v.dtype), grad(Lq)(phi))
    exact = -(y @ (phi - v)).item()
    h = 1e-4
    fd = ((F(lam + h) - F(lam - h)) / (2 * h)).item()
    res = imaml_task_meta_gradient(
        model, theta, task, loss_fn=mse_loss, lam=lam, inner_steps=300, inner_lr=0.5, cg_steps=D + 1,
        lam_grad=True,
    )  # fmt: skip
    assert set(res.lam_grad) == {""}  # a number lam: one entry
    got = res.lam_grad[""].item()
    e_exact, e_fd = abs(got - exact) / abs(exact), abs(got - fd) / abs(fd)
    print(f"dF/dlam {got:.6e}: vs -<y, phi - theta> {e_exact:.1e}, vs central FD {e_fd:.1e}")
    assert e_exact < 1e-10 and e_fd < 5e-9
