"""Tests of the proximal inner solvers (lightning_imaml.inner): each reaches the optimum of
G(phi) = L(phi) + lam/2 ||phi - theta||^2 on a strongly convex task, the iMAML meta-gradient computed at
their solutions agrees across solvers (it depends only on phi*, not on the path), every solver matches an
independent reference (closed forms, torch.optim step for step, dense solves, its documented rule), and a
batch of T tasks is T independent solves, each with its own early stop.

Constants pinned only to kill mutants (rounding allowances, thresholds) are in test_constants.py."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import rel
from torch.func import functional_call

from lightning_imaml.implicit import implicit_meta_gradient
from lightning_imaml.inner import (
    GD,
    LBFGS,
    SGD,
    SOLVERS,
    Adam,
    GDArmijo,
    HessianFree,
    InnerInfo,
    InnerSolver,
    ProximalProblem,
    TorchOptimizer,
    _two_loop,
    make_solver,
    proximal_adapt,
    proximal_objective,
)
from lightning_imaml.params import ParamSpec

F64 = torch.float64
NAMES = ("gd", "gd_armijo", "sgd", "adam", "torch", "lbfgs", "hf")  # every registered solver
FIXED_STEP = ("gd", "sgd", "adam", "torch")

LAM = 1.0
# (solver name, steps, options, tolerance on ||grad G(phi)||): solvers with line searches / Newton steps go
# to rounding level; Adam's fixed step only gets close (its steps shrink as its 2nd-moment estimate lags)
CASES = [
    # the default: largest step 2.0 is past the stability edge of fixed-step GD here, so backtracking must act
    ("gd_armijo", 50, {"lr": 2.0}, 1e-10),
    ("gd", 200, {"lr": 0.5}, 1e-10),
    ("sgd", 150, {"lr": 0.5, "momentum": 0.5}, 1e-10),
    ("adam", 500, {"lr": 0.02}, 1e-7),
    ("torch", 150, {"lr": 0.5, "torch_optimizer": "sgd", "kwargs": {"momentum": 0.5}}, 1e-10),
    ("lbfgs", 50, {}, 1e-8),
    ("hf", 15, {"cg_steps": 6}, 1e-10),
]


def flat(d):
    return ParamSpec.of(d).flatten(d)


def newton_cg(**options):
    """HessianFree without damping (plain Newton-CG): the solver the Newton-step references below describe."""
    return HessianFree(damping=0.0, adapt_damping=False, **options)


def logistic_task(seed=0, d=5, n=20, m=20):
    g = torch.Generator().manual_seed(seed)
    Xs, Xq = (torch.randn(k, d, generator=g, dtype=F64) for k in (n, m))
    w0 = torch.randn(d, generator=g, dtype=F64)
    ys, yq = ((X @ w0 + 0.5 > 0).double() for X in (Xs, Xq))
    theta = {"w": torch.randn(d, generator=g, dtype=F64), "b": torch.zeros(1, dtype=F64)}

    def loss(X, y):
        # logistic loss written out (softplus is much cheaper than F.binary_cross_entropy_with_logits here)
        def f(p):
            z = X @ p["w"] + p["b"]
            return (F.softplus(z) - y * z).mean()

        return f

    return theta, loss(Xs, ys), loss(Xq, yq)


def logistic_batch(scales, seed=0, d=5, n=20, restrictable=False):
    """T logistic tasks as one batch, task t's loss scaled by scales[t] (its curvature): the per-row loss
    ``[T, d + 1] -> [T]`` for a ProximalProblem, theta ``[T, d + 1]``, and each task alone as
    (dict support loss, dict theta) for a one-task call. ``restrictable``: the loss has ``select(rows)`` (as
    the engine's TaskLoss), so the solvers work on the tasks still solving only, instead of masking."""
    g = torch.Generator().manual_seed(seed)
    T = len(scales)
    X = torch.randn(T, n, d, generator=g, dtype=F64)
    w0 = torch.randn(T, d, generator=g, dtype=F64)
    y = (torch.einsum("tnd,td->tn", X, w0) + 0.5 > 0).double()
    theta = torch.randn(T, d + 1, generator=g, dtype=F64)
    s = torch.tensor(scales, dtype=F64)

    class Rows:
        def __init__(self, tasks):
            self.tasks = tasks

        def __call__(self, phi):
            X_, y_, s_ = X[self.tasks], y[self.tasks], s[self.tasks]
            z = torch.einsum("tnd,td->tn", X_, phi[:, :d]) + phi[:, d:]
            return s_ * (F.softplus(z) - y_ * z).mean(1)

        def select(self, rows):
            return Rows(self.tasks[rows])

    every = torch.arange(T)
    rows = Rows(every) if restrictable else (lambda phi: Rows(every)(phi))

    def one(t):
        def f(p):
            z = X[t] @ p["w"] + p["b"]
            return s[t] * (F.softplus(z) - y[t] * z).mean()

        return f, {"w": theta[t, :d].clone(), "b": theta[t, d:].clone()}

    return rows, theta, [one(t) for t in range(T)]


def grad_G(support, phi, theta, lam):
    """grad G(phi) flattened, by autograd through proximal_objective."""
    p = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    G = proximal_objective(support, p, theta, lam)
    return flat(dict(zip(p, torch.autograd.grad(G, list(p.values())), strict=True)))


def torch_optim_reference(support, theta, lam, steps, cls, **kw):
    """``steps`` steps of a torch.optim class on G = L + lam/2 ||phi - theta||^2, the gradient by autograd."""
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    opt = cls(list(phi.values()), **kw)
    for _ in range(steps):
        opt.zero_grad()
        G = support(phi) + 0.5 * lam * sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
        G.backward()
        opt.step()
    return {k: v.detach() for k, v in phi.items()}


def counted(loss):
    calls = []

    def f(p):
        calls.append(1)
        return loss(p)

    return f, calls


# ------------------------------------------------------------------------------ reaching the optimum


@pytest.fixture(scope="module")
def solutions():
    theta, support, query = logistic_task()
    out = {}
    for name, steps, opts, _ in CASES:
        out[name] = make_solver(name, steps=steps, **opts)(support, theta, LAM)[0]
    return theta, support, query, out


@pytest.mark.parametrize("name,steps,opts,tol", CASES, ids=[s[0] for s in CASES])
def test_each_solver_reaches_proximal_optimum(solutions, name, steps, opts, tol):
    theta, support, _, sols = solutions
    phi = sols[name]
    gn = grad_G(support, phi, theta, LAM).norm().item()
    print(f"{name} ({steps} steps): ||grad G(phi)|| = {gn:.2e} (tol {tol:g})")
    assert gn < tol
    assert all(not v.requires_grad and v.grad_fn is None for v in phi.values())


def test_meta_gradients_agree_across_solvers(solutions):
    theta, support, query, sols = solutions
    grads = {}
    for name, phi in sols.items():
        gq = torch.func.grad(query)(phi)
        grads[name] = flat(implicit_meta_gradient(support, phi, gq, lam=LAM, cg_steps=20).grad)
    errs = {k: rel(v, grads["hf"]) for k, v in grads.items()}
    print("meta-gradient rel. difference to HF's: " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
    assert max(errs.values()) < 1e-5


def test_gd_matches_closed_form_ridge_and_allows_lam_zero():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 3, generator=g, dtype=F64)
    y = torch.randn(30, generator=g, dtype=F64)
    theta = {"w": torch.randn(3, generator=g, dtype=F64)}

    def support(p):
        return 0.5 * ((X @ p["w"] - y) ** 2).mean()

    for lam in (0.0, 0.5):
        phi, _ = GD(steps=400, lr=0.5)(support, theta, lam)
        A = X.T @ X / 30 + lam * torch.eye(3, dtype=F64)
        ref = torch.linalg.solve(A, X.T @ y / 30 + lam * theta["w"])
        err = rel(phi["w"], ref)
        print(f"gd ridge lam={lam}: rel err to closed form {err:.1e}")
        assert err < 1e-10


def test_no_graph_no_side_effects_and_works_under_no_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    theta = dict(model.named_parameters())  # nn.Parameters that require grad

    def support(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    before = {k: v.detach().clone() for k, v in theta.items()}
    for name in NAMES:
        with torch.no_grad():
            phi, info = proximal_adapt(support, theta, 0.5, 5, optimizer=name)
        assert all(not v.requires_grad and v.grad_fn is None for v in phi.values()), name
        assert all(not f.requires_grad for f in info), name
        assert all(torch.isfinite(v).all() for v in phi.values()), name
        assert support(phi) < support(before), name
    assert all(p.grad is None for p in model.parameters())  # the module's .grad untouched
    assert all(torch.equal(before[k], theta[k].detach()) for k in theta)  # theta untouched


class _Unpacked:
    def __init__(self, t, live):
        self.t, self.live = t, live

    def __del__(self):
        self.live[0] -= 1


def test_graph_does_not_grow_with_steps():
    # saved-tensor count of the largest live graph must not depend on the number of steps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    theta = {k: v.detach() for k, v in model.named_parameters()}

    def support(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    def peak_saved(name, steps):
        live, peak = [0], [0]

        def pack(t):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            return _Unpacked(t, live)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u.t):
            proximal_adapt(support, theta, 0.5, steps, optimizer=name)
        return peak[0]

    # not "hf": its create_graph gradient makes the counting hook itself form a C++/Python reference cycle
    # (saved output -> grad_fn -> hook object -> output), so the count would measure the hook, not the solver
    for name in ("gd_armijo", "gd", "sgd", "adam", "torch", "lbfgs"):
        assert peak_saved(name, 2) == peak_saved(name, 10), name


def test_hessian_free_survives_nonconvex_lam_zero():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.linspace(-3, 3, 20, dtype=F64)[:, None]
    y = torch.sin(2 * x)
    theta = {k: v.detach() for k, v in model.named_parameters()}

    def support(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    phi, info = HessianFree(steps=10, cg_steps=5)(support, theta, 0.0)
    assert all(torch.isfinite(v).all() for v in phi.values())
    assert support(phi) < 0.5 * support(theta)
    assert not bool(info.rose)


# -------------------------------------------------------------------------------- against torch.optim


@pytest.mark.parametrize(
    "name,options",
    [
        ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),
        ("adam", {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01}),
        ("adam", {"amsgrad": True}),
    ],
)
def test_sgd_and_adam_equal_torch_optim_step_for_step(name, options):
    """The hand-written batched SGD / Adam against torch.optim's own classes on the same problem, and the
    'torch' solver running those classes."""
    theta, support, _ = logistic_task(seed=3)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
    for steps in (1, 7):
        ref = torch_optim_reference(support, theta, 0.3, steps, cls, lr=0.05, **options)
        mine, _ = proximal_adapt(support, theta, 0.3, steps, optimizer=name, lr=0.05, **options)
        assert rel(flat(mine), flat(ref)) < 1e-13, (name, options, steps)
        wrapped, _ = TorchOptimizer(steps=steps, lr=0.05, torch_optimizer=cls, kwargs=options)(
            support, theta, 0.3
        )
        assert rel(flat(wrapped), flat(ref)) < 1e-13, (name, options, steps)


def test_fixed_step_solver_defaults_are_torch_optims_at_lr_0_1_and_16_steps():
    theta, support, _ = logistic_task(seed=4)
    sgd = torch_optim_reference(support, theta, 0.3, 16, torch.optim.SGD, lr=0.1)
    adam = torch_optim_reference(support, theta, 0.3, 16, torch.optim.Adam, lr=0.1)
    momentum = torch_optim_reference(support, theta, 0.3, 16, torch.optim.SGD, lr=0.1, momentum=0.9)
    runs = {
        "GD()": (GD(), sgd),
        "SGD()": (SGD(), sgd),
        "Adam()": (Adam(), adam),
        "make_solver gd": (make_solver("gd"), sgd),
        "make_solver SGD": (make_solver("SGD"), sgd),
        "make_solver adam": (make_solver("adam"), adam),
        "TorchOptimizer()": (TorchOptimizer(), sgd),
        "TorchOptimizer ADAM": (TorchOptimizer(torch_optimizer="ADAM"), adam),
        "TorchOptimizer Sgd": (TorchOptimizer(torch_optimizer="Sgd", kwargs={"momentum": 0.9}), momentum),
    }
    for what, (solver, ref) in runs.items():
        mine, info = solver(support, theta, 0.3)
        assert isinstance(info, InnerInfo)
        assert rel(flat(mine), flat(ref)) < 1e-13, what  # measured 0 to 1e-16
    # proximal_adapt's lr=None takes the solver's default
    for name, ref in (("gd", sgd), ("sgd", sgd), ("adam", adam), ("torch", sgd)):
        mine, _ = proximal_adapt(support, theta, 0.3, 16, optimizer=name)
        assert rel(flat(mine), flat(ref)) < 1e-13, name


def test_line_search_solver_defaults_are_the_documented_ones():
    """gd_armijo (16 steps, lr 0.1, armijo_c 0.5, backtrack 0.5, grow 2), lbfgs (8 steps, lr 1, history 10,
    c1 1e-4, backtrack 0.5, tolerance_grad 1e-10), hf (5 steps, 3 CG steps, lr 1, c1 1e-4, backtrack 0.5,
    Levenberg-Marquardt damping 1 adapted per task),
    all with tol = atol = 0: a solver without options equals one that spells them out, on problems where
    each option shows: changing any one of them changes the answer (checked, so this test cannot pass by
    insensitivity). The options other than steps are compared at a number of steps where they all show."""
    theta, support, _ = logistic_task(seed=5, d=12, n=16)

    def scaled(c):  # curvature c times the logistic task's: at c = 100, lr 0.1 is rejected and grown again
        return lambda p: c * support(p)

    cases = [
        (GDArmijo, scaled(100.0), 16, 12, {"lr": 0.1, "armijo_c": 0.5, "backtrack": 0.5, "grow": 2.0}, {}),
        (LBFGS, scaled(3.0), 8, 25,
         {"lr": 1.0, "history_size": 10, "c1": 1e-4, "backtrack": 0.5, "tolerance_grad": 1e-10}, {}),
        (HessianFree, scaled(300.0), 5, 5,
         {"cg_steps": 3, "lr": 1.0, "c1": 1e-4, "backtrack": 0.5, "damping": 1.0, "adapt_damping": True},
         {"atol": 20.0}),  # the gradient here is 300x the logistic task's (residual 3.6 after 5 steps)
    ]  # fmt: skip
    other = {"lr": 0.3, "armijo_c": 0.9, "backtrack": 0.2, "grow": 1.0, "history_size": 3, "c1": 0.9,
             "tolerance_grad": 0.05, "cg_steps": 2, "tol": 0.5, "atol": 2.0, "damping": 0.3,
             "adapt_damping": False}  # fmt: skip
    for cls, loss, default_steps, steps, documented, changes in cases:
        default = flat(cls()(loss, theta, 0.1)[0])
        assert torch.equal(default, flat(cls(steps=default_steps)(loss, theta, 0.1)[0])), cls.__name__
        fewer = flat(cls(steps=default_steps - 1)(loss, theta, 0.1)[0])
        assert not torch.equal(fewer, default), f"{cls.__name__}: steps does not show on this problem"
        default = flat(cls(steps=steps)(loss, theta, 0.1)[0])
        documented = {**documented, "tol": 0.0, "atol": 0.0}
        assert torch.equal(default, flat(cls(steps=steps, **documented)(loss, theta, 0.1)[0])), cls.__name__
        for k in documented:
            changed = flat(
                cls(steps=steps, **{**documented, k: {**other, **changes}[k]})(loss, theta, 0.1)[0]
            )
            assert not torch.equal(changed, default), f"{cls.__name__}: {k} does not show on this problem"
    # hf's max_backtracks only shows where more than 10 halvings are needed (see the max_backtracks test,
    # which runs the default); it is documented as 10
    assert HessianFree().max_backtracks == 10


# ------------------------------------------------------------------------------------------- reports


@pytest.mark.parametrize("name", [*NAMES, "torch.optim.RMSprop"])
def test_inner_info_against_an_independent_computation(name):
    """Every solver returns an InnerInfo whose fields match what the test computes itself: ||grad G(phi)||,
    ||grad L(theta)||, G(phi), the steps taken, a rise, the iterations run."""
    theta, support, _ = logistic_task(seed=6)
    lam, steps = 0.7, {"lbfgs": 3, "hf": 2}.get(name, 6)  # still short of rounding level after these

    def run(steps):
        if name == "torch.optim.RMSprop":
            return TorchOptimizer(steps=steps, lr=0.01, torch_optimizer=torch.optim.RMSprop)(
                support, theta, lam
            )
        return make_solver(name, steps=steps)(support, theta, lam)

    def G(phi):
        return support(phi) + 0.5 * lam * ((flat(phi) - flat(theta)) ** 2).sum()

    phi, info = run(steps)
    assert all(f.dim() == 0 for f in info)
    torch.testing.assert_close(info.objective, G(phi), rtol=1e-14, atol=0)
    torch.testing.assert_close(info.residual, grad_G(support, phi, theta, lam).norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(info.residual0, grad_G(support, theta, theta, 0.0).norm(), rtol=1e-14, atol=0)
    assert info.residual < info.residual0
    # rose: G increased between two consecutive iterates (each a prefix of the same deterministic run)
    values = [G(run(k)[0]).item() for k in range(steps + 1)]
    rose = any(b > a + 16 * torch.finfo(F64).eps * abs(a) for a, b in itertools.pairwise(values))
    assert info.rose.dtype == torch.bool and bool(info.rose) == rose, (values, info.rose)
    print(f"{name}: rose={rose}")
    assert info.iterations.item() == steps  # tol = atol = 0: every iteration runs
    if name in (*FIXED_STEP, "torch.optim.RMSprop"):
        assert info.accepted.item() == steps  # fixed-step methods take every step
    else:
        assert 1 <= info.accepted.item() <= steps


@pytest.mark.parametrize("name", ["gd", "sgd", "adam", "torch.optim.SGD"])
def test_inner_info_reports_a_rising_objective(name):
    """lr 3 on a curvature of ~10 (x scaled by 3): fixed-step methods overshoot and G rises, reported."""
    theta, support, _ = logistic_task(seed=6)

    def steep(p):
        return 10.0 * support(p)

    solver = (
        TorchOptimizer(steps=4, lr=3.0, torch_optimizer=torch.optim.SGD)
        if name == "torch.optim.SGD"
        else make_solver(name, steps=4, lr=3.0)
    )
    _, info = solver(steep, theta, 0.1)
    assert bool(info.rose)
    # the rise, independently: G along the run (each k-step run a prefix of the 4-step one)
    prefixes = [dataclasses.replace(solver, steps=k)(steep, theta, 0.1)[0] for k in range(5)]
    values = [proximal_objective(steep, phi, theta, 0.1) for phi in prefixes]
    assert any(b > a for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("name", [*FIXED_STEP, "gd_armijo", "lbfgs"])
def test_gradient_solvers_spend_steps_plus_one_evaluations(name):
    """One gradient per step (gd_armijo, lbfgs: one per trial, rejected trials included), one more: at
    theta or for the report at the last iterate. Without early stopping that is always steps + 1."""
    theta, support, _ = logistic_task(seed=7)
    for steps in (0, 1, 5):
        f, calls = counted(support)
        _, info = make_solver(name, steps=steps)(f, theta, 0.5)
        assert len(calls) == steps + 1, (name, steps, len(calls))
        assert info.iterations.item() == steps


@pytest.mark.parametrize("name", NAMES)
def test_zero_steps_return_theta_and_a_report_at_theta(name):
    theta, support, _ = logistic_task(seed=8)
    phi, info = proximal_adapt(support, theta, 0.5, 0, optimizer=name)
    assert torch.equal(flat(phi), flat(theta))
    g0 = grad_G(support, theta, theta, 0.5).norm()
    torch.testing.assert_close(info.residual, g0, rtol=1e-14, atol=0)
    torch.testing.assert_close(info.residual0, g0, rtol=1e-14, atol=0)
    torch.testing.assert_close(info.objective, support(theta), rtol=1e-14, atol=0)
    assert info.accepted.item() == 0 and info.iterations.item() == 0
    assert info.rose.dtype == torch.bool and not bool(info.rose)


# ------------------------------------------------------------------------------ early stopping (tol, atol)

# per solver: options, steps, and a tol reached within them
EARLY = {
    "gd": ({"lr": 0.5}, 40, 1e-3),
    "gd_armijo": ({"lr": 2.0}, 40, 1e-3),
    "sgd": ({"lr": 0.5, "momentum": 0.5}, 40, 1e-3),
    "adam": ({"lr": 0.05}, 60, 1e-1),
    "torch": ({"lr": 0.02, "torch_optimizer": torch.optim.RMSprop}, 60, 1e-1),
    "lbfgs": ({}, 20, 1e-4),
    "hf": ({"cg_steps": 3}, 12, 1e-4),
}


def exact_residuals(name, support, theta, lam):
    """phi_k and ||grad G(phi_k)|| (independently, by autograd) of the tol = 0 runs of k = 0 .. steps."""
    opts, steps, _ = EARLY[name]
    phis = [make_solver(name, steps=k, **opts)(support, theta, lam)[0] for k in range(steps + 1)]
    return phis, [grad_G(support, p, theta, lam).norm().item() for p in phis]


@pytest.mark.parametrize("name", NAMES)
def test_tol_and_atol_stop_at_the_first_step_meeting_the_threshold(name):
    """A task stops once ||grad G|| <= max(atol, tol * residual0): the early-stopped run is the exact run cut
    at the first k whose residual meets the threshold (iterations = k), its residual meets it, and either of
    tol, atol can be the larger one."""
    theta, support, _ = logistic_task(seed=9)
    lam = 0.5
    opts, steps, tol = EARLY[name]
    phis, res = exact_residuals(name, support, theta, lam)
    threshold = tol * res[0]
    k = next(i for i, r in enumerate(res) if r <= threshold)
    print(f"{name}: threshold {threshold:.2e} first met at step {k} of {steps}: {res[k]:.2e}")
    assert 2 <= k < steps  # the cut is inside the run, so stopping late or early would show
    for stop in ({"tol": tol}, {"atol": threshold}, {"tol": tol, "atol": threshold},
                 {"tol": tol, "atol": 1e-3 * threshold}, {"tol": 1e-3 * tol, "atol": threshold}):  # fmt: skip
        phi, info = make_solver(name, steps=steps, **opts, **stop)(support, theta, lam)
        assert info.iterations.item() == k, (stop, info.iterations)
        assert torch.equal(flat(phi), flat(phis[k])), stop
        residual = grad_G(support, phi, theta, lam).norm()
        torch.testing.assert_close(info.residual, residual, rtol=1e-12, atol=0)
        assert residual <= threshold * (1 + 1e-12)
    # inclusive: a threshold equal to the residual the k-step run reports (the solver's number) stops there
    info_k = make_solver(name, steps=k, **opts)(support, theta, lam)[1]
    _, info = make_solver(name, steps=steps, **opts, atol=info_k.residual.item())(support, theta, lam)
    assert info.iterations.item() == k
    # the threshold is checked at theta too: met there (inclusive), no step at all
    phi, info = make_solver(name, steps=steps, **opts, atol=info_k.residual0.item())(support, theta, lam)
    assert info.iterations.item() == 0 and info.accepted.item() == 0 and torch.equal(flat(phi), flat(theta))


# per solver: steps and a tol that every task of logistic_batch((0.5, 2.0, 4.0)) meets within them
BATCH = {"gd": (40, 1e-3), "gd_armijo": (30, 1e-3), "sgd": (40, 1e-3), "adam": (100, 1e-2),
         "torch": (40, 1e-1), "lbfgs": (20, 1e-4), "hf": (10, 1e-4)}  # fmt: skip


@pytest.mark.parametrize("lam_kind", ["number", "per-parameter"])
@pytest.mark.parametrize("early", ["tol0", "tol", "tol-restricted"])
@pytest.mark.parametrize("name", NAMES)
def test_a_batch_is_independent_one_task_solves(name, early, lam_kind):
    """solve() on a ProximalProblem of T tasks equals T separate one-task calls, row by row and report by
    report (float64). With a tolerance every task stops on its own: tasks of different curvature stop at
    different iterations, each where it would stop alone; with tol = atol = 0 every task runs every step.
    "tol-restricted": the loss can be restricted to the tasks still solving (``select``), so the solver
    computes on those rows only and writes them back into the batch."""
    scales = (0.5, 2.0, 4.0)
    rows, theta, tasks = logistic_batch(scales, seed=10, restrictable=early == "tol-restricted")
    early = early != "tol0"
    steps, tol = BATCH[name]
    tol = tol if early else 0.0
    solver = make_solver(name, steps=steps, tol=tol, **EARLY[name][0])
    if lam_kind == "number":
        lam, lam_dict = 0.5, 0.5
    else:
        lam = torch.linspace(0.2, 1.0, theta.shape[1], dtype=F64)
        lam_dict = {"w": lam[:-1], "b": lam[-1]}  # per scalar for w, one 0-d value for b
    phi, info = solver.solve(ProximalProblem(rows, theta, lam))
    assert phi.shape == theta.shape and all(f.shape == (len(scales),) for f in info)
    for t, (support, theta_t) in enumerate(tasks):
        phi_t, info_t = solver(support, theta_t, lam_dict)
        torch.testing.assert_close(phi[t], flat(phi_t), rtol=1e-12, atol=1e-14)
        assert info.iterations[t] == info_t.iterations and info.accepted[t] == info_t.accepted, t
        assert info.rose[t] == info_t.rose, t
        for field in ("residual", "residual0", "objective"):
            torch.testing.assert_close(
                getattr(info, field)[t], getattr(info_t, field), rtol=1e-10, atol=1e-12
            )
    print(f"{name} tol={tol}: iterations {info.iterations.tolist()}")
    if early:
        # cut at the middle task's stopping step: the run then ends with some tasks done and the others
        # still moving (each solver's last-step bookkeeping on a part of the batch)
        cut = int(sorted(info.iterations.tolist())[1])
        short = dataclasses.replace(solver, steps=cut)
        phi_c, info_c = short.solve(ProximalProblem(rows, theta, lam))
        for t, (support, theta_t) in enumerate(tasks):
            phi_t, info_t = short(support, theta_t, lam_dict)
            torch.testing.assert_close(phi_c[t], flat(phi_t), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(info_c.residual[t], info_t.residual, rtol=1e-10, atol=1e-12)
            assert info_c.iterations[t] == info_t.iterations and info_c.accepted[t] == info_t.accepted, t
        assert len(set(info.iterations.tolist())) > 1  # different tasks, different stopping steps
        assert bool((info.iterations < steps).all())
        assert bool((info.residual <= tol * info.residual0).all())
    else:
        assert info.iterations.tolist() == [steps] * len(scales)


@pytest.mark.parametrize("steps", [13, 40])
def test_hessian_free_batch_with_a_straggler_equals_one_task_solves(steps):
    """HF with 1 CG step per direction on a restrictable batch: two tasks stop at iteration 8, the third at
    13, so the last five iterations run on that task's row alone (its own damping mu, written back into the
    batch); with steps = 13 the run ends on that row's step (the report of G and grad G on part of the
    batch). Each row as its one-task solve."""
    rows, theta, tasks = logistic_batch((0.5, 2.0, 4.0), seed=10, restrictable=True)
    solver = HessianFree(steps=steps, tol=1e-4, cg_steps=1)
    phi, info = solver.solve(ProximalProblem(rows, theta, 0.5))
    assert info.iterations.tolist() == [8, 8, 13]
    for t, (support, theta_t) in enumerate(tasks):
        phi_t, info_t = solver(support, theta_t, 0.5)
        torch.testing.assert_close(phi[t], flat(phi_t), rtol=1e-12, atol=1e-14)
        for field in ("residual", "objective"):
            torch.testing.assert_close(
                getattr(info, field)[t], getattr(info_t, field), rtol=1e-10, atol=1e-12
            )


def test_hessian_free_marks_a_task_that_cannot_move_done():
    """A task whose G is infinite anywhere but at theta cannot move (every trial step is rejected): HF stops
    it after its first iteration, at theta with no accepted step, while the other task of the batch goes on
    to its minimum."""
    theta = torch.tensor([[1.0, -2.0], [0.5, 0.3]], dtype=F64)
    A = torch.tensor([[3.0, 0.5], [0.5, 1.0]], dtype=F64)

    class Loss:
        def __init__(self, tasks):
            self.tasks = tasks

        def __call__(self, phi):
            quad = 0.5 * torch.einsum("tp,pq,tq->t", phi, A, phi) + phi.sum(1)
            stuck = (self.tasks == 1) & (phi != theta[self.tasks]).any(1)
            return torch.where(stuck, torch.inf, quad)

        def select(self, rows):
            return Loss(self.tasks[rows])

    phi, info = HessianFree(steps=40, tol=1e-10).solve(ProximalProblem(Loss(torch.arange(2)), theta, 0.5))
    assert info.iterations.tolist() == [info.iterations[0].item(), 1] and info.iterations[0] > 2
    assert info.accepted[1] == 0 and torch.equal(phi[1], theta[1])
    ref = torch.linalg.solve(A + 0.5 * torch.eye(2, dtype=F64), 0.5 * theta[0] - 1)  # the quadratic's minimum
    torch.testing.assert_close(phi[0], ref, rtol=1e-9, atol=1e-12)


def test_a_float64_lam_does_not_widen_a_float32_problem():
    """lam is used in theta's dtype: a float64 per-parameter lam on a float32 problem gives float32 phi and
    the numbers of the same lam in float32."""
    rows, theta, _ = logistic_batch((0.5, 2.0), seed=3)
    theta32 = theta.float()
    lam = torch.linspace(0.2, 1.0, theta.shape[1], dtype=F64)
    solver = GDArmijo(steps=5)
    phi64, info64 = solver.solve(ProximalProblem(lambda p: rows(p.double()).float(), theta32, lam))
    phi32, info32 = solver.solve(ProximalProblem(lambda p: rows(p.double()).float(), theta32, lam.float()))
    assert phi64.dtype == torch.float32 and info64.objective.dtype == torch.float32
    assert torch.equal(phi64, phi32) and torch.equal(info64.objective, info32.objective)


def test_torch_optimizer_rmsprop_equals_torch_optim_and_treats_tasks_independently():
    """TorchOptimizer(RMSprop) on a batch: row t equals a hand-rolled torch.optim.RMSprop loop on task t
    alone. Adafactor scales its step by the RMS of the whole parameter tensor, so it shows what a parameter
    tensor is: each task's row (all its parameters flattened), never the stacked [T, P] batch."""
    rows, theta, tasks = logistic_batch((0.5, 3.0, 12.0), seed=11)
    lam, steps = 0.4, 9
    for cls, kwargs in ((torch.optim.RMSprop, {"alpha": 0.9, "momentum": 0.5}), (torch.optim.Adafactor, {})):
        solver = TorchOptimizer(steps=steps, lr=0.01, torch_optimizer=cls, kwargs=kwargs)
        phi, info = solver.solve(ProximalProblem(rows, theta, lam))
        assert info.iterations.tolist() == [steps] * 3 and info.accepted.tolist() == [steps] * 3
        for t, (support, theta_t) in enumerate(tasks):
            if cls is torch.optim.RMSprop:  # elementwise: the task's own parameter tensors
                ref = flat(torch_optim_reference(support, theta_t, lam, steps, cls, lr=0.01, **kwargs))
            else:  # per tensor: the task's row is the tensor
                spec = ParamSpec.of(theta_t)
                ref = torch_optim_reference(
                    lambda p, spec=spec, support=support: support(spec.unflatten(p["row"])),
                    {"row": flat(theta_t)}, lam, steps, cls, lr=0.01, **kwargs,
                )["row"]  # fmt: skip
            assert rel(phi[t], ref) < 1e-13, (cls.__name__, t)
        if cls is torch.optim.Adafactor:
            stacked = torch_optim_reference(
                lambda p: rows(p["phi"]).sum(), {"phi": theta}, lam, steps, cls, lr=0.01, **kwargs
            )["phi"]
            assert rel(phi, stacked) > 1e-6  # coupling the tasks would have shown


# --------------------------------------------------------------------------------- registry and errors


def test_solvers_registry_is_derived_from_the_classes(monkeypatch):
    classes = (GD, GDArmijo, SGD, Adam, TorchOptimizer, LBFGS, HessianFree)
    assert {cls.name: cls for cls in classes} == {k: SOLVERS[k] for k in NAMES}
    assert all(cls.name == key for key, cls in SOLVERS.items())  # every entry under its class's own name
    for cls in classes:
        assert make_solver(cls.name) == cls() and type(make_solver(cls.name.upper())) is cls
    monkeypatch.setitem(SOLVERS, "halfgd", None)  # restored (removed) after the test

    @dataclasses.dataclass(frozen=True)
    class HalfGD(GD):
        """GD at half the step: a new solver is one class with a name."""

        name = "halfgd"
        shrink: float = 0.5

        def solve(self, problem):
            return GD(steps=self.steps, lr=self.lr * self.shrink, tol=self.tol, atol=self.atol).solve(problem)

    @dataclasses.dataclass(frozen=True)
    class Unnamed(InnerSolver):  # no name: a base for others, not registered
        pass

    assert SOLVERS["halfgd"] is HalfGD and Unnamed not in SOLVERS.values()
    theta, support, _ = logistic_task(seed=12)
    solver = make_solver("halfgd", steps=5, lr=0.2, shrink=0.25)
    assert solver == HalfGD(steps=5, lr=0.2, shrink=0.25)
    ref = torch_optim_reference(support, theta, 0.5, 5, torch.optim.SGD, lr=0.05)
    phi, _ = proximal_adapt(support, theta, 0.5, 5, optimizer="halfgd", lr=0.2, shrink=0.25)
    assert rel(flat(phi), flat(ref)) < 1e-13
    with pytest.raises(ValueError, match=r"momentum"):
        make_solver("halfgd", momentum=0.9)


def test_make_solver_passes_objects_through_and_names_what_is_wrong():
    solver = HessianFree(steps=2)
    assert make_solver(solver) is solver
    with pytest.raises(ValueError, match=r"steps"):
        make_solver(solver, steps=3)
    with pytest.raises(ValueError, match=r"'rmsprop'"):
        make_solver("rmsprop")
    with pytest.raises(ValueError, match=r"betas"):
        make_solver("sgd", betas=(0.9, 0.9))
    with pytest.raises(ValueError, match=r"momentum"):
        make_solver("gd", momentum=0.9)
    with pytest.raises(ValueError, match=r"hf_cg_steps"):  # the old name of hf's option is gone
        make_solver("hf", hf_cg_steps=3)
    with pytest.raises(ValueError, match=r"SGD"):  # a torch.optim class is not a solver name
        make_solver(torch.optim.SGD)


def test_bad_inputs():
    theta = {"w": torch.ones(2)}

    def support(p):
        return (p["w"] ** 2).sum()

    with pytest.raises(ValueError, match=r"'rmsprop'"):
        proximal_adapt(support, theta, 1.0, 3, optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"'nadam'"):
        TorchOptimizer(torch_optimizer="nadam")
    with pytest.raises(ValueError, match=r"LBFGS"):
        TorchOptimizer(torch_optimizer=torch.optim.LBFGS)
    with pytest.raises(ValueError, match=r"lam"):
        proximal_adapt(support, theta, -1.0, 3)
    with pytest.raises(ValueError, match=r"steps"):
        proximal_adapt(support, theta, 1.0, -1)
    for cls in (LBFGS, HessianFree):  # Armijo's line search: both in (0, 1), named with the bad value
        for bad in ({"c1": 0.0}, {"c1": 1.0}, {"backtrack": 0.0}, {"backtrack": 1.0}, {"c1": float("nan")}):
            ((key, value),) = bad.items()
            with pytest.raises(ValueError, match=rf"{key}={value!r}"):
                cls(**bad)
        cls(c1=0.999, backtrack=1e-3)  # just inside
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"cg_steps"):
            HessianFree(cg_steps=bad)
        with pytest.raises(ValueError, match=r"max_backtracks"):
            HessianFree(max_backtracks=bad)
        with pytest.raises(ValueError, match=r"history_size"):
            LBFGS(history_size=bad)
    with pytest.raises(ValueError, match=r"tol=-0\.1"):
        GD(tol=-0.1)
    with pytest.raises(ValueError, match=r"atol=-1"):
        GD(atol=-1.0)
    # any torch.optim class works: (w^2).sum() + 1/2 ||w - 1||^2 has its minimum at w = 1/3
    phi, _ = TorchOptimizer(steps=50, lr=0.05, torch_optimizer=torch.optim.RMSprop)(support, theta, 1.0)
    assert torch.allclose(phi["w"], torch.full((2,), 1 / 3), atol=1e-6)


def test_input_checks_name_the_bad_value():
    theta = {"w": torch.ones(2), "b": torch.zeros(1)}

    def support(p):
        return (p["w"] ** 2).sum() + p["b"].sum()

    def raises(pattern, **kw):
        with pytest.raises(ValueError, match=pattern):
            proximal_adapt(**{"support_loss": support, "theta": theta, "lam": 1.0, "steps": 2, **kw})

    raises(r"theta", theta={})
    raises(r"theta.*list", theta=[torch.ones(2)])
    raises(r"steps.*2\.5", steps=2.5)
    raises(r"steps.*True", steps=True)
    raises(r"missing \['b'\].*unknown \['v'\]", lam={"w": torch.tensor(1.0), "v": torch.tensor(1.0)})
    raises(r"lam\['w'\]", lam={"w": torch.ones(3), "b": torch.tensor(1.0)})
    raises(r"lam", lam={"w": torch.tensor(float("inf")), "b": torch.tensor(1.0)})
    raises(r"lam", lam={"w": torch.tensor(-1.0), "b": torch.tensor(1.0)})
    raises(r"lam", lam=float("nan"))
    raises(r"lr.*0\.0", optimizer="gd", lr=0.0)
    raises(r"SGD", optimizer=torch.optim.SGD)  # a class is not a solver name
    raises(r"momentum", optimizer="gd", momentum=0.9)
    raises(r"betas", optimizer="SGD", betas=(0.9, 0.9))
    raises(r"nesterov", optimizer="sgd", nesterov=True)
    # lam = 0 per parameter is allowed (no proximal pull on that tensor): w <- 0.8 w, b <- b - 0.1 (1 + b)
    phi, _ = proximal_adapt(
        support, theta, {"w": torch.tensor(0.0), "b": torch.tensor(1.0)}, 2, optimizer="gd"
    )
    torch.testing.assert_close(phi["w"], torch.full((2,), 0.64), rtol=1e-6, atol=0)
    torch.testing.assert_close(phi["b"], torch.tensor([-0.19]), rtol=1e-6, atol=0)


def test_proximal_problem_input_errors():
    def rows(phi):
        return (phi**2).sum(1)

    theta = torch.zeros(3, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"theta.*\(4,\)"):
        ProximalProblem(rows, theta[0], 1.0)
    with pytest.raises(ValueError, match=r"theta.*\(1, 3, 4\)"):
        ProximalProblem(rows, theta[None], 1.0)
    with pytest.raises(ValueError, match=r"lam must be a number or a \[P\] tensor, P = 4; got \(5,\)"):
        ProximalProblem(rows, theta, torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match=r"lam.*\(3, 4\)"):
        ProximalProblem(rows, theta, torch.ones(3, 4, dtype=F64))
    with pytest.raises(ValueError, match=r"lam=-0\.5"):
        ProximalProblem(rows, theta, -0.5)
    with pytest.raises(ValueError, match=r"lam=inf"):
        ProximalProblem(rows, theta, float("inf"))
    with pytest.raises(ValueError, match=r"lam"):
        ProximalProblem(rows, theta, torch.tensor([1.0, 0.0, -1e-3, 1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"lam"):
        ProximalProblem(rows, theta, torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=F64))
    # lam = 0 (everywhere or in places) is allowed
    ProximalProblem(rows, theta, 0.0)
    ProximalProblem(rows, theta, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64))


def test_proximal_objective_with_a_number_and_a_per_parameter_lam_by_hand():
    """G = L + 1/2 sum_i lam_i (phi_i - theta_i)^2, exact in binary: L = 1, phi - theta = (1, 2 | 3)."""
    theta = {"w": torch.tensor([0.5, -1.0], dtype=F64), "b": torch.tensor([2.0], dtype=F64)}
    phi = {"w": theta["w"] + torch.tensor([1.0, 2.0], dtype=F64), "b": theta["b"] + 3.0}

    def one(p):
        return torch.tensor(1.0, dtype=F64)

    assert proximal_objective(one, phi, theta, 0.5).item() == 1 + 0.25 * (1 + 4 + 9)
    assert proximal_objective(one, phi, theta, 0.0).item() == 1.0
    per = {"w": torch.tensor([2.0, 0.5], dtype=F64), "b": torch.tensor(4.0, dtype=F64)}  # per scalar / tensor
    assert proximal_objective(one, phi, theta, per).item() == 1 + 0.5 * (2 * 1 + 0.5 * 4 + 4 * 9)


def test_a_solver_call_defaults_to_lam_0_and_names_theta_in_layout_errors():
    theta = {"w": torch.tensor([1.0, -2.0], dtype=F64)}

    def support(p):
        return ((p["w"] - 3.0) ** 2).sum()

    solver = GD(steps=3, lr=0.1)
    default, _ = solver(support, theta)
    assert torch.equal(default["w"], solver(support, theta, 0.0)[0]["w"])
    assert not torch.equal(default["w"], solver(support, theta, 1.0)[0]["w"])
    with pytest.raises(ValueError, match=r"keys of theta: missing \['w'\]"):
        solver(support, theta, {"v": torch.tensor(1.0, dtype=F64)})


def test_torch_optimizer_takes_class_paths_and_says_what_it_accepts():
    assert TorchOptimizer(torch_optimizer="torch.optim.RMSprop").torch_optimizer is torch.optim.RMSprop
    assert TorchOptimizer(torch_optimizer="torch.optim.Adagrad").torch_optimizer is torch.optim.Adagrad
    assert TorchOptimizer(torch_optimizer="SGD").torch_optimizer is torch.optim.SGD
    for bad in ("torch.optim.NoSuchThing", "torch.nn.Linear", "nadam"):
        accepted = r"such as 'torch.optim.RMSprop', or a torch.optim.Optimizer subclass"
        with pytest.raises(ValueError, match=rf"unknown torch_optimizer '{bad}'.*{accepted}"):
            TorchOptimizer(torch_optimizer=bad)
    for lbfgs in (torch.optim.LBFGS, "torch.optim.LBFGS"):
        with pytest.raises(
            ValueError, match=r"torch_optimizer=LBFGS couples all parameters.*use the 'lbfgs' solver"
        ):
            TorchOptimizer(torch_optimizer=lbfgs)


def test_hessian_free_option_checks():
    HessianFree(max_backtracks=1, cg_steps=1)  # the smallest valid counts
    HessianFree(damping=0.0, adapt_damping=False)  # plain Newton-CG
    for bad in ({"damping": -1.0, "adapt_damping": False}, {"damping": 0.0, "adapt_damping": True},
                {"damping": float("nan")}):  # fmt: skip
        with pytest.raises(
            ValueError, match=rf"damping must be >= 0 \(> 0 to adapt it\), got damping={bad['damping']!r}"
        ):
            HessianFree(**bad)
    with pytest.raises(
        ValueError, match=r"curvature must be 'hessian' or 'gauss_newton', got curvature='fisher'"
    ):
        HessianFree(curvature="fisher")


def test_sgd_nesterov_needs_momentum_and_no_dampening_as_torch_optim():
    for opts in ({"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.1}):
        with pytest.raises(ValueError):  # the ground truth: torch.optim.SGD refuses the same options
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, nesterov=True, **opts)
        with pytest.raises(ValueError, match=r"nesterov"):
            SGD(nesterov=True, **opts)
    SGD(nesterov=True, momentum=0.9)  # allowed, as torch.optim.SGD


# ------------------------------------------------------------------------- iMAML-HF: every branch


def test_hessian_free_stops_once_the_gradient_is_below_atol():
    """||grad G|| after 1, 2, 3 Newton-CG steps here: 7.0e-2, 2.8e-3, 1.3e-5; with atol = 1e-3 (the old
    gtol) the solve must stop after the third step."""
    theta, support, _ = logistic_task(seed=5, d=12, n=16)
    phis = [newton_cg(steps=k)(support, theta, 0.1)[0] for k in (1, 2, 3)]
    norms = [grad_G(support, p, theta, 0.1).norm().item() for p in phis]
    assert norms[0] > norms[1] > 1e-3 > norms[2]
    phi, info = newton_cg(steps=6, atol=1e-3)(support, theta, 0.1)
    assert info.accepted.item() == 3 and info.iterations.item() == 3
    assert torch.equal(flat(phi), flat(phis[2]))


def test_hessian_free_backtracks_at_most_max_backtracks_times():
    """10 log cosh from w = 5, lam = 0: the Newton step is -sinh(5) cosh(5) = -5506.6 (the factor 10 puts the
    curvature, 1.8e-3, above CG's truncation threshold 3.45e-4); t = 1 .. 2^-9 all land where G is above
    G(5) = 43.1, t = 2^-10 is the first that decreases G (w = -0.38). So the default 10 trials find nothing
    (the task stops there), 11 trials take that step. Evaluations are counted too: a stopped task does not
    try again, and the search stops at the first accepted trial."""
    theta = {"w": torch.tensor([5.0], dtype=F64)}

    def support(p):
        return 10 * torch.log(torch.cosh(p["w"])).sum()

    f, calls = counted(support)
    phi, info = newton_cg(steps=3)(f, theta, 0.0)
    assert info.accepted.item() == 0 and torch.equal(phi["w"], theta["w"])
    assert info.iterations.item() == 1  # the task is done after the failed search
    # the gradient (and H) at theta, 10 trials; then stop, the report is the gradient at theta
    assert len(calls) == 1 + 10
    f, calls = counted(support)
    phi, info = newton_cg(steps=1, max_backtracks=11)(f, theta, 0.0)
    assert info.accepted.item() == 1 and len(calls) == 1 + 11 + 1  # ... + the report's gradient
    expected = 5.0 - math.sinh(5.0) * math.cosh(5.0) / 1024
    err = abs(phi["w"].item() - expected) / abs(expected)
    print(
        f"HF step after 10 halvings: {phi['w'].item():.12f}, closed form {expected:.12f}, rel err {err:.1e}"
    )
    assert err < 1e-9  # measured 2.3e-11: 1 - tanh(5)^2, the curvature, loses ~1e-12 to cancellation


def test_hessian_free_at_a_stationary_theta_takes_no_step():
    target = torch.tensor([1.0, -2.0], dtype=F64)
    theta = {"w": target.clone()}

    def support(p):
        return ((p["w"] - target) ** 2).sum()  # gradient exactly 0 at theta

    f, calls = counted(support)
    phi, info = newton_cg(steps=3)(f, theta, 0.5)
    assert info.accepted.item() == 0 and info.residual0.item() == 0 and torch.equal(phi["w"], target)
    assert info.iterations.item() == 0
    assert len(calls) == 1  # the gradient at theta, which is also the report's


class _SquareWithSkewHessian(torch.autograd.Function):
    """||w||^2 with its true gradient 2 w, but a gradient graph whose derivative is a matrix C of our choice
    (C v is what autograd's Hessian-vector product returns): a loss for which HF's CG, which assumes a
    symmetric Hessian, can return a direction that is not a descent direction."""

    @staticmethod
    def forward(ctx, w, C):
        ctx.save_for_backward(w, C)
        return (w * w).sum()

    @staticmethod
    def backward(ctx, grad_out):
        w, C = ctx.saved_tensors
        u = w.detach()
        return grad_out * (2 * u + (w - u) @ C), None  # value 2 w; d/dw of it: C^T, so H v = C v


def test_hessian_free_falls_back_to_steepest_descent_without_a_descent_direction():
    """CG from zero returns a descent direction for any symmetric H; where it does not (g'd >= 0), HF must
    take -g instead. Forced through the public seam, the loss: G = ||w||^2 (lam 0) from theta = (1, 2) with
    the skew 'Hessian' C = [[1, 0], [2, 1]], for which 5 CG steps return d = (-29.9, 15.9), g'd = +3.7
    (checked below with the public CG). With -g = -2 theta, t = 1 reaches -theta, where G is unchanged:
    rejected; t = 1/2 lands on the minimum 0 exactly. Along d no trial could land there."""
    from lightning_imaml.cg import batched_conjugate_gradient

    C = torch.tensor([[1.0, 0.0], [2.0, 1.0]], dtype=F64)
    theta = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    g = 2 * theta["w"]
    d, _ = batched_conjugate_gradient(lambda v: v @ C.T, -g[None], 5, rtol=1e-12)
    assert float(g @ d[0]) > 1.0  # an ascent direction
    # the loss's Hessian-vector product is C v, as HF sees it
    from lightning_imaml.implicit import hessian_vector_product

    v = {"w": torch.tensor([0.3, -0.7], dtype=F64)}
    hv = hessian_vector_product(lambda p: _SquareWithSkewHessian.apply(p["w"], C), theta, v)
    torch.testing.assert_close(hv["w"], C @ v["w"], rtol=1e-15, atol=0)
    phi, info = newton_cg(steps=1, cg_steps=5)(lambda p: _SquareWithSkewHessian.apply(p["w"], C), theta, 0.0)
    assert info.accepted.item() == 1 and torch.equal(phi["w"], torch.zeros(2, dtype=F64))


def test_hessian_free_with_one_cg_step_takes_the_cauchy_step():
    """cg_steps = 1: d = -(g'g / g'(A + lam I)g) g, the exact minimiser along -g of the quadratic
    1/2 w'Aw - b'w + lam/2 ||w - theta||^2; Armijo accepts it at t = 1."""
    gen = torch.Generator().manual_seed(9)
    M = torch.randn(6, 6, generator=gen, dtype=F64)
    A, b = M @ M.T + torch.eye(6, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    theta = {"w": torch.randn(6, generator=gen, dtype=F64)}
    lam = 0.5
    f, calls = counted(lambda p: 0.5 * p["w"] @ A @ p["w"] - b @ p["w"])
    phi, info = newton_cg(steps=1, cg_steps=1)(f, theta, lam)
    # the gradient (and H) at theta, one trial (the search stops at the first accepted step), the report
    assert len(calls) == 3 and info.accepted.item() == 1
    g = A @ theta["w"] - b
    expected = theta["w"] - (g @ g) / (g @ (A @ g) + lam * g @ g) * g
    torch.testing.assert_close(phi["w"], expected, rtol=1e-13, atol=0)


def test_hessian_free_newton_step_is_the_dense_newton_step():
    """One HF step with enough CG steps on a quadratic is the Newton step theta - (A + lam I)^{-1} g (a
    dense solve), up to CG's tolerance; the report's residual is ||grad G|| there, by hand."""
    gen = torch.Generator().manual_seed(0)
    n = 30
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    A = q @ torch.diag(torch.logspace(0, 3, n, dtype=F64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=F64)
    theta = {"w": torch.randn(n, generator=gen, dtype=F64)}
    lam = 1e-2
    phi, info = newton_cg(steps=1, cg_steps=200)(lambda p: 0.5 * p["w"] @ A @ p["w"] - b @ p["w"], theta, lam)
    g = A @ theta["w"] - b
    newton = theta["w"] - torch.linalg.solve(A + lam * torch.eye(n, dtype=F64), g)
    err = rel(phi["w"], newton)
    print(f"HF step vs dense Newton step: rel err {err:.1e}")
    assert err < 1e-10
    torch.testing.assert_close(info.residual, (A @ phi["w"] - b + lam * (phi["w"] - theta["w"])).norm())
    assert info.accepted.item() == 1


# ----------------------------------------------------------------------------------------------- L-BFGS


def test_lbfgs_two_loop_equals_the_dense_bfgs_inverse_hessian():
    """-H g by the two-loop recursion against H built densely: H0 = (s'y / y'y) I from the newest pair,
    then H <- (I - rho s y') H (I - rho y s') + rho s s' for each pair from oldest to newest. Three rows,
    each its own history: four pairs (two empty slots, rho = 0, at the old end), two pairs, none (H = I)."""
    gen = torch.Generator().manual_seed(10)
    n, m, slots = 7, 4, 6
    eye = torch.eye(n, dtype=F64)

    def history(k):
        M = torch.randn(n, n, generator=gen, dtype=F64)
        A = M @ M.T + 3 * eye  # s'y = s'As > 1 for these s: rho < 1
        S = [torch.randn(n, generator=gen, dtype=F64) for _ in range(k)]  # newest first
        return S, [A @ s for s in S]

    def dense(S, Y):
        if not S:
            return eye
        rho = [1.0 / (s @ y) for s, y in zip(S, Y, strict=True)]
        assert all(r < 1 for r in rho)
        H = (S[0] @ Y[0]) / (Y[0] @ Y[0]) * eye
        for s, y, r in reversed(list(zip(S, Y, rho, strict=True))):
            H = (eye - r * torch.outer(s, y)) @ H @ (eye - r * torch.outer(y, s)) + r * torch.outer(s, s)
        return H

    hists = [history(k) for k in (m, 2, 0)]
    g = torch.randn(3, n, generator=gen, dtype=F64)
    zero = torch.zeros(n, dtype=F64)
    S = [torch.stack([h[0][i] if i < len(h[0]) else zero for h in hists]) for i in range(slots)]
    Y = [torch.stack([h[1][i] if i < len(h[1]) else zero for h in hists]) for i in range(slots)]
    rho = [torch.where(torch.einsum("tn,tn->t", s, y) != 0, 1 / torch.einsum("tn,tn->t", s, y), 0.0)
           for s, y in zip(S, Y, strict=True)]  # fmt: skip
    d = _two_loop(g, S, Y, rho)
    for t, (S_t, Y_t) in enumerate(hists):
        torch.testing.assert_close(d[t], -dense(S_t, Y_t) @ g[t], rtol=1e-12, atol=0)
    assert torch.equal(d[2], -g[2])


@pytest.mark.parametrize("far", [False, True], ids=["|g|_1<1", "|g|_1>1"])
def test_lbfgs_first_step_is_torch_optims(far):
    """The first L-BFGS step is -g scaled by lr min(1, 1/|g|_1), as torch.optim.LBFGS (max_iter=1) takes it;
    on this convex task Armijo accepts it."""
    c = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    theta = {"w": c + (torch.tensor([9.0, -8.0, 7.0]) if far else torch.tensor([0.9, -0.8, 0.7])).double()}

    def support(p):
        return 0.1 * ((p["w"] - c) ** 2).sum()

    w = theta["w"].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=1)

    def closure():
        opt.zero_grad()
        G = support({"w": w}) + 0.5 * 0.4 * ((w - theta["w"]) ** 2).sum()
        G.backward()
        return G

    opt.step(closure)
    g1 = (0.2 * (theta["w"] - c)).abs().sum().item()
    assert (g1 > 1) == far
    phi, info = LBFGS(steps=1)(support, theta, 0.4)
    torch.testing.assert_close(phi["w"], w.detach(), rtol=1e-15, atol=0)
    assert info.accepted.item() == 1


def test_lbfgs_backtracks_and_scales_armijo_by_the_step():
    """G = 1000 ||w||^2 from theta = (0.1, 0.2), lam 0: g = 2000 theta, |g|_1 = 600, first t = 1/600 lands
    at theta (1 - 10/3): G rises, rejected; t = 1/1200 lands at -2/3 theta, accepted (G falls by 5/9)."""
    theta = {"w": torch.tensor([0.1, 0.2], dtype=F64)}
    phi, info = LBFGS(steps=2)(lambda p: 1000 * (p["w"] ** 2).sum(), theta, 0.0)
    assert info.accepted.item() == 1 and info.iterations.item() == 2
    torch.testing.assert_close(phi["w"], -2 / 3 * theta["w"], rtol=1e-14, atol=0)


def test_lbfgs_gradient_tolerance_is_inclusive():
    theta, support, _ = logistic_task(seed=11)
    g = grad_G(support, theta, theta, 0.5)
    phi, info = LBFGS(steps=3, tolerance_grad=g.abs().max().item())(support, theta, 0.5)
    assert info.accepted.item() == 0 and torch.equal(flat(phi), flat(theta))  # max |g| <= tol: no move
    phi, info = LBFGS(steps=3, tolerance_grad=0.999 * g.abs().max().item())(support, theta, 0.5)
    assert info.accepted.item() >= 1


def test_lbfgs_history_size_one_is_a_valid_lbfgs():
    theta, support, _ = logistic_task(seed=12)
    phi, _ = LBFGS(steps=30, history_size=1)(support, theta, 0.5)  # one pair: a memory-less L-BFGS
    assert grad_G(support, phi, theta, 0.5).norm() < 1e-8


@pytest.mark.parametrize("history_size", [3, 10])
def test_lbfgs_iterates_equal_a_dense_per_task_lbfgs(history_size):
    """8 iterations on 3 tasks at once (curvatures 1, 100, 1e4: different backtracking and pair counts per
    task) against each task alone, written out densely: d = -H g with H from gamma I by BFGS updates over the
    newest ``history_size`` pairs (gamma = s'y / y'y of the newest), d = -g where not a descent direction,
    one trial at t (t = lr min(1, 1/|g|_1) first, lr after an accepted step, backtrack x t after a rejected
    one), Armijo with c1, and a pair kept only if accepted and s'y > 1e-10."""
    rows, theta, _ = logistic_batch([1.0, 100.0, 1e4], seed=13)
    lam, steps, lr, c1, back = 0.5, 8, 3.0, 1e-4, 0.5  # lr 3 overshoots: some trials are rejected
    phi, info = LBFGS(steps=steps, lr=lr, history_size=history_size).solve(ProximalProblem(rows, theta, lam))

    def G_and_grad(t, x):
        x = x.clone().requires_grad_(True)
        full = torch.cat([theta[:t], x[None], theta[t + 1 :]])
        G = rows(full)[t] + 0.5 * lam * ((x - theta[t]) ** 2).sum()
        return G.detach(), torch.autograd.grad(G, x)[0]

    n = theta.shape[1]
    eye = torch.eye(n, dtype=F64)
    for t in range(theta.shape[0]):
        x = theta[t].clone()
        f, g = G_and_grad(t, x)
        pairs, step, accepted = [], lr * min(1.0, 1.0 / g.abs().sum().item()), 0
        for _ in range(steps):
            H = eye
            if pairs:
                s_new, y_new = pairs[-1]
                H = (s_new @ y_new) / (y_new @ y_new) * eye
                for s, y in pairs:  # oldest to newest
                    r = 1.0 / (s @ y)
                    V = eye - r * torch.outer(y, s)
                    H = V.T @ H @ V + r * torch.outer(s, s)
            d = -H @ g
            if not (g @ d < 0):
                d = -g
            trial = x + step * d
            f_new, g_new = G_and_grad(t, trial)
            ok = bool(torch.isfinite(f_new)) and f_new <= f + c1 * step * (g @ d)
            s, y = trial - x, g_new - g
            if ok and s @ y > 1e-10:
                pairs = (pairs + [(s, y)])[-history_size:]
            if ok:
                x, f, g, step, accepted = trial, f_new, g_new, lr, accepted + 1
            else:
                step *= back
        torch.testing.assert_close(phi[t], x, rtol=1e-10, atol=1e-12, msg=f"task {t}")
        assert info.accepted[t].item() == accepted, t
    assert len(set(info.accepted.tolist())) > 1  # the tasks took different paths


# ------------------------------------------------------------------------------------------- gd_armijo


def _armijo_reference(G, dG, w, lr, c, backtrack, grow, steps):
    """GDArmijo's documented rule, in scalar float64 Python, for a 1-D objective."""
    eps = 2.0**-52
    t, val, g = lr, G(w), dG(w)
    out, events = [], set()
    for _ in range(steps):
        trial = w - t * g
        new, g_new = G(trial), dG(trial)
        predicted = t * g * g
        noise = 16 * eps * max(abs(val), abs(new))
        rho_grads = 0.5 * (1 + g_new * g / (g * g))
        measurable = predicted > 1024 * noise
        rho = (val - new) / predicted if measurable else rho_grads
        events.add("values" if measurable else "gradients")
        if math.isfinite(new) and rho >= c and new <= val + noise:
            w, g, val = trial, g_new, new
            if min(rho, rho_grads) >= 1 - (1 - c) / grow and grow * t < lr:
                t = grow * t
                events.add("grow")
            elif min(rho, rho_grads) >= 1 - (1 - c) / grow:
                t = lr
        else:
            t = t * min(max(0.9 * (1 - c) / (1 - rho), 0.1), backtrack)
            events.add("shrink")
        out.append(w)
    return out, events


@pytest.mark.parametrize("lr,c,backtrack,grow", [(1.0, 0.5, 0.5, 2.0), (0.7, 0.3, 0.6, 1.5)])
def test_gd_armijo_follows_its_documented_rule(lr, c, backtrack, grow):
    """Iterate by iterate against a scalar re-statement of the docstring's rule (accept if rho >= c and G
    did not rise beyond rounding; grow t to min(lr, grow t) if rho >= 1 - (1 - c) / grow; else shrink t by
    clamp(0.9 (1 - c) / (1 - rho), 0.1, backtrack); rho from values, or from gradients where the predicted
    decrease is below 1024 x the rounding of G) on G = 1e4 + w^2 / 2 + 2 w^4 from w = 1.5: curvature 55
    there, 1 at the minimum, so t shrinks first and grows later, and the large constant puts the last
    steps in the gradient branch."""

    def G(w):
        return 1e4 + 0.5 * w * w + 2.0 * w**4

    def dG(w):
        return w + 8.0 * w**3

    ref, events = _armijo_reference(G, dG, 1.5, lr, c, backtrack, grow, 40)
    assert events == {"values", "gradients", "grow", "shrink"}  # every branch is exercised
    theta = {"w": torch.tensor([1.5], dtype=F64)}
    mine = [
        GDArmijo(steps=k, lr=lr, armijo_c=c, backtrack=backtrack, grow=grow)(
            lambda p: G(p["w"]).sum(), theta, 0.0
        )
        for k in range(1, 41)
    ]
    err = max(abs(phi["w"].item() - b) for (phi, _), b in zip(mine, ref, strict=True))
    assert err < 1e-14, err  # measured 1.1e-16 / 0


def test_gd_armijo_accepts_rho_equal_to_c_and_checks_its_options():
    """G = 2 w^2 from w = 1 with t = 1/4: the step lands on 0, rho = (2 - 0) / (t g^2) = 1/2 exactly = c."""
    theta = {"w": torch.tensor([1.0], dtype=F64)}

    def support(p):
        return 2 * (p["w"] ** 2).sum()

    phi, info = GDArmijo(steps=1, lr=0.25, armijo_c=0.5)(support, theta, 0.0)
    assert info.accepted.item() == 1 and phi["w"].item() == 0.0
    for kw, pattern in [
        ({"armijo_c": 0.0}, r"armijo_c.*0\.0"),
        ({"armijo_c": 1.0}, r"armijo_c.*1\.0"),
        ({"backtrack": 0.09}, r"backtrack.*0\.09"),
        ({"backtrack": 1.0}, r"backtrack.*1\.0"),
        ({"grow": 0.99}, r"grow.*0\.99"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            GDArmijo(steps=1, **kw)
    for kw in ({"armijo_c": 0.999}, {"armijo_c": 1e-6}, {"backtrack": 0.1}, {"grow": 1.0}):  # edges allowed
        GDArmijo(steps=1, **kw)(support, theta, 0.0)


def test_proximal_adapt_takes_a_solver_object():
    """proximal_adapt's ``optimizer`` is typed ``str | InnerSolver``; with a solver object, its options with
    the call's steps (and lr, where given) solve the task, as the same object with those set would."""
    theta, support, _ = logistic_task(seed=13)
    ref, _ = GD(steps=3, lr=0.2)(support, theta, 0.5)
    phi, info = proximal_adapt(support, theta, 0.5, 3, optimizer=GD(lr=0.2))
    assert torch.equal(flat(phi), flat(ref)) and info.iterations.item() == 3
    phi, _ = proximal_adapt(support, theta, 0.5, 3, optimizer=GD(lr=0.05), lr=0.2)  # the call's lr wins
    assert torch.equal(flat(phi), flat(ref))
