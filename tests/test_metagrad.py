"""Task-batched meta-gradients (lightning_imaml.metagrad) against independent answers, on linear least squares
(float64), where every quantity is a few dense matrices: the one-step MAML gradient (I - alpha H) grad L_q,
first-order MAML's hand-unrolled proximal GD, iMAML's 5-step CG iterate as the exact minimiser over the
Krylov space K_5(A, b) (dense, by QR), the damped system by a dense solve, torch.optim.SGD with momentum as
the inner solver, one Hessian-free Newton-CG step as a Krylov minimiser, unused parameters, dF/dlam by its
closed form and finite differences, and the forward-only autocast (``ForwardCast``) against a model that
autocasts its own forward.

Every function takes T tasks with a leading task dimension and returns one row per task; the ground truths
are checked row by row on three unlike tasks (different data, so a row mixed up with another shows), and
every function's rows are checked against the same function called task by task (T = 1, mode "loop").

These pin the documented defaults (MAML: lam 0, one step of lr 0.1; FOMAML: lam 0; iMAML: CG() = 5 CG
steps; HessianFree: 5 CG steps per Newton direction) by behaviour, not by signature. Tolerances: about 100x
the measured errors, which the tests print (0 - 1e-12 in float64 here; a wrong term or a default off by one
shows as 1e-4 or more)."""

import pytest
import torch
from helpers import krylov_minimiser
from torch import nn
from torch.func import functional_call, grad, hessian

from lightning_imaml.cg import CG
from lightning_imaml.inner import GD, SGD, GDArmijo, HessianFree, InnerInfo, TorchOptimizer
from lightning_imaml.metagrad import (
    ForwardCast,
    TaskResults,
    adapt,
    adapt_tasks,
    fomaml_meta_gradient,
    imaml_meta_gradient,
    inner_diagnostics,
    loss_for_task_type,
    make_task_loss,
    maml_meta_gradient,
    mse_loss,
)
from lightning_imaml.params import ParamSpec

D = 6  # inputs; parameters: D weights + 1 bias = 7 > 5 CG steps, so 5 steps are not yet exact
T = 3  # tasks per batch
SEEDS = (0, 1, 2)
NAMES = ("0.weight", "0.bias")


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


def make_tasks(dtype=torch.float64):
    """T unlike tasks stacked along a leading task dimension: (sx [T, n, D], sy [T, n, 1], qx, qy)."""
    return tuple(
        torch.stack(parts) for parts in zip(*(make_task(s, dtype=dtype) for s in SEEDS), strict=True)
    )


def make_model(seed=1, dtype=torch.float64):
    """nn.Sequential(Linear(D, 1)): every mode of the engine ("native", "vmap", "loop") can run it."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 1)).to(dtype)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, theta


def flat(params, names=NAMES):
    return torch.cat([params[k].reshape(-1) for k in names])


def flat_loss(model, x, y, prefix=""):
    """v (7,) -> mse of the linear model with weight v[:D], bias v[D:] (for torch.func's own derivatives)."""

    def f(v):
        p = {prefix + "0.weight": v[:D].reshape(1, D), prefix + "0.bias": v[D:]}
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    return f


def problem(dtype=torch.float64):
    """The linear model, theta, T tasks, and per task its support and query losses of the flat vector."""
    model, theta = make_model(dtype=dtype)
    tasks = make_tasks(dtype)
    losses = [
        (flat_loss(model, sx, sy), flat_loss(model, qx, qy)) for sx, sy, qx, qy in zip(*tasks, strict=True)
    ]
    return model, theta, tasks, losses


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _exact_phi(Ls, v, lam):
    # L_s is quadratic: phi* = v - (H + lam I)^-1 grad L_s(v)
    H = hessian(Ls)(v)
    return v - torch.linalg.solve(H + lam * torch.eye(len(v), dtype=v.dtype), grad(Ls)(v)), H


def _newton_cg_phi(Ls, v, lam, cg_steps):
    """One Newton-CG step from theta on the quadratic G = L_s + lam/2 ||phi - theta||^2: d = the k-step CG
    iterate of (H + lam I) d = -grad G(theta), i.e. the Krylov minimiser. On a quadratic it minimises G over
    the Krylov space, so G(phi + d) = G(phi) + g'd / 2 and Armijo (c1 1e-4) accepts the full step t = 1."""
    H = hessian(Ls)(v)
    return v + krylov_minimiser(H + lam * torch.eye(len(v), dtype=v.dtype), -grad(Ls)(v), cg_steps)


# ------------------------------------------------------------------------------------------------ MAML


def test_maml_defaults_are_one_step_of_lr_0p1_without_proximal_term_and_match_the_closed_form():
    model, theta, tasks, losses = problem()
    v = flat(theta)
    res = maml_meta_gradient(model, theta, tasks, loss_fn=mse_loss)
    assert isinstance(res, TaskResults) and res.grad.shape == (T, D + 1) and res.info == {}
    assert res.lam_grad is None
    errs = []
    for t, (Ls, Lq) in enumerate(losses):
        phi = v - 0.1 * grad(Ls)(v)
        ref = (torch.eye(D + 1, dtype=v.dtype) - 0.1 * hessian(Ls)(v)) @ grad(Lq)(phi)
        errs.append(rel(res.grad[t], ref))
        assert abs(res.query_loss[t].item() - Lq(phi).item()) < 1e-12
        assert abs(res.support_loss[t].item() - Ls(phi).item()) < 1e-12
        out = functional_call(model, {"0.weight": phi[:D].reshape(1, D), "0.bias": phi[D:]}, (tasks[2][t],))
        torch.testing.assert_close(res.query_out[t], out, rtol=1e-12, atol=1e-14)
    print(f"MAML one step vs (I - 0.1 H) grad L_q, per task: {[f'{e:.1e}' for e in errs]}")
    assert max(errs) < 1e-13
    # lam 0 by default shows from the second step on (at the first, phi - theta is 0): three steps, with
    # the unrolled loop differentiated by torch.func, and with lam = 1 for contrast
    for lam in (None, 1.0):
        kw = {} if lam is None else {"lam": lam}
        res = maml_meta_gradient(model, theta, tasks, loss_fn=mse_loss, inner_steps=3, **kw)
        for t, (Ls, Lq) in enumerate(losses):

            def unrolled(w, lam=lam or 0.0, Ls=Ls, Lq=Lq):
                phi = w
                for _ in range(3):
                    phi = phi - 0.1 * (grad(Ls)(phi) + lam * (phi - w))
                return Lq(phi)

            assert rel(res.grad[t], grad(unrolled)(v)) < 1e-13, (lam, t)
            if lam:
                assert rel(grad(unrolled)(v), grad(lambda w, u=unrolled: u(w, 0.0))(v)) > 1e-4  # lam shows


def test_maml_first_order_is_grad_l_q_at_the_unrolled_phi():
    model, theta, tasks, losses = problem()
    v = flat(theta)
    res = maml_meta_gradient(
        model, theta, tasks, loss_fn=mse_loss, lam=0.5, inner_steps=3, inner_lr=0.05, first_order=True
    )
    for t, (Ls, Lq) in enumerate(losses):
        phi = v.clone()
        for _ in range(3):
            phi = phi - 0.05 * (grad(Ls)(phi) + 0.5 * (phi - v))
        assert rel(res.grad[t], grad(Lq)(phi)) < 1e-13, t
        assert res.support_loss[t].item() == pytest.approx(Ls(phi).item(), rel=1e-13)


# ---------------------------------------------------------------------------------------------- FOMAML


def test_fomaml_defaults_and_proximal_gd_by_hand():
    model, theta, tasks, losses = problem()
    v = flat(theta)
    # lam 0 by default: one GD step of lr 0.1 ...
    res = fomaml_meta_gradient(model, theta, tasks, loss_fn=mse_loss, solver=GD(steps=1, lr=0.1))
    for t, (Ls, Lq) in enumerate(losses):
        assert rel(res.grad[t], grad(Lq)(v - 0.1 * grad(Ls)(v))) < 1e-13, t
    # ... which shows from the second step on
    res = fomaml_meta_gradient(model, theta, tasks, loss_fn=mse_loss, solver=GD(steps=3, lr=0.1))
    for t, (Ls, Lq) in enumerate(losses):
        phi = v.clone()
        for _ in range(3):
            phi = phi - 0.1 * grad(Ls)(phi)
        assert rel(res.grad[t], grad(Lq)(phi)) < 1e-13, t
    # three steps of lr 0.3 on L_s + 0.5/2 ||phi - theta||^2 (past GD's stability edge on some tasks)
    res = fomaml_meta_gradient(model, theta, tasks, loss_fn=mse_loss, lam=0.5, solver=GD(steps=3, lr=0.3))
    assert set(res.info) == {
        "inner_residual",
        "inner_residual_rel",
        "inner_rose",
        "inner_accepted",
        "inner_iterations",
    }
    assert all(r.dtype == torch.float64 and r.shape == (T,) for r in res.info.values())
    errs, roses = [], []
    for t, (Ls, Lq) in enumerate(losses):
        phi = v.clone()
        G = [Ls(phi).item()]  # the proximal objective along the way
        for _ in range(3):
            phi = phi - 0.3 * (grad(Ls)(phi) + 0.5 * (phi - v))
            G.append(Ls(phi).item() + 0.25 * ((phi - v) ** 2).sum().item())
        errs.append(rel(res.grad[t], grad(Lq)(phi)))
        assert res.support_loss[t].item() == pytest.approx(Ls(phi).item(), rel=1e-13)
        assert res.query_loss[t].item() == pytest.approx(Lq(phi).item(), rel=1e-13)
        # the solve quality it reports: the proximal gradient norm at phi, relative to ||grad L_s(theta)||
        residual = (grad(Ls)(phi) + 0.5 * (phi - v)).norm().item()
        assert res.info["inner_residual"][t].item() == pytest.approx(residual, rel=1e-12)
        assert res.info["inner_residual_rel"][t].item() == pytest.approx(
            residual / grad(Ls)(v).norm().item(), rel=1e-12
        )
        roses.append(any(b > a for a, b in zip(G, G[1:], strict=False)))
        assert res.info["inner_rose"][t].item() == float(roses[-1])
    print(f"FOMAML 3 proximal GD steps vs by hand, per task: {[f'{e:.1e}' for e in errs]}; rose: {roses}")
    assert max(errs) < 1e-13
    assert res.info["inner_accepted"].tolist() == [3.0] * T
    assert res.info["inner_iterations"].tolist() == [3.0] * T


def test_fomaml_inner_iterations_count_the_steps_until_each_tasks_tolerance():
    """GD(tol=0.05) stops a task once ||grad G|| <= 0.05 ||grad G(theta)||: counted by hand, task by task
    (the tasks need different counts, so a task running on after it is done would show)."""
    model, theta, tasks, losses = problem()
    v = flat(theta)
    lam, lr, tol = 1.0, 0.02, 0.05
    res = fomaml_meta_gradient(
        model, theta, tasks, loss_fn=mse_loss, lam=lam, solver=GD(steps=200, lr=lr, tol=tol)
    )
    counts = []
    for t, (Ls, Lq) in enumerate(losses):
        phi = v.clone()
        g0 = grad(Ls)(v).norm()
        k = 0
        while (grad(Ls)(phi) + lam * (phi - v)).norm() > tol * g0:
            phi = phi - lr * (grad(Ls)(phi) + lam * (phi - v))
            k += 1
        counts.append(k)
        assert rel(res.grad[t], grad(Lq)(phi)) < 1e-12, t
    print(f"steps until tol {tol}: {counts}")
    assert len(set(counts)) > 1 and max(counts) < 200
    assert res.info["inner_iterations"].tolist() == [float(c) for c in counts]
    assert res.info["inner_accepted"].tolist() == [float(c) for c in counts]
    assert (res.info["inner_residual_rel"] <= tol).all()
    assert res.info["inner_rose"].tolist() == [0.0] * T  # lr 0.02 is within GD's stability edge: G falls


# -------------------------------------------------------------------------------------------- Hessian-free


@pytest.mark.parametrize("fn", ["imaml", "fomaml"])
def test_hessian_free_inner_solver_takes_3_cg_steps_per_direction_unless_told(fn):
    model, theta, tasks, losses = problem()
    v, lam = flat(theta), 0.5
    call = imaml_meta_gradient if fn == "imaml" else fomaml_meta_gradient
    for cg_steps in (None, 5):
        told = {} if cg_steps is None else {"cg_steps": cg_steps}
        solver = HessianFree(
            steps=1, damping=0.0, adapt_damping=False, **told
        )  # the undamped Newton direction
        res = call(model, theta, tasks, loss_fn=mse_loss, lam=lam, solver=solver)
        # one Newton-CG step is short of the optimum with 3 or 5 CG steps (7 parameters), and each count lands
        # somewhere else: the support loss at phi tells which count ran
        errs = []
        for t, (Ls, Lq) in enumerate(losses):
            phi = _newton_cg_phi(Ls, v, lam, cg_steps or 3)
            errs.append(abs(res.support_loss[t].item() / Ls(phi).item() - 1))
            if fn == "fomaml":
                assert rel(res.grad[t], grad(Lq)(phi)) < 1e-9, (cg_steps, t)
        # float64 CG itself is 5e-11 off the exact Krylov minimiser on task 1 (a textbook CG by hand too)
        print(
            f"HF cg_steps={cg_steps or 3}: support loss vs the Krylov step, per task: "
            f"{[f'{e:.1e}' for e in errs]}"
        )
        assert max(errs) < 1e-9, cg_steps
        assert res.info["inner_accepted"].tolist() == [1.0] * T
    for Ls, _ in losses:  # the check above can tell 3 from 2 and 4, and 5 from 4 and 6
        for count in (3, 5):
            ref = Ls(_newton_cg_phi(Ls, v, lam, count)).item()
            for other in (count - 1, count + 1):
                assert abs(Ls(_newton_cg_phi(Ls, v, lam, other)).item() / ref - 1) > 1e-7, (count, other)


# ------------------------------------------------------------------------------------------------- iMAML


def test_imaml_defaults_gd_armijo_and_5_cg_steps_against_the_krylov_minimiser():
    model, theta, tasks, losses = problem()
    v, lam = flat(theta), 2.0
    refs = []
    for Ls, Lq in losses:
        phi, H = _exact_phi(Ls, v, lam)
        A = torch.eye(D + 1, dtype=v.dtype) + H / lam
        b = grad(Lq)(phi)
        x5, x6 = krylov_minimiser(A, b, 5), krylov_minimiser(A, b, 6)
        assert rel(x5, x6) > 1e-6  # 5 steps are distinguishable from 6
        refs.append((phi, A, b, x5))
    # lr 0.5 is past fixed-step GD's stability edge on these tasks (2 / (max eig H + lam) < 0.5): only the
    # safeguarded solver reaches phi*, and fixed-step GD with the same options does not
    assert all(2.0 / (torch.linalg.eigvalsh(A).max().item() * lam) < 0.5 for _, A, _, _ in refs)
    res = imaml_meta_gradient(
        model, theta, tasks, loss_fn=mse_loss, lam=lam, solver=GDArmijo(steps=300, lr=0.5)
    )
    diverged = imaml_meta_gradient(
        model, theta, tasks, loss_fn=mse_loss, lam=lam, solver=GD(steps=300, lr=0.5)
    )
    errs = [rel(res.grad[t], x5) for t, (_, _, _, x5) in enumerate(refs)]
    print(f"iMAML GDArmijo + CG() vs 5-step Krylov minimiser, per task: {[f'{e:.1e}' for e in errs]}")
    assert max(errs) < 1e-12
    assert not all(rel(diverged.grad[t], x5) < 1e-6 for t, (_, _, _, x5) in enumerate(refs))
    for t, ((Ls, _), (phi, A, b, x5)) in enumerate(zip(losses, refs, strict=True)):
        assert abs(res.support_loss[t].item() - Ls(phi).item()) < 1e-12
        assert res.info["cg_residual"][t].item() == pytest.approx((A @ x5 - b).norm().item(), rel=1e-6)
    # what it logs: these keys, floating (so they average and log), one entry per task, cg_steps the count
    assert set(res.info) == {
        "cg_steps",
        "cg_residual",
        "cg_negative_curvature",
        "inner_residual",
        "inner_residual_rel",
        "inner_rose",
        "inner_accepted",
        "inner_iterations",
    }
    assert all(r.dtype == torch.float64 and r.shape == (T,) for r in res.info.values())
    assert res.info["cg_steps"].tolist() == [5.0] * T and not res.info["cg_negative_curvature"].any()
    assert res.lam_grad is None


def test_imaml_cg_damping_against_a_dense_solve():
    model, theta, tasks, losses = problem()
    v, lam = flat(theta), 2.0
    res = imaml_meta_gradient(
        model,
        theta,
        tasks,
        loss_fn=mse_loss,
        lam=lam,
        solver=GDArmijo(steps=300, lr=0.5),
        cg=CG(steps=D + 1),
        cg_damping=0.5,
    )
    errs = []
    for t, (Ls, Lq) in enumerate(losses):
        phi, H = _exact_phi(Ls, v, lam)
        b = grad(Lq)(phi)
        ref = torch.linalg.solve(1.5 * torch.eye(D + 1, dtype=v.dtype) + H / lam, b)
        errs.append(rel(res.grad[t], ref))
        assert rel(ref, torch.linalg.solve(torch.eye(D + 1, dtype=v.dtype) + H / lam, b)) > 1e-2
    print(f"iMAML damped 0.5 vs dense solve, per task: {[f'{e:.1e}' for e in errs]}")
    assert max(errs) < 1e-11


@pytest.mark.parametrize("how", ["sgd", "torch"])
def test_solver_options_reach_the_solver_sgd_momentum_vs_torch_optim(how):
    model, theta, tasks, losses = problem()
    v, lam, lr, steps = flat(theta), 2.0, 0.05, 4
    if how == "sgd":
        solver = SGD(steps=steps, lr=lr, momentum=0.9)
    else:
        solver = TorchOptimizer(steps=steps, lr=lr, torch_optimizer=torch.optim.SGD, kwargs={"momentum": 0.9})
    # CG to rounding (rtol 1e-13, up to 3 x 7 steps): the dense solve is the reference
    res = imaml_meta_gradient(model, theta, tasks, loss_fn=mse_loss, lam=lam, solver=solver, cg=CG(21, 1e-13))
    # first-order MAML hands the same solver the same problem: grad L_q at that phi
    fo = fomaml_meta_gradient(model, theta, tasks, loss_fn=mse_loss, lam=lam, solver=solver)
    errs = []
    for t, (Ls, Lq) in enumerate(losses):
        p = v.clone().requires_grad_(True)
        opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
        for _ in range(steps):
            opt.zero_grad()
            (Ls(p) + 0.5 * lam * ((p - v) ** 2).sum()).backward()
            opt.step()
        phi = p.detach()
        ref = torch.linalg.solve(torch.eye(D + 1, dtype=v.dtype) + hessian(Ls)(phi) / lam, grad(Lq)(phi))
        errs.append(rel(res.grad[t], ref))
        assert abs(res.support_loss[t].item() - Ls(phi).item()) < 1e-12
        assert rel(fo.grad[t], grad(Lq)(phi)) < 1e-12
    print(
        f"iMAML with {how} momentum 0.9 vs torch.optim.SGD + dense solve, per task: "
        f"{[f'{e:.1e}' for e in errs]}"
    )
    assert max(errs) < 1e-11
    # the momentum shows: without it phi (and the support loss) is elsewhere
    plain = fomaml_meta_gradient(
        model, theta, tasks, loss_fn=mse_loss, lam=lam, solver=SGD(steps=steps, lr=lr)
    )
    assert (plain.support_loss - fo.support_loss).abs().min() > 1e-6


class WithUnused(nn.Module):
    """The linear model plus a parameter that the forward never touches (a frozen-in-practice head, say)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin
        self.unused = nn.Parameter(torch.ones(3, dtype=lin[0].weight.dtype))

    def forward(self, x):
        return self.lin(x)


def _call(method, model, theta, tasks, mode="auto", **kw):
    kw = dict(loss_fn=mse_loss, lam=0.5, mode=mode, **kw)
    if method.startswith("maml"):
        return maml_meta_gradient(
            model, theta, tasks, inner_steps=2, first_order=method.endswith("order"), **kw
        )
    if method == "fomaml":
        return fomaml_meta_gradient(model, theta, tasks, solver=GD(steps=2, lr=0.1), **kw)
    return imaml_meta_gradient(model, theta, tasks, solver=GD(steps=2, lr=0.1), **kw)


@pytest.mark.parametrize("method", ["maml", "maml_first_order", "fomaml", "imaml"])
def test_parameters_the_loss_does_not_use_get_a_zero_meta_gradient(method):
    lin, theta = make_model()
    tasks = make_tasks()
    wrapped = WithUnused(lin)  # not an nn.Sequential: its tasks are batched by vmap
    theta_w = {"lin." + k: v for k, v in theta.items()} | {"unused": wrapped.unused.detach().clone()}
    plain, with_unused = _call(method, lin, theta, tasks), _call(method, wrapped, theta_w, tasks)
    grads = ParamSpec.of(theta_w).unflatten(with_unused.grad)
    assert torch.equal(grads["unused"], torch.zeros(T, 3, dtype=torch.float64))
    used = ParamSpec.of(theta).flatten({k: grads["lin." + k] for k in theta}, batch_dims=1)
    for t in range(T):  # the same up to rounding (CG's dot products now run over 10 entries, not 7)
        assert rel(used[t], plain.grad[t]) < 1e-10, t
    assert plain.grad.abs().min() > 0  # the used ones are not zero


# ------------------------------------------------------------------------------------------- ForwardCast


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
    """Both run the same kernels (mode "vmap"), so the cast run must equal the self-autocasting model's."""
    lin, theta = make_model(dtype=torch.float32)
    tasks = make_tasks(torch.float32)
    ref_model = AutocastItself(lin, dtype)
    theta_ref = {"inner." + k: v for k, v in theta.items()}
    cast = _call(method, lin, theta, tasks, mode="vmap", cast=ForwardCast("cpu", dtype))
    ref = _call(method, ref_model, theta_ref, tasks, mode="vmap")
    full = _call(method, lin, theta, tasks, mode="vmap")
    torch.testing.assert_close(cast.grad, ref.grad, rtol=1e-6, atol=1e-7)
    for name in ("query_loss", "support_loss"):
        a, b, c = (getattr(r, name) for r in (cast, ref, full))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=name)
        # low-precision forwards differ visibly from float32 ones (float32 rounding: ~1e-7)
        assert ((a - c).abs() > 1e-5 * c.abs()).all(), name
    assert cast.query_out.dtype == torch.float32 and cast.grad.dtype == torch.float32
    # task by task (T = 1, mode "loop": F.linear instead of vmap's batched matmul) the same up to the
    # low-precision rounding of another kernel (measured up to 0.4 % in bfloat16; probe_batching allows 4 eps)
    tol = 4 * torch.finfo(dtype).eps
    for t in range(T):
        one = _call(
            method,
            lin,
            theta,
            tuple(x[t : t + 1] for x in tasks),
            mode="loop",
            cast=ForwardCast("cpu", dtype),
        )
        torch.testing.assert_close(one.support_loss[0], cast.support_loss[t], rtol=tol, atol=0)
        torch.testing.assert_close(one.query_loss[0], cast.query_loss[t], rtol=tol, atol=0)


# ------------------------------------------------------------------------------------------------ adapt


def test_adapt_is_the_solver_from_theta_and_detached():
    model, theta = make_model()
    tasks = make_tasks()
    sx, sy = tasks[0], tasks[1]
    v = flat(theta)
    theta_p = dict(model.named_parameters())  # nn.Parameters are fine: phi comes back detached
    phis, info = adapt_tasks(model, theta_p, sx, sy, loss_fn=mse_loss, lam=1.5, solver=GD(steps=4, lr=0.2))
    assert set(phis) == set(theta) and phis["0.weight"].shape == (T, 1, D)
    assert all(not p.requires_grad for p in phis.values()) and info.accepted.shape == (T,)
    for t in range(T):
        Ls = flat_loss(model, sx[t], sy[t])
        phi = v.clone()
        for _ in range(4):
            phi = phi - 0.2 * (grad(Ls)(phi) + 1.5 * (phi - v))
        out, one = adapt(model, theta_p, sx[t], sy[t], loss_fn=mse_loss, lam=1.5, solver=GD(steps=4, lr=0.2))
        assert rel(flat(out), phi) < 1e-12
        assert rel(flat({k: p[t] for k, p in phis.items()}), phi) < 1e-12
        assert all(not p.requires_grad for p in out.values())
        assert one.accepted.dim() == 0 and one.accepted.item() == 4.0 and one.iterations.item() == 4.0
        assert one.residual.item() == pytest.approx(
            (grad(Ls)(phi) + 1.5 * (phi - v)).norm().item(), rel=1e-10
        )
        # Hessian-free: 3 CG steps per Newton direction unless told
        out, _ = adapt(
            model,
            theta,
            sx[t],
            sy[t],
            loss_fn=mse_loss,
            lam=1.5,
            solver=HessianFree(steps=1, damping=0.0, adapt_damping=False),
        )
        assert rel(flat(out), _newton_cg_phi(Ls, v, 1.5, 3)) < 1e-11
    assert all(torch.equal(theta[k], p.detach()) for k, p in theta_p.items())  # theta untouched


def test_make_task_loss_is_the_loss_of_the_model_at_the_given_parameters():
    model, theta = make_model()
    sx, sy, *_ = make_task()
    support = make_task_loss(model, sx, sy, mse_loss)
    v = flat(theta) + 0.3
    p = {"0.weight": v[:D].reshape(1, D), "0.bias": v[D:]}
    assert support(p).item() == pytest.approx(flat_loss(model, sx, sy)(v).item(), rel=1e-14)
    cast = make_task_loss(model.float(), sx.float(), sy.float(), mse_loss, ForwardCast("cpu", torch.bfloat16))
    val = cast({k: t.float() for k, t in p.items()})
    assert val.dtype == torch.float32 and abs(val.item() - support(p).item()) > 1e-5 * support(p).item()


# ---------------------------------------------------------------------------------------------- helpers


def test_loss_for_task_type_and_an_unknown_task_type_names_the_value():
    assert loss_for_task_type("classification") is torch.nn.functional.cross_entropy
    assert loss_for_task_type("regression") is mse_loss
    with pytest.raises(ValueError, match=r"'ranking'"):
        loss_for_task_type("ranking")


def test_inner_diagnostics_relative_residual_and_flags():
    f = torch.tensor
    info = InnerInfo(
        residual=f([0.5, 0.0, 0.3, 0.25]),
        residual0=f([2.0, 0.0, 0.0, 0.5]),
        rose=f([True, False, False, False]),
        accepted=f([7.0, 0.0, 0.0, 2.0]),
        objective=f([1.0, 1.0, 1.0, 1.0]),
        iterations=f([9.0, 0.0, 1.0, 3.0]),
    )
    d = inner_diagnostics(info)
    assert set(d) == {
        "inner_residual",
        "inner_residual_rel",
        "inner_rose",
        "inner_accepted",
        "inner_iterations",
    }
    assert d["inner_residual"].tolist() == [0.5, 0.0, pytest.approx(0.3), 0.25]
    # theta already stationary (||grad L(theta)|| = 0): relative residual 0, not NaN or inf (tasks 1, 2); a
    # residual below 1 over a scale below 1 is still their ratio (task 3)
    assert d["inner_residual_rel"].tolist() == [0.25, 0.0, 0.0, 0.5]
    assert d["inner_rose"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert d["inner_accepted"].tolist() == [7.0, 0.0, 0.0, 2.0]
    assert d["inner_iterations"].tolist() == [9.0, 0.0, 1.0, 3.0]
    assert all(t.dtype == torch.float32 and t.shape == (4,) for t in d.values())
    # 0-d fields (a dict solve of one task), integer counts: floating 0-d results
    d = inner_diagnostics(
        InnerInfo(f(0.5, dtype=torch.float64), f(2.0, dtype=torch.float64), f(False), f(7), f(1.0), f(8))
    )
    assert d["inner_residual_rel"].item() == 0.25 and d["inner_iterations"].item() == 8.0
    assert all(t.dtype == torch.float64 and t.dim() == 0 for t in d.values())


def test_scalar_lam_gradient_against_the_closed_form_and_finite_differences():
    """dF/dlam for one scalar lam, F(lam) = L_q(phi*(lam)), phi*(lam) = v - (H + lam I)^-1 grad L_s(v)."""
    model, theta, tasks, losses = problem()
    v, lam = flat(theta), 2.0
    res = imaml_meta_gradient(
        model,
        theta,
        tasks,
        loss_fn=mse_loss,
        lam=lam,
        solver=GDArmijo(steps=300, lr=0.5),
        cg=CG(steps=D + 1),
        lam_grad=True,
    )
    assert res.lam_grad.shape == (T,)  # a number lam: one entry per task
    for t, (Ls, Lq) in enumerate(losses):

        def F(lam, Ls=Ls, Lq=Lq):
            return Lq(_exact_phi(Ls, v, lam)[0])

        phi, H = _exact_phi(Ls, v, lam)
        y = torch.linalg.solve(H + lam * torch.eye(D + 1, dtype=v.dtype), grad(Lq)(phi))
        exact = -(y @ (phi - v)).item()
        h = 1e-4
        fd = ((F(lam + h) - F(lam - h)) / (2 * h)).item()
        got = res.lam_grad[t].item()
        e_exact, e_fd = abs(got - exact) / abs(exact), abs(got - fd) / abs(fd)
        print(f"task {t}: dF/dlam {got:.6e}: vs -<y, phi - theta> {e_exact:.1e}, vs central FD {e_fd:.1e}")
        assert e_exact < 1e-10 and e_fd < 5e-9


# ------------------------------------------------------------------------- rows = the function task by task


def _assert_rows_equal(batch: TaskResults, rows: list[TaskResults], what):
    for t, one in enumerate(rows):
        assert rel(batch.grad[t], one.grad[0]) < 1e-12, (what, t)
        for name in ("query_loss", "support_loss", "query_out"):
            torch.testing.assert_close(
                getattr(batch, name)[t],
                getattr(one, name)[0],
                rtol=1e-12,
                atol=1e-14,
                msg=f"{what} {name} {t}",
            )
        assert set(batch.info) == set(one.info), what
        for k, val in batch.info.items():
            torch.testing.assert_close(val[t], one.info[k][0], rtol=1e-9, atol=1e-13, msg=f"{what} {k} {t}")
        if one.lam_grad is None:
            assert batch.lam_grad is None, what
        else:
            torch.testing.assert_close(batch.lam_grad[t], one.lam_grad[0], rtol=1e-10, atol=1e-14, msg=what)


CALLS = {
    "imaml_gd_armijo": lambda m, th, tasks, mode: imaml_meta_gradient(
        m,
        th,
        tasks,
        loss_fn=mse_loss,
        lam=2.0,
        solver=GDArmijo(steps=6, lr=0.5),
        cg=CG(3),
        lam_grad=True,
        mode=mode,
    ),
    "imaml_hf_damped": lambda m, th, tasks, mode: imaml_meta_gradient(
        m,
        th,
        tasks,
        loss_fn=mse_loss,
        lam=0.5,
        solver=HessianFree(steps=2, cg_steps=2),
        cg_damping=0.3,
        mode=mode,
    ),
    "imaml_per_parameter_lam": lambda m, th, tasks, mode: imaml_meta_gradient(
        m,
        th,
        tasks,
        loss_fn=mse_loss,
        lam={
            "0.weight": torch.tensor(2.0, dtype=torch.float64),
            "0.bias": torch.tensor(0.5, dtype=torch.float64),
        },
        solver=SGD(steps=3, lr=0.05, momentum=0.9),
        lam_grad=True,
        mode=mode,
    ),
    "maml": lambda m, th, tasks, mode: maml_meta_gradient(
        m, th, tasks, loss_fn=mse_loss, lam=0.5, inner_steps=3, inner_lr=0.1, mode=mode
    ),
    "maml_first_order": lambda m, th, tasks, mode: maml_meta_gradient(
        m, th, tasks, loss_fn=mse_loss, inner_steps=2, first_order=True, mode=mode
    ),
    "fomaml": lambda m, th, tasks, mode: fomaml_meta_gradient(
        m, th, tasks, loss_fn=mse_loss, lam=0.5, solver=GD(steps=3, lr=0.3), mode=mode
    ),
}


@pytest.mark.parametrize("mode", ["native", "vmap", "auto"])
@pytest.mark.parametrize("name", list(CALLS))
def test_every_function_rows_equal_the_function_called_task_by_task(name, mode):
    model, theta, tasks, _ = problem()
    batch = CALLS[name](model, theta, tasks, mode)
    rows = [CALLS[name](model, theta, tuple(x[t : t + 1] for x in tasks), "loop") for t in range(T)]
    _assert_rows_equal(batch, rows, name)
    assert len({tuple(r.grad[0].tolist()) for r in rows}) == T  # unlike tasks: a mixed-up row would show


@pytest.mark.parametrize("mode", ["native", "vmap"])
def test_adapt_tasks_rows_equal_adapt_task_by_task(mode):
    model, theta, tasks, _ = problem()
    sx, sy = tasks[0], tasks[1]
    solver = GDArmijo(steps=5, lr=0.5)
    phis, info = adapt_tasks(model, theta, sx, sy, loss_fn=mse_loss, lam=1.0, solver=solver, mode=mode)
    for t in range(T):
        phi, one = adapt(model, theta, sx[t], sy[t], loss_fn=mse_loss, lam=1.0, solver=solver)
        assert rel(flat({k: p[t] for k, p in phis.items()}), flat(phi)) < 1e-12, t
        for field in InnerInfo._fields:
            torch.testing.assert_close(
                getattr(info, field)[t], getattr(one, field), rtol=1e-9, atol=1e-14, msg=field
            )


def test_adapt_tasks_and_fomaml_take_a_per_parameter_lam():
    """A per-parameter lam (per scalar for the weight, one 0-d value for the bias) reaches the batched solve:
    each task's phi is the one-task dict solve with that lam, and FOMAML's meta-gradient is grad L_q there."""
    model, theta, tasks, losses = problem()
    lam = {
        "0.weight": torch.linspace(0.5, 3.0, D, dtype=torch.float64).reshape(1, D),
        "0.bias": torch.tensor(4.0).double(),
    }
    solver = GD(steps=4, lr=0.05)
    phi, info = adapt_tasks(model, theta, tasks[0], tasks[1], loss_fn=mse_loss, lam=lam, solver=solver)
    fo = fomaml_meta_gradient(model, theta, tasks, loss_fn=mse_loss, lam=lam, solver=solver)
    for t, (_, Lq) in enumerate(losses):
        ref, _ = solver(make_task_loss(model, tasks[0][t], tasks[1][t], mse_loss), theta, lam)
        assert rel(flat({k: v[t] for k, v in phi.items()}), flat(ref)) < 1e-13
        assert rel(fo.grad[t], grad(Lq)(flat(ref))) < 1e-12
    uniform, _ = adapt_tasks(model, theta, tasks[0], tasks[1], loss_fn=mse_loss, lam=2.0, solver=solver)
    assert rel(flat({k: v[0] for k, v in phi.items()}), flat({k: v[0] for k, v in uniform.items()})) > 1e-6


def test_adapt_tasks_runs_the_forward_under_the_cast_it_is_given():
    model, theta, tasks, _ = problem(dtype=torch.float32)
    solver = GD(steps=3, lr=0.1)
    plain, _ = adapt_tasks(model, theta, tasks[0], tasks[1], loss_fn=mse_loss, lam=1.0, solver=solver)
    cast, _ = adapt_tasks(
        model, theta, tasks[0], tasks[1], loss_fn=mse_loss, lam=1.0, solver=solver,
        cast=ForwardCast("cpu", torch.bfloat16),
    )  # fmt: skip
    gap = rel(flat({k: v[0] for k, v in cast.items()}), flat({k: v[0] for k, v in plain.items()}))
    assert 1e-5 < gap < 0.05  # bf16 rounding of the forward: visible, small
