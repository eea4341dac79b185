"""Constants pinned to kill mutants, in one place: rounding allowances and thresholds of the inner solvers
(lightning_imaml.inner) and of conjugate gradient (lightning_imaml.cg). Each test sits on the boundary of
its constant with values exact in binary, so that moving the constant, or turning <= into <, flips the
result. The behaviour these constants serve is tested in test_inner.py / test_implicit.py."""

import pytest
import torch
from helpers import krylov_minimiser, rel

from lightning_imaml.cg import CG, batched_conjugate_gradient, conjugate_gradient, default_curvature_eps
from lightning_imaml.implicit import implicit_meta_gradient
from lightning_imaml.inner import GDArmijo, HessianFree, _rose, _sufficient_decrease

F64 = torch.float64


# ------------------------------------------------------------------------- inner: rounding allowances


def _ok(new, old, predicted):
    t = [torch.tensor(v, dtype=F64) for v in (new, old, predicted)]
    return bool(_sufficient_decrease(*t))


def test_sufficient_decrease_and_its_rounding_allowance():
    """Armijo G(new) <= G(old) + predicted; where the predicted decrease is within 1024 x the rounding of G
    (16 eps max(|G(old)|, |G(new)|)), a step that raises G by at most that rounding passes. Values chosen
    exact in binary so that each comparison sits on its boundary."""
    eps = torch.finfo(F64).eps
    assert _ok(1.0 - 2.0**-10, 1.0, -(2.0**-10)) and not _ok(1.0 - 2.0**-10 + 2.0**-40, 1.0, -(2.0**-10))
    # predicted -2^-40 = 9e-13, below 1024 x rounding (1024 x 16 eps x 4 = 1.5e-11): rises <= 16 eps |G| pass
    assert _ok(4.0 * (1 + 16 * eps), 4.0, -(2.0**-40)) and not _ok(4.0 * (1 + 17 * eps), 4.0, -(2.0**-40))
    # a predicted decrease well above rounding must happen
    assert not _ok(4.0 * (1 + 16 * eps), 4.0, -(2.0**-30))


def test_sufficient_decrease_1024_rule_on_its_boundary():
    """The rounding branch applies while -predicted <= 1024 x noise, inclusive, noise = 16 eps max(|old|,
    |new|) (every factor a power of two, so the products are exact): a rise of exactly the noise passes at
    -predicted = 1024 noise and fails one ulp above it."""
    eps = torch.finfo(F64).eps
    old = 4.0
    new = old + 64 * eps  # = 4 (1 + 16 eps): 16 ulps of 4 above old, exact
    noise = 16 * eps * new  # max(|old|, |new|) = new: exact (a power of two times new)
    assert new - old <= noise  # the rise is within the rounding allowance
    edge = 1024 * noise
    assert _ok(new, old, -edge)
    assert not _ok(new, old, -(edge + 2 * eps * edge))  # a hair (2 ulps) past 1024 x noise: Armijo proper
    # the edge is 1024 x 16 eps |new| here, |new| > |old|: with |old| alone it would be 16 ulps lower
    assert edge > 1024 * 16 * eps * old
    # magnitudes: with G negative the allowance is 16 eps |old| (= 64 eps at -4), not 16 eps old (< 0)
    assert _ok(-4.0 + 64 * eps, -4.0, -(2.0**-40)) and not _ok(-4.0 + 68 * eps, -4.0, -(2.0**-40))


def test_rise_threshold_is_16_float_eps_relative():
    for dtype in (torch.float64, torch.float32):
        eps, one = torch.finfo(dtype).eps, torch.tensor(1.0, dtype=dtype)
        assert not bool(_rose(one + 16 * eps, one)) and bool(_rose(one + 17 * eps, one))  # exact in binary
        assert not bool(_rose(-one + 16 * eps, -one)) and bool(_rose(-one + 17 * eps, -one))  # |old|, not old
        four = 4 * one  # relative to |old|: at 4 the allowance is 4 x 16 eps
        assert not bool(_rose(four * (1 + 16 * eps), four)) and bool(_rose(four * (1 + 17 * eps), four))


# ----------------------------------------------------------------------- gd_armijo: the shrink factor


def _two_armijo_steps(tk, c=0.5, backtrack=0.5):
    """G = k/2 w^2 from w = 1, first step t = lr = 1 (so t k = tk): rho = 1 - t k / 2 from the values; where
    the first trial is rejected the second one uses the shrunk t. Returns w after two iterations."""
    theta = {"w": torch.tensor([1.0], dtype=F64)}
    phi, _ = GDArmijo(steps=2, lr=1.0, armijo_c=c, backtrack=backtrack)(
        lambda p: 0.5 * tk * (p["w"] ** 2).sum(), theta, 0.0
    )
    return phi["w"].item()


@pytest.mark.parametrize(
    "tk,c,backtrack,w",
    [
        # rho = -1/2: factor 0.9 (1 - c) / (1 - rho) = 0.3 (inside the clamp): t k = 0.9, accepted: w = 0.1
        (3.0, 0.5, 0.5, 0.1),
        # (1 - c) enters: c = 1/4, factor 0.9 x 0.75 / 1.5 = 0.45: t k = 1.35, rho = 0.325 >= c: w = -0.35
        (3.0, 0.25, 0.5, -0.35),
        # rho = -3.8: factor 0.09375 clamped up to 0.1: t k = 0.96, rho = 0.52 accepted: w = 0.04
        (9.6, 0.5, 0.5, 0.04),
        # rho = 0.4: factor 0.75 clamped down to backtrack: t k = 0.6 (backtrack 0.5), 0.72 (0.6)
        (1.2, 0.5, 0.5, 0.4),
        (1.2, 0.5, 0.6, 0.28),
        # ... but not below the factor itself: backtrack 0.8 > 0.75: t k = 0.9, w = 0.1
        (1.2, 0.5, 0.8, 0.1),
    ],
)
def test_gd_armijo_shrink_is_0_9_of_the_quadratic_step_clamped_to_0_1_and_backtrack(tk, c, backtrack, w):
    assert _two_armijo_steps(tk, c, backtrack) == pytest.approx(w, rel=1e-13, abs=1e-15)


# --------------------------------------------------------------------------- CG: curvature threshold


def test_cg_curvature_threshold_is_the_one_passed_and_inclusive():
    A = torch.diag(torch.tensor([0.5, 2.0], dtype=F64))
    b = torch.tensor([1.0, 0.0], dtype=F64)  # Rayleigh quotient along b: exactly 0.5
    # p'Ap <= eps ||p||^2 truncates (docstring): at eps = 0.5 exactly, the first direction is rejected -> b
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=3, curvature_eps=0.5)
    assert bool(info.negative_curvature) and int(info.steps) == 0 and torch.equal(x, b)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=3, curvature_eps=0.49)
    assert not bool(info.negative_curvature) and torch.equal(x, torch.tensor([2.0, 0.0], dtype=F64))
    # the batched function: per row, the same threshold
    B = torch.stack([b, b])
    x, info = batched_conjugate_gradient(lambda v: v @ A, B, max_steps=3, curvature_eps=0.5)
    assert info.negative_curvature.tolist() == [True, True] and torch.equal(x, B)
    x, info = batched_conjugate_gradient(lambda v: v @ A, B, max_steps=3, curvature_eps=0.49)
    assert info.negative_curvature.tolist() == [False, False] and torch.equal(x, 2 * B)


def test_cg_default_curvature_threshold_is_float32_sqrt_eps_in_float64_too_inclusive():
    """Default eps = sqrt(float32 machine eps) = 2^-11.5 = 3.4527e-4 in float32 and float64 alike (a float64
    run judges curvature as the float32 run it checks), sqrt(eps) of a coarser dtype. A Rayleigh quotient q
    along b = e1 (A = diag(q, 1)) truncates at q <= eps and is solved (x = b / q) above it."""
    eps32 = 2.0**-11.5
    assert default_curvature_eps(torch.float32) == eps32 and default_curvature_eps(F64) == eps32
    assert default_curvature_eps(torch.bfloat16) == 2.0**-3.5  # sqrt(2^-7)
    assert default_curvature_eps(torch.float16) == 2.0**-5  # sqrt(2^-10)
    b = torch.tensor([1.0, 0.0], dtype=F64)

    def diag(q, dtype=F64):
        return torch.diag(torch.tensor([q, 1.0], dtype=dtype))

    def solve(q, b=b):
        A = diag(q, b.dtype)
        return conjugate_gradient(lambda v: A @ v, b, max_steps=3)

    x, info = solve(eps32)
    assert bool(info.negative_curvature) and torch.equal(x, b)  # inclusive
    q_up = eps32 * (1 + 2.0**-40)
    x, info = solve(q_up)
    assert not bool(info.negative_curvature) and bool(info.converged)
    torch.testing.assert_close(x, b / q_up, rtol=1e-12, atol=0)
    # batched, per row: one row on the threshold (truncated), one at twice it (solved)
    A2 = torch.stack([diag(eps32), diag(2 * eps32)])
    B = torch.stack([b, b])
    x, info = batched_conjugate_gradient(lambda v: torch.einsum("tij,tj->ti", A2, v), B, max_steps=3)
    assert info.negative_curvature.tolist() == [True, False]
    assert torch.equal(x[0], b) and torch.equal(x[1], b / (2 * eps32))
    # float64's own sqrt(eps) (1.5e-8) would solve a quotient of 1e-6 to x = 1e6 b; both dtypes truncate it
    b32 = b.float()
    for q, truncated in ((1e-6, True), (3.45e-4, True), (3.46e-4, False)):
        for bq in (b, b32):
            x, info = solve(q, bq)
            assert bool(info.negative_curvature) == truncated, (q, bq.dtype)
            assert torch.equal(x, bq) == truncated, (q, bq.dtype)
    # an explicit curvature_eps still wins, also through the CG object
    x, info = conjugate_gradient(lambda v: diag(1e-6) @ v, b, max_steps=3, curvature_eps=1e-8)
    assert not bool(info.negative_curvature)
    torch.testing.assert_close(x, torch.tensor([1e6, 0.0], dtype=F64), rtol=1e-12, atol=0)
    x, info = CG(steps=3, curvature_eps=1e-8)(lambda v: v @ diag(1e-6), b[None])
    assert info.negative_curvature.tolist() == [False]
    x, info = CG(steps=3)(lambda v: v @ diag(1e-6), b[None])
    assert info.negative_curvature.tolist() == [True]


# ------------------------------------------------------------------------------- CG: rtol boundary


def test_cg_stops_on_the_tolerance_boundary_exactly():
    A = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=F64))
    b = torch.ones(4, dtype=F64)  # ||b|| = 2
    # step 1 from 0: alpha = b'b / b'Ab = 4 / 8, r = b - A b / 2 = (1, 1, -1, -1) / 2, ||r|| = 1 = rtol ||b||
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=5, rtol=0.5)
    assert int(info.steps) == 1 and bool(info.converged) and info.residual_norm.item() == 1.0
    assert torch.equal(x, b / 2)
    # ||r0|| = ||b|| = rtol ||b|| with rtol = 1: converged before any step, no matvec spent
    calls = []
    x, info = conjugate_gradient(lambda v: calls.append(1) or A @ v, b, max_steps=5, rtol=1.0)
    assert int(info.steps) == 0 and bool(info.converged) and not calls
    assert torch.equal(x, torch.zeros(4, dtype=F64))
    # a right-hand side of norm exactly 1 is solved, not taken for converged (two eigenvalues: two steps)
    x, info = conjugate_gradient(lambda v: A @ v, b / 2, max_steps=5)
    assert int(info.steps) == 2 and bool(info.converged)
    exact = torch.tensor([0.5, 0.5, 0.5 / 3, 0.5 / 3], dtype=F64)
    torch.testing.assert_close(x, exact, rtol=1e-15, atol=0)
    assert info.steps.dtype == torch.int64  # documented: a step count, not a float


def test_batched_cg_stops_each_row_on_the_tolerance_boundary_exactly():
    """The same boundary per row: with rtol = 1/2, row 0 (b = 1) stops after one step with ||r|| = 1 =
    rtol ||b|| exactly; row 1 (b = (2, 0, 0, 1): first residual (4, 0, 0, -8) / 7, norm 1.28 > rtol ||b|| =
    1.12) goes on to its exact solution in two steps (two eigenvalues)."""
    A = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=F64))
    B = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 1.0]], dtype=F64)
    x, info = batched_conjugate_gradient(lambda v: v @ A, B, max_steps=5, rtol=0.5)
    assert info.steps.tolist() == [1, 2] and info.converged.tolist() == [True, True]
    assert info.residual_norm[0].item() == 1.0 and torch.equal(x[0], B[0] / 2)
    torch.testing.assert_close(x[1], torch.tensor([2.0, 0.0, 0.0, 1 / 3], dtype=F64), rtol=1e-15, atol=0)
    # rtol = 1: both rows converged at x = 0 before any matvec
    calls = []
    x, info = batched_conjugate_gradient(lambda v: calls.append(1) or v @ A, B, max_steps=5, rtol=1.0)
    assert info.steps.tolist() == [0, 0] and info.converged.tolist() == [True, True] and not calls
    assert torch.equal(x, torch.zeros_like(B))


# ------------------------------------------------------------------------- HF: its CG's tolerance


def test_hessian_free_solves_its_newton_system_to_cg_rtol_1e_12():
    """HF's CG runs to ||r|| <= 1e-12 ||g||. On a quadratic (eigenvalues 1 .. 100, n = 60, from 0) one HF step
    with CG steps to spare lands where that rule stops CG, and ||grad G(phi)|| = ||r||: measured
    3.6e-13 ||g||. CG's residual falls ~10x per step there (measured with the public CG and a dense matvec:
    rtol 1e-11 stops at 3.8e-12, 1e-13 at 8.1e-14), so a tolerance of 1e-11 or 1e-13 (or CG's default
    1e-10) would land outside (1e-13, 1e-12]."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    A = q @ torch.diag(torch.linspace(1, 100, n, dtype=F64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=F64)
    lam = 1e-3
    theta = {"w": torch.zeros(n, dtype=F64)}
    phi, info = HessianFree(steps=1, cg_steps=400, damping=0.0, adapt_damping=False)(
        lambda p: 0.5 * p["w"] @ A @ p["w"] - b @ p["w"], theta, lam
    )
    assert info.accepted.item() == 1
    rel = ((A @ phi["w"] - b + lam * phi["w"]).norm() / b.norm()).item()
    print(f"HF Newton step: ||grad G|| / ||g|| = {rel:.2e}")
    assert 1e-13 < rel <= 1e-12
    # the neighbours, with the public CG on the same system, are outside the window
    M = A + lam * torch.eye(n, dtype=F64)
    for rtol in (1e-11, 1e-13):
        x, _ = batched_conjugate_gradient(lambda v: v @ M, b[None], 400, rtol=rtol)
        r = ((M @ x[0] - b).norm() / b.norm()).item()
        assert not 1e-13 < r <= 1e-12, (rtol, r)


# ------------------------------------------------------------------------- implicit: the default CG budget


def test_implicit_meta_gradient_takes_5_cg_steps_by_default():
    """On a quadratic support loss 1/2 p^T H p (H SPD, 8 distinct eigenvalues) the default call returns the
    5-step Krylov minimiser of (I + H / lam) x = g, told apart from 4 and 6 steps."""
    g0 = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g0, dtype=F64))
    H = Q @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], dtype=F64)) @ Q.T
    g = torch.randn(8, generator=g0, dtype=F64)
    lam = 2.0
    A = torch.eye(8, dtype=F64) + H / lam
    out = implicit_meta_gradient(
        lambda p: 0.5 * p["x"] @ H @ p["x"], {"x": torch.zeros(8, dtype=F64)}, {"x": g}, lam
    )
    assert rel(out.grad["x"], krylov_minimiser(A, g, 5)) < 1e-10
    for other in (4, 6):
        assert rel(krylov_minimiser(A, g, other), krylov_minimiser(A, g, 5)) > 1e-4
