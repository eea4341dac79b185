"""Tests of the proximal inner solvers (lightning_imaml.inner): each reaches the optimum of
G(phi) = L(phi) + lam/2 ||phi - theta||^2 on a strongly convex task, and the iMAML meta-gradient computed at
their solutions agrees across solvers (it depends only on phi*, not on the path)."""

import itertools
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from lightning_imaml.implicit import implicit_meta_gradient
from lightning_imaml.inner import (
    OPTIMIZERS,
    _rose,
    _sufficient_decrease,
    _two_loop,
    adam_adapt,
    gd_adapt,
    gd_armijo_adapt,
    hessian_free_adapt,
    lbfgs_adapt,
    proximal_adapt,
    proximal_objective,
    sgd_adapt,
    torch_optimizer_adapt,
)
from lightning_imaml.params import flatten

LAM = 1.0
# (optimizer, steps, options, tolerance on ||grad G(phi)||): solvers with exact line searches / Newton steps
# go to rounding level; Adam's fixed step only gets close (its steps shrink as its 2nd-moment estimate lags)
SOLVERS = [
    # the default: largest step 2.0 is past the stability edge of fixed-step GD here, so backtracking must act
    ("gd_armijo", 50, {"lr": 2.0}, 1e-10),
    ("gd", 200, {"lr": 0.5}, 1e-10),
    ("sgd", 150, {"lr": 0.5, "momentum": 0.5}, 1e-10),
    ("adam", 500, {"lr": 0.02}, 1e-7),
    # L-BFGS's strong-Wolfe search compares values of G; changes below float64 rounding of G (~1e-17) are
    # invisible to it, which stalls it near ||grad|| ~ 1e-9 (measured 2.6e-9 / 7.4e-11 depending on rounding)
    ("lbfgs", 50, {}, 1e-8),
    ("hf", 15, {"hf_cg_steps": 6}, 1e-10),
]


def logistic_task(seed=0, d=5, n=20, m=20):
    g = torch.Generator().manual_seed(seed)
    Xs, Xq = (torch.randn(k, d, generator=g, dtype=torch.float64) for k in (n, m))
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    ys, yq = ((X @ w0 + 0.5 > 0).double() for X in (Xs, Xq))
    theta = {"w": torch.randn(d, generator=g, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}

    def loss(X, y):
        # logistic loss written out: F.binary_cross_entropy_with_logits took ~20 ms per call on this
        # loaded 2-core machine (thread-pool dispatch), softplus is ~100x cheaper
        def f(p):
            z = X @ p["w"] + p["b"]
            return (F.softplus(z) - y * z).mean()

        return f

    return theta, loss(Xs, ys), loss(Xq, yq)


def grad_G(support, phi, theta, lam):
    p = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    G = proximal_objective(support, p, theta, lam)
    return flatten(dict(zip(p, torch.autograd.grad(G, list(p.values())), strict=True)))


@pytest.fixture(scope="module")
def solutions():
    theta, support, query = logistic_task()
    out = {}
    for name, steps, opts, _ in SOLVERS:
        out[name] = proximal_adapt(support, theta, LAM, steps, optimizer=name, **opts)
    return theta, support, query, out


@pytest.mark.parametrize("name,steps,opts,tol", SOLVERS, ids=[s[0] for s in SOLVERS])
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
        grads[name] = flatten(implicit_meta_gradient(support, phi, gq, lam=LAM, cg_steps=20))
    ref = grads["hf"]
    errs = {k: ((v - ref).norm() / ref.norm()).item() for k, v in grads.items()}
    print("meta-gradient rel. difference to HF's: " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
    assert max(errs.values()) < 1e-5


def test_gd_matches_closed_form_ridge_and_allows_lam_zero():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, generator=g, dtype=torch.float64)
    theta = {"w": torch.randn(3, generator=g, dtype=torch.float64)}

    def support(p):
        return 0.5 * ((X @ p["w"] - y) ** 2).mean()

    for lam in (0.0, 0.5):
        phi = gd_adapt(support, theta, lam, steps=400, lr=0.5)
        A = X.T @ X / 30 + lam * torch.eye(3, dtype=torch.float64)
        ref = torch.linalg.solve(A, X.T @ y / 30 + lam * theta["w"])
        err = ((phi["w"] - ref).norm() / ref.norm()).item()
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
    for name in OPTIMIZERS:
        with torch.no_grad():
            phi = proximal_adapt(support, theta, 0.5, 5, optimizer=name)
        assert all(not v.requires_grad and v.grad_fn is None for v in phi.values()), name
        assert all(torch.isfinite(v).all() for v in phi.values()), name
        assert support(phi) < support(before), name
    assert all(p.grad is None for p in model.parameters())  # the module's .grad untouched
    assert all(torch.equal(before[k], theta[k].detach()) for k in theta)  # theta untouched


def test_graph_does_not_grow_with_steps():
    # saved-tensor count of the largest live graph must not depend on the number of steps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    theta = {k: v.detach() for k, v in model.named_parameters()}

    def support(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    def peak_saved(optimizer, steps):
        live, peak = [0], [0]

        def pack(t):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            return _Unpacked(t, live)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u.t):
            proximal_adapt(support, theta, 0.5, steps, optimizer=optimizer)
        return peak[0]

    # not "hf": its create_graph gradient makes the counting hook itself form a C++/Python reference cycle
    # (saved output -> grad_fn -> hook object -> output), so the count would measure the hook, not the solver;
    # ("gd" / "gd_armijo" take torch.autograd.grad outside vmap; under vmap torch.func.grad, which refuses
    # saved-tensor hooks: their batched memory is measured by peak RSS instead)
    for name in ("gd_armijo", "gd", "sgd", "adam", "lbfgs"):
        assert peak_saved(name, 2) == peak_saved(name, 10), name


class _Unpacked:
    def __init__(self, t, live):
        self.t, self.live = t, live

    def __del__(self):
        self.live[0] -= 1


def test_hessian_free_survives_nonconvex_lam_zero():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.linspace(-3, 3, 20, dtype=torch.float64)[:, None]
    y = torch.sin(2 * x)
    theta = {k: v.detach() for k, v in model.named_parameters()}

    def support(p):
        return ((functional_call(model, p, (x,)) - y) ** 2).mean()

    phi = hessian_free_adapt(support, theta, lam=0.0, steps=10, hf_cg_steps=5)
    assert all(torch.isfinite(v).all() for v in phi.values())
    assert support(phi) < 0.5 * support(theta)


def test_bad_inputs():
    theta = {"w": torch.ones(2)}

    def support(p):
        return (p["w"] ** 2).sum()

    with pytest.raises(ValueError, match=r"unknown optimizer 'rmsprop'.*'gd'.*'hf'"):
        proximal_adapt(support, theta, 1.0, 3, optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"valid names: \['adam', 'sgd'\]"):
        torch_optimizer_adapt(support, theta, 1.0, 3, optimizer="nadam")
    with pytest.raises(ValueError, match="lam"):
        proximal_adapt(support, theta, -1.0, 3)
    with pytest.raises(ValueError, match="steps"):
        proximal_adapt(support, theta, 1.0, -1)
    with pytest.raises(ValueError, match="hf_cg_steps"):
        proximal_adapt(support, theta, 1.0, 3, optimizer="hf", hf_cg_steps=0)
    # any torch.optim class works: (w^2).sum() + 1/2 ||w - 1||^2 has its minimum at w = 1/3
    phi = torch_optimizer_adapt(support, theta, 1.0, 50, optimizer=torch.optim.RMSprop, lr=0.05)
    assert torch.allclose(phi["w"], torch.full((2,), 1 / 3), atol=1e-6)


@pytest.mark.parametrize(
    "name,options",
    [
        ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),
        ("adam", {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01}),
        ("adam", {"amsgrad": True}),
    ],
)
def test_vmappable_sgd_and_adam_equal_torch_optim_step_for_step(name, options):
    """The hand-written (vmappable) SGD / Adam against torch.optim's own classes on the same problem."""
    theta, support, _ = logistic_task(seed=3)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
    for steps in (1, 7):
        mine = proximal_adapt(support, theta, 0.3, steps, optimizer=name, lr=0.05, **options)
        ref = torch_optimizer_adapt(support, theta, 0.3, steps, optimizer=cls, lr=0.05, **options)
        err = (flatten(mine) - flatten(ref)).norm() / flatten(ref).norm()
        assert err < 1e-13, (name, options, steps, err.item())


# ------------------------------------------------------------- defaults and reports, against torch.optim
# Each solver's defaults are public API (README, configs); a default that changes silently changes every
# run that relies on it. Where torch.optim implements the same method its own defaults are the ground truth.


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


def test_fixed_step_solver_defaults_are_torch_optims_at_lr_0_1():
    theta, support, _ = logistic_task(seed=4)
    sgd = torch_optim_reference(support, theta, 0.3, 6, torch.optim.SGD, lr=0.1)
    adam = torch_optim_reference(support, theta, 0.3, 6, torch.optim.Adam, lr=0.1)
    momentum = torch_optim_reference(support, theta, 0.3, 6, torch.optim.SGD, lr=0.1, momentum=0.9)
    runs = {
        "gd_adapt": (gd_adapt(support, theta, 0.3, 6), sgd),
        "sgd_adapt": (sgd_adapt(support, theta, 0.3, 6), sgd),
        "adam_adapt": (adam_adapt(support, theta, 0.3, 6), adam),
        "proximal_adapt gd": (proximal_adapt(support, theta, 0.3, 6, optimizer="gd"), sgd),
        "proximal_adapt sgd": (proximal_adapt(support, theta, 0.3, 6, optimizer="sgd"), sgd),
        "proximal_adapt adam": (proximal_adapt(support, theta, 0.3, 6, optimizer="adam"), adam),
        "torch_optimizer_adapt": (torch_optimizer_adapt(support, theta, 0.3, 6), sgd),
        "torch_optimizer_adapt ADAM": (torch_optimizer_adapt(support, theta, 0.3, 6, optimizer="ADAM"), adam),
        "torch_optimizer_adapt Sgd": (
            torch_optimizer_adapt(support, theta, 0.3, 6, optimizer="Sgd", momentum=0.9),
            momentum,
        ),
    }
    for what, (mine, ref) in runs.items():
        assert isinstance(mine, dict), f"{what}: return_info defaults to False, so phi alone"
        err = ((flatten(mine) - flatten(ref)).norm() / flatten(ref).norm()).item()
        assert err < 1e-13, (what, err)  # measured 0 to 1e-16


def test_line_search_solver_defaults_are_the_documented_ones():
    """gd_armijo (lr 0.1, armijo_c 0.5, backtrack 0.5, grow 2), lbfgs (lr 1, history 10, c1 1e-4, backtrack
    0.5, tolerance_grad 1e-10), hf (5 CG steps, lr 1, c1 1e-4, backtrack 0.5, 10 backtracks, gtol 0): a
    call without options equals one that spells them out, on problems where each option shows: changing
    any one of them changes the answer (checked, so this test cannot pass by insensitivity)."""
    theta, support, _ = logistic_task(seed=5, d=12, n=16)

    def scaled(c):  # curvature c times the logistic task's: at c = 100, lr 0.1 is rejected and grown again
        return lambda p: c * support(p)

    cases = [
        (gd_armijo_adapt, scaled(100.0), 12, {"lr": 0.1, "armijo_c": 0.5, "backtrack": 0.5, "grow": 2.0}),
        (lbfgs_adapt, scaled(3.0), 25,
         {"lr": 1.0, "history_size": 10, "c1": 1e-4, "backtrack": 0.5, "tolerance_grad": 1e-10}),
        (hessian_free_adapt, scaled(10.0), 3,
         {"hf_cg_steps": 5, "lr": 1.0, "c1": 1e-4, "backtrack": 0.5, "gtol": 0.0}),
    ]  # fmt: skip
    other = {"lr": 0.3, "armijo_c": 0.9, "backtrack": 0.2, "grow": 1.0, "history_size": 3, "c1": 0.9,
             "tolerance_grad": 0.05, "hf_cg_steps": 2, "gtol": 2.0}  # fmt: skip
    for solver, loss, steps, documented in cases:
        default = flatten(solver(loss, theta, 0.1, steps))
        assert torch.equal(default, flatten(solver(loss, theta, 0.1, steps, **documented))), solver.__name__
        for k in documented:
            changed = flatten(solver(loss, theta, 0.1, steps, **{**documented, k: other[k]}))
            assert not torch.equal(changed, default), f"{solver.__name__}: {k} does not show on this problem"
    # hf's max_backtracks only shows where more than 10 halvings are needed; it is documented as 10
    import inspect

    assert inspect.signature(hessian_free_adapt).parameters["max_backtracks"].default == 10


@pytest.mark.parametrize("name", [*OPTIMIZERS, "torch.optim.RMSprop"])
def test_inner_info_against_an_independent_computation(name):
    """With return_info every solver returns the same phi as without, and an InnerInfo whose fields match
    what the test computes itself: ||grad G(phi)||, ||grad L(theta)||, G(phi), the steps taken, a rise."""
    theta, support, _ = logistic_task(seed=6)
    lam, steps = 0.7, {"lbfgs": 3, "hf": 2}.get(name, 6)  # still short of rounding level after these

    def run(steps, **kw):
        if name == "torch.optim.RMSprop":
            return torch_optimizer_adapt(support, theta, lam, steps, torch.optim.RMSprop, lr=0.01, **kw)
        return proximal_adapt(support, theta, lam, steps, optimizer=name, **kw)

    def G(phi):
        return support(phi) + 0.5 * lam * ((flatten(phi) - flatten(theta)) ** 2).sum()

    phi, info = run(steps, return_info=True)
    assert torch.equal(flatten(phi), flatten(run(steps))), "asking for the report changed the solve"
    torch.testing.assert_close(info.objective, G(phi), rtol=1e-14, atol=0)
    torch.testing.assert_close(info.residual, grad_G(support, phi, theta, lam).norm(), rtol=1e-12, atol=0)
    torch.testing.assert_close(info.residual0, grad_G(support, theta, theta, 0.0).norm(), rtol=1e-14, atol=0)
    assert info.residual < info.residual0
    # rose: G increased between two consecutive iterates (each a prefix of the same deterministic run)
    values = [G(run(k)).item() for k in range(steps + 1)]
    rose = any(b > a + 16 * torch.finfo(torch.float64).eps * abs(a) for a, b in itertools.pairwise(values))
    assert info.rose.dtype == torch.bool and bool(info.rose) == rose, (values, info.rose)
    print(f"{name}: rose={rose}")
    if name in ("gd", "sgd", "adam", "torch.optim.RMSprop"):
        assert info.accepted.item() == steps  # fixed-step methods take every step
    else:
        assert 1 <= info.accepted.item() <= steps


@pytest.mark.parametrize("name", ["gd", "sgd", "adam", "torch.optim.SGD"])
def test_inner_info_reports_a_rising_objective(name):
    """lr 3 on a curvature of ~10 (x scaled by 3): fixed-step methods overshoot and G rises, reported."""
    theta, support, _ = logistic_task(seed=6)

    def steep(p):
        return 10.0 * support(p)

    if name == "torch.optim.SGD":
        _, info = torch_optimizer_adapt(steep, theta, 0.1, 4, torch.optim.SGD, lr=3.0, return_info=True)
    else:
        _, info = proximal_adapt(steep, theta, 0.1, 4, optimizer=name, lr=3.0, return_info=True)
    assert bool(info.rose)


def test_torch_optimizer_adapt_messages():
    theta = {"w": torch.ones(2)}

    def support(p):
        return (p["w"] ** 2).sum()

    msg = "unknown optimizer 'nadam'; valid names: ['adam', 'sgd'], or pass a torch.optim.Optimizer subclass"
    with pytest.raises(ValueError, match=re.escape(msg)):
        torch_optimizer_adapt(support, theta, 1.0, 3, optimizer="nadam")
    msg = (
        "torch_optimizer_adapt(RMSprop) updates tensors in place and cannot run under torch.func.vmap; "
        "use the per-task loop, or proximal_adapt's 'sgd' / 'adam'"
    )
    with pytest.raises(RuntimeError, match=re.escape(msg)):
        torch.func.vmap(lambda w: torch_optimizer_adapt(support, {"w": w}, 1.0, 3, torch.optim.RMSprop)["w"])(
            torch.ones(3, 2)
        )


def test_hessian_free_stops_once_the_gradient_is_below_gtol():
    """||grad G|| after 1, 2, 3 Newton-CG steps here: 7.0e-2, 2.8e-3, 1.3e-5; with gtol = 1e-3 the solve
    must stop after the third step (it used to test gtol only at theta, and went on)."""
    theta, support, _ = logistic_task(seed=5, d=12, n=16)
    norms = [
        grad_G(support, hessian_free_adapt(support, theta, 0.1, k), theta, 0.1).norm().item()
        for k in (1, 2, 3)
    ]
    assert norms[0] > norms[1] > 1e-3 > norms[2]
    phi, info = hessian_free_adapt(support, theta, 0.1, 6, gtol=1e-3, return_info=True)
    assert info.accepted.item() == 3
    assert torch.equal(flatten(phi), flatten(hessian_free_adapt(support, theta, 0.1, 3)))
    # under vmap (every iteration runs, masked) the same
    phis = torch.func.vmap(
        lambda w: flatten(hessian_free_adapt(support, {"w": w, "b": theta["b"]}, 0.1, 6, gtol=1e-3))
    )(theta["w"][None])
    torch.testing.assert_close(phis[0], flatten(phi), rtol=1e-12, atol=1e-14)


def counted(loss):
    calls = []

    def f(p):
        calls.append(1)
        return loss(p)

    return f, calls


@pytest.mark.parametrize("name", ["gd", "sgd", "adam", "torch.optim.SGD"])
def test_fixed_step_solvers_spend_steps_evaluations_plus_one_for_the_report(name):
    """The gradient at the last iterate only serves the report: ``steps`` evaluations, one more with it."""
    theta, support, _ = logistic_task(seed=7)
    for return_info, expected in ((False, 5), (True, 6)):
        f, calls = counted(support)
        if name == "torch.optim.SGD":
            torch_optimizer_adapt(f, theta, 0.5, 5, torch.optim.SGD, return_info=return_info)
        else:
            proximal_adapt(f, theta, 0.5, 5, optimizer=name, return_info=return_info)
        assert len(calls) == expected, (name, return_info, len(calls))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_steps_return_theta_and_a_report_at_theta(name):
    theta, support, _ = logistic_task(seed=8)
    phi, info = proximal_adapt(support, theta, 0.5, 0, optimizer=name, return_info=True)
    assert torch.equal(flatten(phi), flatten(theta))
    g0 = grad_G(support, theta, theta, 0.5).norm()
    torch.testing.assert_close(info.residual, g0, rtol=1e-14, atol=0)
    torch.testing.assert_close(info.residual0, g0, rtol=1e-14, atol=0)
    torch.testing.assert_close(info.objective, support(theta), rtol=1e-14, atol=0)
    assert info.accepted.item() == 0 and info.rose.dtype == torch.bool and not bool(info.rose)


def test_rise_threshold_is_16_float_eps_relative():
    for dtype in (torch.float64, torch.float32):
        eps, one = torch.finfo(dtype).eps, torch.tensor(1.0, dtype=dtype)
        assert not bool(_rose(one + 16 * eps, one)) and bool(
            _rose(one + 17 * eps, one)
        )  # both exact in binary
        assert not bool(_rose(-one + 16 * eps, -one)) and bool(_rose(-one + 17 * eps, -one))  # |old|, not old
        four = 4 * one  # relative to |old|: at 4 the allowance is 4 x 16 eps
        assert not bool(_rose(four * (1 + 16 * eps), four)) and bool(_rose(four * (1 + 17 * eps), four))


def test_sgd_nesterov_needs_momentum_and_no_dampening_as_torch_optim():
    theta = {"w": torch.ones(2)}

    def support(p):
        return (p["w"] ** 2).sum()

    msg = "nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)"
    for opts in ({"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.1}):
        with pytest.raises(ValueError):  # the ground truth: torch.optim.SGD refuses the same options
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, nesterov=True, **opts)
        with pytest.raises(ValueError, match=re.escape(msg)):
            proximal_adapt(support, theta, 1.0, 2, optimizer="sgd", nesterov=True, **opts)


# ------------------------------------------------------------------------- iMAML-HF: every branch


def test_hessian_free_backtracks_at_most_max_backtracks_times():
    """log cosh from w = 5, lam = 0: the Newton step is -sinh(5) cosh(5) = -5506.6; t = 1 .. 2^-9 all land
    where G is above G(5) = 4.31, t = 2^-10 is the first that decreases G (w = -0.38). So the default 10
    trials find nothing (the task stops there), 11 trials take that step. Evaluations are counted too: a
    stopped task does not try again, and the search stops at the first accepted trial."""
    theta = {"w": torch.tensor([5.0], dtype=torch.float64)}

    def support(p):
        return torch.log(torch.cosh(p["w"])).sum()

    f, calls = counted(support)
    phi, info = hessian_free_adapt(f, theta, 0.0, 3, return_info=True)
    assert info.accepted.item() == 0 and torch.equal(phi["w"], theta["w"])
    # gradient + 10 trials; the next iteration's gradient, then stop; the report's gradient
    assert len(calls) == 1 + 10 + 1 + 1
    f, calls = counted(support)
    phi, info = hessian_free_adapt(f, theta, 0.0, 1, max_backtracks=11, return_info=True)
    assert info.accepted.item() == 1 and len(calls) == 1 + 11 + 1
    expected = 5.0 - math.sinh(5.0) * math.cosh(5.0) / 1024
    err = abs(phi["w"].item() - expected) / abs(expected)
    print(
        f"HF step after 10 halvings: {phi['w'].item():.12f}, closed form {expected:.12f}, rel err {err:.1e}"
    )
    assert err < 1e-9  # measured 2.3e-11: 1 - tanh(5)^2, the curvature, loses ~1e-12 to cancellation


def test_hessian_free_at_a_stationary_theta_takes_no_step():
    target = torch.tensor([1.0, -2.0], dtype=torch.float64)
    theta = {"w": target.clone()}

    def support(p):
        return ((p["w"] - target) ** 2).sum()  # gradient exactly 0 at theta

    f, calls = counted(support)
    phi, info = hessian_free_adapt(f, theta, 0.5, 3, return_info=True)
    assert info.accepted.item() == 0 and info.residual0.item() == 0 and torch.equal(phi["w"], target)
    assert len(calls) == 2  # the gradient at theta, then the report's


@pytest.mark.parametrize("direction", ["ascent", "orthogonal"])
def test_hessian_free_falls_back_to_steepest_descent_without_a_descent_direction(direction, monkeypatch):
    """CG from zero always returns a descent direction in exact arithmetic; if rounding ever gave one that
    is not (g'd >= 0), HF must take -g instead. Forced here by replacing CG: on G = ||w||^2 (lam 0) from
    theta = (1, 2), -g = -2 theta is rejected at t = 1 (G(-theta) = G(theta)); t = 1/2 lands on 0 exactly."""
    from lightning_imaml import inner

    def fake_cg(matvec, b, *args, **kwargs):  # b = -g
        d = -b["w"] if direction == "ascent" else torch.stack([-b["w"][1], b["w"][0]])
        return {"w": d}, None

    monkeypatch.setattr(inner, "conjugate_gradient", fake_cg)
    theta = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    phi = hessian_free_adapt(lambda p: (p["w"] ** 2).sum(), theta, 0.0, 1)
    assert torch.equal(phi["w"], torch.zeros(2, dtype=torch.float64))


def test_hessian_free_with_one_cg_step_takes_the_cauchy_step():
    """hf_cg_steps = 1: d = -(g'g / g'(A + lam I)g) g, the exact minimiser along -g of the quadratic
    1/2 w'Aw - b'w + lam/2 ||w - theta||^2; Armijo accepts it at t = 1."""
    gen = torch.Generator().manual_seed(9)
    M = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    A, b = M @ M.T + torch.eye(6, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    theta = {"w": torch.randn(6, generator=gen, dtype=torch.float64)}
    lam = 0.5
    f, calls = counted(lambda p: 0.5 * p["w"] @ A @ p["w"] - b @ p["w"])
    phi = hessian_free_adapt(f, theta, lam, 1, hf_cg_steps=1)
    assert len(calls) == 2  # the gradient, then one trial: the search stops at the first accepted step
    g = A @ theta["w"] - b
    expected = theta["w"] - (g @ g) / (g @ (A @ g) + lam * g @ g) * g
    torch.testing.assert_close(phi["w"], expected, rtol=1e-13, atol=0)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=re.escape(f"hf_cg_steps must be an integer >= 1, got {bad!r}")):
            hessian_free_adapt(lambda p: (p["w"] ** 2).sum(), theta, lam, 1, hf_cg_steps=bad)


def test_hessian_free_newton_step_is_solved_to_cg_tolerance_1e_12():
    """One HF step with enough CG steps on an ill-conditioned quadratic (eigenvalues 1 .. 1e4, n = 60) lands
    where CG's stopping rule ||r|| <= 1e-12 ||g|| puts it: measured ||grad G|| / ||g|| = 2.4e-13 (at CG's
    default rtol 1e-10: 6.7e-11)."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = q @ torch.diag(torch.logspace(0, 4, n, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    theta = {"w": torch.zeros(n, dtype=torch.float64)}
    phi = hessian_free_adapt(
        lambda p: 0.5 * p["w"] @ A @ p["w"] - b @ p["w"], theta, 1e-3, 1, hf_cg_steps=400
    )
    rel = ((A @ phi["w"] - b + 1e-3 * phi["w"]).norm() / b.norm()).item()
    print(f"HF Newton step: ||grad G|| / ||g|| = {rel:.1e}")
    assert rel < 1e-11


def test_lbfgs_two_loop_equals_the_dense_bfgs_inverse_hessian():
    """-H g by the two-loop recursion against H built densely: H0 = (s'y / y'y) I from the newest pair,
    then H <- (I - rho s y') H (I - rho y s') + rho s s' for each pair from oldest to newest. Empty history
    slots (rho = 0) are no-ops, and with no pair at all H = I."""
    gen = torch.Generator().manual_seed(10)
    n, m = 7, 4
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = M @ M.T + 3 * torch.eye(n, dtype=torch.float64)  # s'y = s'As > 1 for these s: rho < 1
    S = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(m)]  # newest first
    Y = [A @ s for s in S]
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    rho = [1.0 / (s @ y) for s, y in zip(S, Y, strict=True)]
    assert all(r < 1 for r in rho)
    H = (S[0] @ Y[0]) / (Y[0] @ Y[0]) * torch.eye(n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    for s, y, r in reversed(list(zip(S, Y, rho, strict=True))):
        H = (eye - r * torch.outer(s, y)) @ H @ (eye - r * torch.outer(y, s)) + r * torch.outer(s, s)
    zero = torch.zeros(n, dtype=torch.float64)

    def wrap(v):
        return {"w": v}

    pad = 2  # two empty slots at the old end of the history
    d = _two_loop(
        wrap(g),
        [wrap(s) for s in S] + [wrap(zero)] * pad,
        [wrap(y) for y in Y] + [wrap(zero)] * pad,
        [r.clone() for r in rho] + [torch.tensor(0.0, dtype=torch.float64)] * pad,
    )["w"]
    torch.testing.assert_close(d, -H @ g, rtol=1e-12, atol=0)
    d0 = _two_loop(wrap(g), [wrap(zero)] * 3, [wrap(zero)] * 3, [torch.tensor(0.0, dtype=torch.float64)] * 3)[
        "w"
    ]
    assert torch.equal(d0, -g)


@pytest.mark.parametrize("far", [False, True], ids=["|g|_1<1", "|g|_1>1"])
def test_lbfgs_first_step_is_torch_optims(far):
    """The first L-BFGS step is -g scaled by lr min(1, 1/|g|_1), as torch.optim.LBFGS (max_iter=1) takes it;
    on this convex task Armijo accepts it."""
    c = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
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
    phi = lbfgs_adapt(support, theta, 0.4, 1)
    torch.testing.assert_close(phi["w"], w.detach(), rtol=1e-15, atol=0)


def test_lbfgs_backtracks_and_scales_armijo_by_the_step():
    """G = 1000 ||w||^2 from theta = (0.1, 0.2), lam 0: g = 2000 theta, |g|_1 = 600, first t = 1/600 lands
    at theta (1 - 10/3): G rises, rejected; t = 1/1200 lands at -2/3 theta, accepted (G falls by 5/9)."""
    theta = {"w": torch.tensor([0.1, 0.2], dtype=torch.float64)}
    phi, info = lbfgs_adapt(lambda p: 1000 * (p["w"] ** 2).sum(), theta, 0.0, 2, return_info=True)
    assert info.accepted.item() == 1
    torch.testing.assert_close(phi["w"], -2 / 3 * theta["w"], rtol=1e-14, atol=0)


def test_lbfgs_gradient_tolerance_is_inclusive():
    theta, support, _ = logistic_task(seed=11)
    g = grad_G(support, theta, theta, 0.5)
    phi, info = lbfgs_adapt(support, theta, 0.5, 3, tolerance_grad=g.abs().max().item(), return_info=True)
    assert info.accepted.item() == 0 and torch.equal(flatten(phi), flatten(theta))  # max |g| <= tol: no move
    phi, info = lbfgs_adapt(
        support, theta, 0.5, 3, tolerance_grad=0.999 * g.abs().max().item(), return_info=True
    )
    assert info.accepted.item() >= 1


@pytest.mark.parametrize("direction", ["ascent", "orthogonal"])
def test_lbfgs_falls_back_to_steepest_descent_without_a_descent_direction(direction, monkeypatch):
    """If the two-loop recursion gave a direction with g'd >= 0, L-BFGS must use -g with slope -||g||^2.
    G = ||w||^2 from theta = (1, 2), lr 6: t = 6/|g|_1 = 1 reaches -theta, where G is unchanged: rejected
    (Armijo needs a decrease of c1 t ||g||^2); then t = 1/2 lands on the minimum 0 exactly."""
    from lightning_imaml import inner

    def fake_two_loop(g, S, Y, rho):
        d = g["w"] if direction == "ascent" else torch.stack([-g["w"][1], g["w"][0]])
        return {"w": d}

    monkeypatch.setattr(inner, "_two_loop", fake_two_loop)
    theta = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    phi, info = inner.lbfgs_adapt(lambda p: (p["w"] ** 2).sum(), theta, 0.0, 2, lr=6.0, return_info=True)
    assert info.accepted.item() == 1 and torch.equal(phi["w"], torch.zeros(2, dtype=torch.float64))


def test_lbfgs_history_size_checks():
    theta, support, _ = logistic_task(seed=12)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=re.escape(f"history_size must be an integer >= 1, got {bad!r}")):
            lbfgs_adapt(support, theta, 0.5, 2, history_size=bad)
    phi = lbfgs_adapt(support, theta, 0.5, 30, history_size=1)  # one pair is a valid (memory-less) L-BFGS
    assert grad_G(support, phi, theta, 0.5).norm() < 1e-8


def _armijo_reference(G, dG, w, lr, c, backtrack, grow, steps):
    """gd_armijo_adapt's documented rule, in scalar float64 Python, for a 1-D objective."""
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
    theta = {"w": torch.tensor([1.5], dtype=torch.float64)}
    mine = [
        gd_armijo_adapt(
            lambda p: G(p["w"]).sum(), theta, 0.0, k, lr=lr, armijo_c=c, backtrack=backtrack, grow=grow
        )
        for k in range(1, 41)
    ]
    err = max(abs(a["w"].item() - b) for a, b in zip(mine, ref, strict=True))
    assert err < 1e-14, err  # measured 1.1e-16 / 0


def test_gd_armijo_accepts_rho_equal_to_c_and_checks_its_options():
    """G = 2 w^2 from w = 1 with t = 1/4: the step lands on 0, rho = (2 - 0) / (t g^2) = 1/2 exactly = c."""
    theta = {"w": torch.tensor([1.0], dtype=torch.float64)}

    def support(p):
        return 2 * (p["w"] ** 2).sum()

    phi, info = gd_armijo_adapt(support, theta, 0.0, 1, lr=0.25, armijo_c=0.5, return_info=True)
    assert info.accepted.item() == 1 and phi["w"].item() == 0.0
    for kw, msg in [
        ({"armijo_c": 0.0}, "armijo_c must be in (0, 1), got 0.0"),
        ({"armijo_c": 1.0}, "armijo_c must be in (0, 1), got 1.0"),
        ({"backtrack": 0.09}, "backtrack must be in [0.1, 1), got 0.09"),
        ({"backtrack": 1.0}, "backtrack must be in [0.1, 1), got 1.0"),
        ({"grow": 0.99}, "grow must be >= 1, got 0.99"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            gd_armijo_adapt(support, theta, 0.0, 1, **kw)
    for kw in ({"armijo_c": 0.999}, {"armijo_c": 1e-6}, {"backtrack": 0.1}, {"grow": 1.0}):  # edges allowed
        gd_armijo_adapt(support, theta, 0.0, 1, **kw)


def test_sufficient_decrease_and_its_rounding_allowance():
    """Armijo G(new) <= G(old) + predicted; where the predicted decrease is within 1024 x the rounding of G
    (16 eps max(|G(old)|, |G(new)|)), a step that raises G by at most that rounding passes. Values chosen
    exact in binary so that each comparison sits on its boundary."""
    eps = torch.finfo(torch.float64).eps

    def ok(new, old, predicted):
        t = [torch.tensor(v, dtype=torch.float64) for v in (new, old, predicted)]
        return bool(_sufficient_decrease(*t))

    assert ok(1.0 - 2.0**-10, 1.0, -(2.0**-10)) and not ok(1.0 - 2.0**-10 + 2.0**-40, 1.0, -(2.0**-10))
    # predicted -2^-40 = 9e-13, below 1024 x rounding (1024 x 16 eps x 4 = 1.5e-11): rises <= 16 eps |G| pass
    assert ok(4.0 * (1 + 16 * eps), 4.0, -(2.0**-40)) and not ok(4.0 * (1 + 17 * eps), 4.0, -(2.0**-40))
    assert not ok(
        4.0 * (1 + 16 * eps), 4.0, -(2.0**-30)
    )  # a predicted decrease well above rounding must happen


def test_input_checks_name_the_bad_value():
    theta = {"w": torch.ones(2), "b": torch.zeros(1)}

    def support(p):
        return (p["w"] ** 2).sum() + p["b"].sum()

    def raises(msg, **kw):
        with pytest.raises(ValueError, match=re.escape(msg)):
            proximal_adapt(**{"support_loss": support, "theta": theta, "lam": 1.0, "steps": 2, **kw})

    raises("theta must be a non-empty dict name -> Tensor, got dict", theta={})
    raises("theta must be a non-empty dict name -> Tensor, got list", theta=[torch.ones(2)])
    raises("steps must be an integer >= 0, got 2.5", steps=2.5)
    raises("steps must be an integer >= 0, got True", steps=True)
    raises("a per-parameter lam needs theta's keys: missing ['b'], unknown ['v']",
           lam={"w": torch.tensor(1.0), "v": torch.tensor(1.0)})  # fmt: skip
    raises("lam['w'] must be >= 0 and finite", lam={"w": torch.tensor(float("inf")), "b": torch.tensor(1.0)})
    raises("lam['w'] must be >= 0 and finite", lam={"w": torch.tensor(-1.0), "b": torch.tensor(1.0)})
    raises("lr must be > 0, got 0.0", optimizer="gd", lr=0.0)
    raises(
        "unknown optimizer <class 'torch.optim.sgd.SGD'>", optimizer=torch.optim.SGD
    )  # torch_optimizer_adapt's
    raises("optimizer 'gd' takes no extra options, got ['momentum']", optimizer="gd", momentum=0.9)
    raises("optimizer 'sgd' takes only momentum, dampening, nesterov, weight_decay, got ['betas']",
           optimizer="SGD", betas=(0.9, 0.9))  # fmt: skip
    with pytest.raises(
        ValueError, match=re.escape("nesterov needs momentum > 0 and dampening = 0 (as torch.optim.SGD)")
    ):
        proximal_adapt(support, theta, 1.0, 2, optimizer="sgd", nesterov=True)
    # lam = 0 per parameter is allowed (no proximal pull on that tensor)
    phi = proximal_adapt(support, theta, {"w": torch.tensor(0.0), "b": torch.tensor(1.0)}, 2, optimizer="gd")
    assert torch.equal(phi["w"], torch.full((2,), 0.64)) and torch.equal(phi["b"], torch.tensor([-0.19]))
