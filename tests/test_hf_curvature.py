"""iMAML-HF's curvature choices (issue 23): the generalised Gauss-Newton product against a dense
J^T H_out J, the Gauss-Newton Newton step against a dense solve, and Levenberg-Marquardt damping against a
dense re-implementation of its documented rule. Every check starts where the wrong matrix (the Hessian
instead of the Gauss-Newton matrix, a fixed damping instead of an adapted one) gives a different answer,
and asserts that it does."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import rel
from torch.autograd.functional import hessian, jacobian

from lightning_imaml.functional import TaskLoss
from lightning_imaml.implicit import RetainedGGN, RetainedHVP
from lightning_imaml.inner import HessianFree, ProximalProblem, newton_direction
from lightning_imaml.params import ParamSpec

F64 = torch.float64


def mlp_tasks(T=2, n=6, seed=0):
    """A tanh MLP (its Hessian != its Gauss-Newton matrix) and T classification tasks as a TaskLoss."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    spec = ParamSpec.of(theta)
    x = torch.randn(T, n, 3, dtype=F64)
    y = torch.randint(0, 3, (T, n))
    loss = TaskLoss(model, spec, x, y, F.cross_entropy, mode="vmap")
    phi = spec.flatten(theta).expand(T, -1) + 0.5 * torch.randn(T, spec.numel, dtype=F64)
    return loss, phi.contiguous()


def dense_ggn_and_hessian(loss, phi_row, t):
    """Dense G = J^T H_out J and Hessian H of task t's loss at ``phi_row [P]`` (torch.autograd.functional)."""
    row = loss.select(torch.tensor([t]))

    def outputs(p):
        return row.outputs(p[None])[0]  # [n, C]

    J = jacobian(outputs, phi_row).reshape(-1, phi_row.numel())  # [n C, P]
    out = outputs(phi_row).detach()
    H_out = hessian(lambda o: row.losses(o.reshape(out.shape)[None])[0], out.reshape(-1))  # [n C, n C]
    H = hessian(lambda p: row(p[None])[0], phi_row)
    return J.T @ H_out @ J, H


def test_ggn_product_is_dense_jt_hout_j_and_not_the_hessian():
    loss, phi = mlp_tasks()
    ggn = RetainedGGN(loss, phi)
    hvp = RetainedHVP(loss, phi)
    torch.manual_seed(1)
    v = torch.randn_like(phi)
    got = ggn(v)
    for t in range(phi.shape[0]):
        G, H = dense_ggn_and_hessian(loss, phi[t], t)
        assert rel(got[t], G @ v[t]) < 1e-12
        assert rel(hvp(v)[t], H @ v[t]) < 1e-12
        assert rel(G @ v[t], H @ v[t]) > 1e-2  # the two matrices differ here: the check above can fail
        assert torch.linalg.eigvalsh(G).min() > -1e-12  # positive semi-definite, as the docstring says
    # value and gradient as RetainedHVP's
    assert rel(ggn.value, loss(phi).detach()) < 1e-14
    assert rel(ggn.grad, hvp.grad) < 1e-14 and ggn.grad.norm() > 0


def test_ggn_needs_a_task_loss():
    with pytest.raises(ValueError, match="curvature='gauss_newton' needs a TaskLoss"):
        HessianFree(steps=1, curvature="gauss_newton")(
            lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(2)}, 1.0
        )


@pytest.mark.parametrize("curvature", ["gauss_newton", "hessian"])
def test_one_newton_step_is_the_dense_damped_solve_of_its_matrix(curvature):
    """One HF iteration, CG run to exactness: phi - theta = t d with d = -(B + lam I + mu I)^{-1} g, B the
    chosen matrix at theta, t the first backtracking trial that passes Armijo."""
    loss, theta = mlp_tasks(seed=3)
    lam, mu = 0.7, 0.3
    P = theta.shape[1]
    solver = HessianFree(steps=1, cg_steps=4 * P, curvature=curvature, damping=mu)
    phi, info = solver.solve(ProximalProblem(loss, theta, lam))
    assert bool((info.accepted == 1).all())
    for t in range(theta.shape[0]):
        G, H = dense_ggn_and_hessian(loss, theta[t], t)
        B, other = (G, H) if curvature == "gauss_newton" else (H, G)
        row = loss.select(torch.tensor([t]))
        p = theta[t].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(row(p[None])[0], p)
        d = -torch.linalg.solve(B + (lam + mu) * torch.eye(P, dtype=F64), g)
        d_other = -torch.linalg.solve(other + (lam + mu) * torch.eye(P, dtype=F64), g)
        step = phi[t] - theta[t]
        ratio = (step @ d / (d @ d)).item()
        assert ratio in [pytest.approx(0.5**j, rel=1e-9) for j in range(10)]
        assert rel(step, ratio * d) < 1e-8
        assert rel(d, d_other) > 1e-2  # the other matrix's step is measurably different


def test_gauss_newton_hf_reaches_the_proximal_optimum_of_a_convex_task():
    """Softmax regression: G = H exactly (the outputs are linear in phi), so Gauss-Newton HF is Newton's
    method and its fixed point is where grad L(phi) + lam (phi - theta) = 0 (the optimality condition)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    theta_d = {k: v.detach() for k, v in model.named_parameters()}
    spec = ParamSpec.of(theta_d)
    T = 3
    x, y = torch.randn(T, 10, 4, dtype=F64), torch.randint(0, 3, (T, 10))
    loss = TaskLoss(model, spec, x, y, F.cross_entropy, mode="vmap")
    theta = spec.flatten(theta_d).expand(T, -1).contiguous()
    lam = 0.05
    problem = ProximalProblem(loss, theta, lam)
    phi, info = HessianFree(
        steps=12, cg_steps=40, curvature="gauss_newton", damping=0.0, adapt_damping=False
    ).solve(problem)
    p = phi.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(p).sum(), p)
    prox_grad = g + lam * (phi - theta)
    assert prox_grad.norm(dim=1).max() < 1e-10
    assert (phi - theta).norm(dim=1).min() > 1e-1  # it moved: theta itself is far from optimal
    assert torch.allclose(info.residual, prox_grad.norm(dim=1), rtol=1e-6, atol=1e-12)


def reference_lm_hf(f, theta, lam, steps, mu0, adapt, lr=1.0, c1=1e-4, backtrack=0.5, trials=10):
    """The documented HF rule written out densely for one task ``f: [P] -> scalar``: exact damped Newton
    direction, Armijo backtracking from lr, then (adapt) mu x 3/2 if rho < 1/4, mu / 3/2 if rho > 3/4, with
    rho = actual decrease / the damped quadratic model's predicted decrease at the accepted step."""
    phi = theta.clone()
    mu, mus = mu0, []
    for _ in range(steps):

        def G(p):
            return f(p) + 0.5 * lam * ((p - theta) ** 2).sum()

        p = phi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(G(p), p)
        A = hessian(G, phi) + mu * torch.eye(phi.numel(), dtype=F64)
        d = -torch.linalg.solve(A, g)
        slope = g @ d
        old = G(phi).item()
        for j in range(trials):
            t = lr * backtrack**j
            new = G(phi + t * d).item()
            if new <= old + c1 * t * slope.item():
                break
        else:
            raise AssertionError("the reference found no step; choose another start")
        predicted = t * slope.item() + 0.5 * t * t * (d @ A @ d).item()
        rho = (new - old) / predicted
        phi = phi + t * d
        if adapt:
            mu = mu * 1.5 if rho < 0.25 else (mu / 1.5 if rho > 0.75 else mu)
        mus.append(mu)
    return phi, mus


@pytest.mark.parametrize(
    "lam, mu0, first_two",
    [(0.1, 0.12, (1.5, 1 / 1.5)), (0.0, 0.25, (1.0, 1.0)), (0.0, 0.3, (1.0, 1.5))],
)
def test_levenberg_marquardt_damping_follows_its_documented_rule(lam, mu0, first_two):
    """log cosh far from its minimum, where the damped Newton model is poor at first and good later: with
    lam 0.1, mu 0.12 the first step achieves under 1/4 of the predicted decrease (mu grows), then over 3/4
    (mu shrinks); with lam 0, mu 0.25 the first two achieve 0.40 and 0.62 of it (mu kept); with mu 0.3,
    0.27 (kept) then 0.07 (mu grows). The solver's
    iterates match the dense reference of the rule, not those of the fixed damping."""

    def f(p):
        return torch.log(torch.cosh(p)).sum() + 0.3 * p[0] * p[1]

    theta = torch.tensor([2.0, -1.5, 1.0], dtype=F64)
    steps = 5
    ref, mus = reference_lm_hf(f, theta, lam, steps, mu0, adapt=True)
    fixed, _ = reference_lm_hf(f, theta, lam, steps, mu0, adapt=False)
    trace = [mu0, *mus]
    shrinks = any(b < a for a, b in zip(trace, trace[1:], strict=False))
    assert shrinks and mus[:2] == pytest.approx([mu0 * first_two[0], mu0 * first_two[0] * first_two[1]])
    assert rel(ref, fixed) > 1e-3  # adapting mu changes the answer
    solver = HessianFree(steps=steps, cg_steps=30, damping=mu0, adapt_damping=True)
    phi, info = solver(lambda p: f(p["w"]), {"w": theta}, lam)
    assert info.accepted.item() == steps
    assert rel(phi["w"], ref) < 1e-9
    assert rel(phi["w"], fixed) > 1e-4


def krylov_minimiser(A, b, k):
    """The minimiser of 1/2 x^T A x - b^T x over span{b, Ab, ..., A^{k-1} b}, by a dense solve: what k steps
    of CG from 0 give in exact arithmetic when A is positive definite on that space."""
    K = torch.stack([torch.linalg.matrix_power(A, j) @ b for j in range(k)], dim=1)
    return K @ torch.linalg.solve(K.T @ A @ K, K.T @ b)


def test_newton_direction_gets_the_models_curvature_from_cg_without_another_product():
    """Three tasks at once: (0) positive definite A, CG truncated at 3 of 8 steps: d is the Krylov minimiser
    and d^T A d (from CG's Galerkin identity, no product) equals the dense d^T A d; (1) an A with
    g^T A g < 0: CG stops before its first step, d = -g and the curvature is g^T A g < 0, which -g^T d (> 0)
    would get wrong; (2) g = 0: d = 0, curvature 0. Three products in all, CG's own."""
    torch.manual_seed(1)
    P = 8
    Q = torch.linalg.qr(torch.randn(P, P, dtype=F64))[0]
    spd = Q @ torch.diag(torch.logspace(-1, 1, P, dtype=F64)) @ Q.T
    g0 = torch.randn(P, dtype=F64)
    u = g0 / g0.norm()
    indefinite = spd - 20.0 * torch.outer(u, u)  # g0^T A g0 < 0
    A = torch.stack([spd, indefinite, spd])
    g = torch.stack([torch.randn(P, dtype=F64), g0, torch.zeros(P, dtype=F64)])
    calls = []

    def matvec(v):
        calls.append(1)
        return torch.einsum("tij,tj->ti", A, v)

    d, slope, curvature = newton_direction(matvec, g, cg_steps=3)
    assert len(calls) == 3
    expected = krylov_minimiser(spd, -g[0], 3)
    assert rel(d[0], expected) < 1e-10 and rel(d[0], torch.linalg.solve(spd, -g[0])) > 1e-3  # truncated
    assert curvature[0].item() == pytest.approx((expected @ spd @ expected).item(), rel=1e-10)
    assert slope[0].item() == pytest.approx((g[0] @ expected).item(), rel=1e-10)
    assert torch.equal(d[1], -g0) and (g0 @ indefinite @ g0).item() < 0
    assert curvature[1].item() == pytest.approx((g0 @ indefinite @ g0).item(), rel=1e-12)
    assert slope[1].item() == pytest.approx(-(g0 @ g0).item(), rel=1e-12)
    assert torch.equal(d[2], torch.zeros(P, dtype=F64)) and curvature[2].item() == 0 and slope[2].item() == 0
