"""Tests of lightning_imaml.cg (truncated conjugate gradient) against independent ground truths: dense solves
(torch.linalg.solve), systems with a known number of distinct eigenvalues, and the single-system solver row by
row for the batched one. Measured errors are printed (pytest -s).

The constants CG's rules are built on (the rtol boundary, the curvature threshold's default and inclusiveness)
are pinned in tests/test_constants.py, not here."""

import dataclasses
import math

import pytest
import torch
from helpers import rel

from lightning_imaml.cg import CG, CGInfo, batched_conjugate_gradient, conjugate_gradient
from lightning_imaml.params import ParamSpec

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_spd(n, cond, gen, dtype=torch.float64):
    """Q diag(logspace(1, cond)) Q^T: SPD with condition number ``cond``."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    eig = torch.logspace(0, math.log10(cond), n, dtype=dtype)
    return q @ torch.diag(eig) @ q.T


def with_spectrum(eig, gen):
    """Q diag(eig) Q^T for a random orthogonal Q (float64)."""
    n = eig.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(eig.double()) @ q.T


# ------------------------------------------------------------------------------------- one system


@pytest.mark.parametrize("n", [10, 30, 50])
def test_cg_matches_dense_solve_on_random_spd(n):
    gen = torch.Generator().manual_seed(n)
    M = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = M @ M.T / n + torch.eye(n, dtype=torch.float64)  # random SPD, like I + H/lam with H = M M^T / n
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=n, rtol=0.0)
    err = rel(x, torch.linalg.solve(A, b))
    print(f"CG random SPD n={n} cond={torch.linalg.cond(A):.1f}: {info.steps} steps, rel err {err:.2e}")
    assert isinstance(info, CGInfo) and int(info.steps) == n and not bool(info.negative_curvature)
    assert all(f.dim() == 0 for f in info) and info.steps.dtype == torch.int64  # one system: 0-d fields
    assert err < 1e-10
    # the reported residual is ||b - A x|| (as tracked by the recurrence: equal to rounding)
    assert abs(info.residual_norm.item() - (b - A @ x).norm().item()) < 1e-10 * b.norm().item()


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
    assert err < 1e-10 and bool(info.converged)


def test_cg_exact_at_n_steps_on_dicts():
    gen = torch.Generator().manual_seed(1)
    n = 12
    A = random_spd(n, 20.0, gen)
    spec = ParamSpec.of({"w": torch.zeros(3, 3), "b": torch.zeros(3)})
    b = spec.unflatten(torch.randn(n, generator=gen, dtype=torch.float64))

    def matvec(v):
        return spec.unflatten(A @ spec.flatten(v))

    x, info = conjugate_gradient(matvec, b, max_steps=n, rtol=0.0)
    err = rel(spec.flatten(x), torch.linalg.solve(A, spec.flatten(b)))
    print(f"CG on dict, n={n} steps: rel err={err:.2e}")
    assert set(x) == {"w", "b"} and x["w"].shape == (3, 3) and x["b"].shape == (3,)
    assert err < 1e-10


def test_cg_on_a_matrix_shaped_unknown_keeps_its_shape():
    gen = torch.Generator().manual_seed(11)
    A = random_spd(6, 10.0, gen)
    b = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: (A @ v.reshape(6)).reshape(2, 3), b, max_steps=6, rtol=0.0)
    assert x.shape == (2, 3)
    assert rel(x.reshape(6), torch.linalg.solve(A, b.reshape(6))) < 1e-10


def test_cg_matvec_count_and_x0():
    gen = torch.Generator().manual_seed(2)
    A = random_spd(8, 5.0, gen)
    b = torch.randn(8, generator=gen, dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    _, info = conjugate_gradient(matvec, b, max_steps=3, rtol=0.0)
    assert int(info.steps) == 3 and len(calls) == 3  # no matvec spent on b - A*0
    calls.clear()
    x_star = torch.linalg.solve(A, b)
    x, info = conjugate_gradient(matvec, b, max_steps=5, x0=x_star)
    assert int(info.steps) == 0 and bool(info.converged) and len(calls) == 1  # one matvec for b - A x0
    assert rel(x, x_star) < 1e-12
    x, info = conjugate_gradient(matvec, torch.zeros_like(b), max_steps=5)
    assert bool(info.converged) and int(info.steps) == 0 and torch.all(x == 0)
    # a rough x0: CG minimises over x0 + K_k(A, b - A x0), so after n more steps it is the solution
    calls.clear()
    x0 = x_star + 0.3 * torch.randn(8, generator=gen, dtype=torch.float64)
    x, info = conjugate_gradient(matvec, b, max_steps=8, rtol=0.0, x0=x0)
    assert rel(x, x_star) < 1e-10 and len(calls) == 1 + int(info.steps)


def test_cg_x0_on_dicts():
    gen = torch.Generator().manual_seed(12)
    A = random_spd(5, 8.0, gen)
    spec = ParamSpec.of({"a": torch.zeros(2), "c": torch.zeros(3)})
    b = spec.unflatten(torch.randn(5, generator=gen, dtype=torch.float64))
    x0 = spec.unflatten(torch.randn(5, generator=gen, dtype=torch.float64))
    x, _ = conjugate_gradient(lambda v: spec.unflatten(A @ spec.flatten(v)), b, 5, rtol=0.0, x0=x0)
    assert rel(spec.flatten(x), torch.linalg.solve(A, spec.flatten(b))) < 1e-10


def test_cg_indefinite_stops_on_negative_curvature():
    gen = torch.Generator().manual_seed(3)
    n = 20
    eig = torch.linspace(0.5, 3.0, n, dtype=torch.float64)
    eig[:3] = torch.tensor([-5.0, -1.0, -0.2], dtype=torch.float64)  # like I + H/lam with H < -lam
    A = with_spectrum(eig, gen)
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=n)
    print(f"indefinite CG: stopped after {info.steps} steps, residual {info.residual_norm:.3e}")
    assert bool(info.negative_curvature) and not bool(info.converged)
    assert 0 <= int(info.steps) < n
    assert torch.isfinite(x).all() and x.norm() < 1e3 * b.norm()
    # every accepted iterate lowers q(x) = x'Ax/2 - b'x, so the truncated answer beats x = 0
    assert (0.5 * x @ A @ x - b @ x).item() < 0
    # and it is the iterate of the same number of steps of plain CG (truncation keeps the last iterate)
    x_k, info_k = conjugate_gradient(lambda v: A @ v, b, max_steps=int(info.steps), rtol=0.0)
    assert not bool(info_k.negative_curvature) and rel(x, x_k) < 1e-12


def test_cg_first_direction_negative_returns_b():
    b = torch.tensor([1.0, -2.0, 3.0])
    x, info = conjugate_gradient(lambda v: -v, b, max_steps=5)
    assert bool(info.negative_curvature) and int(info.steps) == 0
    torch.testing.assert_close(x, b)  # A replaced by I: the first-order answer, not zero
    assert info.residual_norm.item() == pytest.approx(b.norm().item())  # the residual of x0 = 0
    x, info = conjugate_gradient(lambda v: v * float("nan"), b, max_steps=5)
    assert bool(info.negative_curvature) and torch.isfinite(x).all()
    torch.testing.assert_close(x, b)
    # from x0 the fallback is x0 + r0 = x0 + b - A x0
    x0 = torch.tensor([0.5, 0.5, 0.5])
    x, info = conjugate_gradient(lambda v: -v, b, max_steps=5, x0=x0)
    assert bool(info.negative_curvature) and int(info.steps) == 0
    torch.testing.assert_close(x, x0 + (b + x0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_cg_dtypes_devices(dtype, device):
    gen = torch.Generator().manual_seed(4)
    A = random_spd(6, 4.0, gen).to(dtype=dtype, device=device)
    b = torch.randn(6, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_steps=12, rtol=1e-6)
    assert x.dtype == dtype and x.device.type == device
    assert rel(x.double().cpu(), torch.linalg.solve(A.double(), b.double()).cpu()) < 1e-4
    assert bool(info.converged)


def test_cg_bad_input():
    for steps in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="max_steps"):
            conjugate_gradient(lambda v: v, torch.ones(2), max_steps=steps)
    with pytest.raises(ValueError, match="rtol"):
        conjugate_gradient(lambda v: v, torch.ones(2), max_steps=2, rtol=-0.1)
    with pytest.raises(ValueError, match=r"x0.*\(3,\)"):
        conjugate_gradient(lambda v: v, torch.ones(2), max_steps=2, x0=torch.ones(3))
    with pytest.raises(ValueError, match=r"x0"):  # a tensor b with a dict x0
        conjugate_gradient(lambda v: v, torch.ones(2), max_steps=2, x0={"b": torch.ones(2)})
    with pytest.raises(ValueError, match=r"only in x0: \['v'\]"):
        conjugate_gradient(lambda v: v, {"w": torch.ones(2)}, 2, x0={"w": torch.ones(2), "v": torch.ones(1)})
    with pytest.raises(ValueError, match=r"b is torch.int64"):
        conjugate_gradient(lambda v: v, torch.ones(2, dtype=torch.int64), max_steps=2)
    with pytest.raises(ValueError, match=r"w is torch.int32"):
        conjugate_gradient(lambda v: v, {"v": torch.ones(2), "w": torch.ones(2, dtype=torch.int32)}, 2)


# ------------------------------------------------------------------------------- T systems at once


def _padded(A_small, b_small, N):
    """A system of size n embedded in size N: blockdiag(A, I) and (b, 0). From x = 0 CG never leaves the first
    n coordinates (r and p stay 0 there), so it does exactly what CG on (A, b) does."""
    n = A_small.shape[0]
    A = torch.eye(N, dtype=A_small.dtype)
    A[:n, :n] = A_small
    b = torch.zeros(N, dtype=b_small.dtype)
    b[:n] = b_small
    return A, b


def _batch_of_systems(gen, N=12):
    """Rows of different size and conditioning: (small A, small b) per row."""
    systems = [
        (with_spectrum(torch.tensor([1.0, 1.0, 1.0, 4.0, 4.0, 4.0]), gen), None),  # 2 distinct eigenvalues
        (random_spd(N, 50.0, gen), None),  # full size, ill-conditioned: every step
        (random_spd(5, 3.0, gen), None),  # small, well-conditioned: 5 steps
        (with_spectrum(torch.tensor([-3.0, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0]), gen), None),  # indefinite
        (with_spectrum(torch.tensor([-1.0, -2.0, 0.1]), gen), None),  # first direction negative
        (random_spd(4, 10.0, gen), "zero"),  # b = 0: converged before any step
    ]
    out = []
    for A, kind in systems:
        b = torch.randn(A.shape[0], generator=gen, dtype=torch.float64)
        if kind == "zero":
            b = torch.zeros_like(b)
        if A.shape[0] == 3:  # make b'Ab < 0 for the first direction
            evals, evecs = torch.linalg.eigh(A)
            b = evecs[:, 0] + 0.1 * evecs[:, 2]
        out.append((A, b))
    return out


@pytest.mark.parametrize("rtol", [1e-10, 1e-3])
def test_batched_cg_rows_equal_separate_single_system_solves(rtol):
    gen = torch.Generator().manual_seed(7)
    N = 12
    systems = _batch_of_systems(gen, N)
    padded = [_padded(A, b, N) for A, b in systems]
    As = torch.stack([A for A, _ in padded])
    B = torch.stack([b for _, b in padded])
    calls = []

    def matvec(V):
        calls.append(1)
        return torch.stack([A @ v for A, v in zip(As, V, strict=True)])

    X, info = batched_conjugate_gradient(matvec, B, max_steps=2 * N, rtol=rtol)
    assert X.shape == B.shape and all(f.shape == (len(systems),) for f in info)
    singles = [conjugate_gradient(lambda v, A=A: A @ v, b, max_steps=2 * N, rtol=rtol) for A, b in systems]
    steps = [int(s) for s in info.steps]
    print(f"batched CG rtol={rtol}: steps per row {steps}, negative {info.negative_curvature.tolist()}")
    for t, ((A, b), (x1, i1)) in enumerate(zip(systems, singles, strict=True)):
        n = A.shape[0]
        assert int(info.steps[t]) == int(i1.steps), t
        assert bool(info.negative_curvature[t]) == bool(i1.negative_curvature), t
        assert bool(info.converged[t]) == bool(i1.converged), t
        assert rel(X[t, :n], x1) < 1e-12 if x1.norm() > 0 else torch.all(X[t] == 0), t
        assert torch.all(X[t, n:] == 0), t  # the padding is untouched
        assert abs(info.residual_norm[t].item() - i1.residual_norm.item()) <= 1e-12 * max(
            b.norm().item(), 1e-300
        )
    # ground truths per row, independent of the single-system code (error <= cond(A) * rtol)
    for t, cond in ((0, 4.0), (1, 50.0), (2, 3.0)):
        assert rel(X[t, : systems[t][0].shape[0]], torch.linalg.solve(*systems[t])) < max(
            cond * rtol, 1e-8
        ), t
    assert bool(info.negative_curvature[3]) and not bool(info.converged[3])
    assert bool(info.negative_curvature[4]) and steps[4] == 0 and torch.equal(X[4, :3], systems[4][1])
    assert steps[5] == 0 and bool(info.converged[5]) and torch.all(X[5] == 0)
    assert not info.negative_curvature[[0, 1, 2, 5]].any()
    if rtol == 1e-10:
        # each row stops on its own: 2 distinct eigenvalues -> 2 steps, size 5 -> 5, the ill-conditioned
        # full-size row keeps going after the others have stopped
        assert steps[0] == 2 and steps[2] == 5 and steps[1] > max(steps[0], steps[2], steps[3])
        assert bool(info.converged[[0, 1, 2]].all())
    # the loop runs until the last row stops: one matvec per update, one more on a curvature stop
    per_row = [s + int(neg) for s, neg in zip(steps, info.negative_curvature.tolist(), strict=True)]
    assert len(calls) == max(per_row)


def test_batched_cg_max_steps_truncates_every_row_and_x0_is_per_row():
    gen = torch.Generator().manual_seed(8)
    As = torch.stack([random_spd(7, c, gen) for c in (5.0, 40.0, 200.0)])
    B = torch.randn(3, 7, generator=gen, dtype=torch.float64)

    def matvec(V):
        return torch.einsum("tij,tj->ti", As, V)

    X, info = batched_conjugate_gradient(matvec, B, max_steps=3, rtol=0.0)
    assert info.steps.tolist() == [3, 3, 3] and not info.converged.any()
    for t in range(3):
        x1, _ = conjugate_gradient(lambda v, A=As[t]: A @ v, B[t], max_steps=3, rtol=0.0)
        assert rel(X[t], x1) < 1e-12
    # x0 per row: row 0 starts at its solution (no update), the others from rough starts
    sol = torch.linalg.solve(As, B)
    X0 = (
        sol
        + torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64)[:, None]
        * torch.randn(3, 7, generator=gen).double()
    )
    X, info = batched_conjugate_gradient(matvec, B, max_steps=20, rtol=1e-12, x0=X0)
    assert int(info.steps[0]) == 0 and bool(info.converged.all())
    assert rel(X, sol) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_batched_cg_dtypes_devices(dtype, device):
    gen = torch.Generator().manual_seed(9)
    As = torch.stack([random_spd(6, c, gen) for c in (2.0, 8.0)]).to(dtype=dtype, device=device)
    B = torch.randn(2, 6, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    X, info = batched_conjugate_gradient(lambda V: torch.einsum("tij,tj->ti", As, V), B, 12, rtol=1e-6)
    assert X.dtype == dtype and X.device.type == device and info.steps.device.type == device
    assert rel(X.double().cpu(), torch.linalg.solve(As.double(), B.double()).cpu()) < 1e-4


def test_batched_cg_bad_input():
    with pytest.raises(ValueError, match=r"b must be \[T, N\].*\(3,\)"):
        batched_conjugate_gradient(lambda v: v, torch.ones(3), 2)
    with pytest.raises(ValueError, match=r"b must be \[T, N\].*\(1, 2, 3\)"):
        batched_conjugate_gradient(lambda v: v, torch.ones(1, 2, 3), 2)
    with pytest.raises(ValueError, match=r"b is torch.int64"):
        batched_conjugate_gradient(lambda v: v, torch.ones(2, 3, dtype=torch.int64), 2)
    for steps in (0, 2.0, False):
        with pytest.raises(ValueError, match="max_steps"):
            batched_conjugate_gradient(lambda v: v, torch.ones(2, 3), steps)
    with pytest.raises(ValueError, match="rtol"):
        batched_conjugate_gradient(lambda v: v, torch.ones(2, 3), 2, rtol=float("nan"))
    with pytest.raises(ValueError, match=r"x0.*\(2, 4\)"):
        batched_conjugate_gradient(lambda v: v, torch.ones(2, 3), 2, x0=torch.ones(2, 4))


def test_cg_dataclass_is_batched_cg_with_its_options_bound():
    gen = torch.Generator().manual_seed(10)
    As = torch.stack([random_spd(8, c, gen) for c in (3.0, 30.0)])
    B = torch.randn(2, 8, generator=gen, dtype=torch.float64)

    def matvec(V):
        return torch.einsum("tij,tj->ti", As, V)

    assert CG() == CG(steps=5, rtol=1e-10)  # the defaults
    for cg in (CG(), CG(steps=3), CG(steps=8, rtol=0.0), CG(steps=20, rtol=1e-2)):
        X, info = cg(matvec, B)
        X_ref, info_ref = batched_conjugate_gradient(matvec, B, cg.steps, cg.rtol)
        assert torch.equal(X, X_ref) and all(torch.equal(a, b) for a, b in zip(info, info_ref, strict=True))
    X, _ = CG(steps=8, rtol=0.0)(matvec, B)
    assert rel(X, torch.linalg.solve(As, B)) < 1e-8
    with pytest.raises(dataclasses.FrozenInstanceError):
        CG().steps = 3
    assert len({CG(), CG(steps=5), CG(steps=6)}) == 2  # frozen: hashable, equal by value
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match="steps"):
            CG(steps=steps)
    with pytest.raises(ValueError, match="rtol"):
        CG(rtol=-1.0)


# ------------------------------------------------------------------------------------- defaults and messages


def test_default_rtol_solves_to_near_machine_precision():
    """The default rtol (1e-10) is a real tolerance: a well-conditioned 8 x 8 system given 50 steps ends at
    the dense solution to 1e-9 and reports convergence (a default near 1 would stop before the first step)."""
    gen = torch.Generator().manual_seed(0)
    A = random_spd(8, 10.0, gen)
    b = torch.randn(2, 8, generator=gen, dtype=torch.float64)
    x, info = batched_conjugate_gradient(lambda v: v @ A, b, 50)
    assert rel(x, torch.linalg.solve(A, b.T).T) < 1e-9
    assert bool(info.converged.all()) and bool((info.steps >= 8).all())
    y, single = conjugate_gradient(lambda v: A @ v, b[0], 50)
    assert rel(y, torch.linalg.solve(A, b[0])) < 1e-9 and bool(single.converged)


def test_rtol_is_relative_to_the_norm_of_b():
    """Scaling b by 1e4 must not change how many steps a relative tolerance takes (A = diag(1..8), rtol 1e-2):
    the count equals that of an independent CG loop stopping at ||r|| <= rtol ||b||."""
    A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    b0 = torch.ones(8, dtype=torch.float64)

    def reference_steps(b, rtol):
        x, r = torch.zeros_like(b), b.clone()
        p, k = r.clone(), 0
        while r.norm() > rtol * b.norm():
            Ap = A @ p
            alpha = (r @ r) / (p @ Ap)
            x, r_new = x + alpha * p, r - alpha * Ap
            p, r, k = r_new + (r_new @ r_new) / (r @ r) * p, r_new, k + 1
        return k

    expected = reference_steps(b0, 1e-2)
    assert 1 < expected < 8  # stops early, so the tolerance decides the count
    for scale in (1e-4, 1.0, 1e4):
        _, info = batched_conjugate_gradient(lambda v: v @ A, scale * b0[None], 20, rtol=1e-2)
        assert info.steps.item() == expected, scale
        assert bool(info.converged.all())


def test_a_given_curvature_threshold_is_used():
    """curvature_eps replaces the dtype default: on diag(1, 2) (p^T A p >= ||p||^2) a threshold of 5 flags
    every first direction as non-positive curvature, the default flags none; in both solvers."""
    A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    _, info = batched_conjugate_gradient(lambda v: v @ A, b, 5)
    assert not bool(info.negative_curvature.any())
    _, info = batched_conjugate_gradient(lambda v: v @ A, b, 5, curvature_eps=5.0)
    assert bool(info.negative_curvature.all())
    _, single = conjugate_gradient(lambda v: A @ v, b[0], 5, curvature_eps=5.0)
    assert bool(single.negative_curvature)


def test_messages_name_the_bad_argument():
    b = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"b has shape \(2, 3\), x0 has \(2, 4\)"):
        batched_conjugate_gradient(lambda v: v, b, 3, x0=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"b has shape \(3,\), x0 has \(4,\)"):
        conjugate_gradient(lambda v: v, b[0], 3, x0=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"max_steps must be an integer >= 1, got max_steps=0"):
        batched_conjugate_gradient(lambda v: v, b, 0)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got steps=0"):
        CG(steps=0)
