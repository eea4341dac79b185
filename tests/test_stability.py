"""Inner-solve stability (issue 11) on real Omniglot: the safeguarded solver ``gd_armijo`` against fixed-step
GD from a theta whose support curvature is beyond fixed-step GD's reach, the diagnostics that report it,
the batched safeguarded solver against the looped one, and the watchdog warning of the learners.

Setting: ``OmniglotConv4(5, head_init="paper")`` (the official Xavier head), 4 fixed 5-way 1-shot
meta-training tasks of the paper split, lam 2, largest / fixed step 0.1. Fixed-step GD on
G = L_s + lam/2 ||phi - theta||^2 is stable only while the top support-Hessian eigenvalue stays below
2/lr - lam = 18; here it is ~300.
The objective along the iterates is computed independently of the solvers (``proximal_objective`` at the
phi returned after k = 0..20 steps; both solvers are deterministic, so these are the iterates of one run).
Measured (torch 2.14.1, CPU, float32): gd_armijo never rises, residual after 20 steps 0.221-0.265;
fixed-step GD rises by 3.6-4.2 at its first step, residual 0.371-1.06.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_imaml.diagnostics import hessian_top_eigenvalue
from lightning_imaml.inner import GDArmijo, proximal_adapt, proximal_objective
from lightning_imaml.metagrad import adapt_tasks, make_task_loss
from lightning_imaml.models import OmniglotConv4
from lightning_imaml.params import ParamSpec
from lightning_imaml.watchdog import SolveWatchdog

ROOT = os.environ.get("IMAML_OMNIGLOT_ROOT") or str(
    Path(__file__).resolve().parents[2] / "shared" / "omniglot"
)
HAVE_OMNIGLOT = (Path(ROOT) / "omniglot-py" / "images_background").is_dir()
needs_omniglot = pytest.mark.skipif(
    not HAVE_OMNIGLOT, reason=f"Omniglot not found at {ROOT} (set IMAML_OMNIGLOT_ROOT)"
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

LAM, LR, K = 2.0, 0.1, 20
RESIDUAL_TOL = 0.32  # gd_armijo measured <= 0.265 after 20 steps; fixed-step GD >= 0.371


@pytest.fixture(scope="module")
def setting():
    from inner_stability import probe_tasks

    tasks = probe_tasks(4, seed=7)
    torch.manual_seed(0)
    model = OmniglotConv4(5, head_init="paper")
    theta = {k: v.detach() for k, v in model.named_parameters()}
    return model, theta, tasks


def _norm(params) -> float:
    return ParamSpec.of(params).flatten(params).norm().item()


def _trajectory(loss, theta, optimizer, ks=range(K + 1)):
    """G at the iterates after k steps (k in ``ks``, last K) and ||grad G|| at the last one, computed outside
    the solver."""
    values = []
    for k in ks:
        phi, _ = proximal_adapt(loss, theta, LAM, k, optimizer=optimizer, lr=LR)
        with torch.no_grad():
            values.append(proximal_objective(loss, phi, theta, LAM).item())
    p = {n: v.clone().requires_grad_(True) for n, v in phi.items()}
    g = torch.autograd.grad(proximal_objective(loss, p, theta, LAM), list(p.values()))
    return values, _norm(dict(zip(p, g, strict=True)))


@needs_omniglot
def test_safeguarded_solver_is_monotone_and_converges_where_fixed_step_gd_is_not(setting):
    model, theta, tasks = setting
    for sx, sy in tasks:
        loss = make_task_loss(model, sx, sy, F.cross_entropy)
        eig = hessian_top_eigenvalue(loss, theta)
        assert eig > 2 / LR - LAM, f"precondition: curvature {eig:.1f} must exceed 2/lr - lam"

        values, residual = _trajectory(loss, theta, "gd_armijo")
        rises = [b - a for a, b in zip(values, values[1:], strict=False)]
        assert max(rises) <= 1e-6 * abs(values[0]), f"gd_armijo objective rose: {values}"
        assert values[-1] < 0.5 * values[0]
        assert residual < RESIDUAL_TOL, residual
        _, info = proximal_adapt(loss, theta, LAM, K, optimizer="gd_armijo", lr=LR)
        assert not info.rose
        assert abs(info.residual.item() - residual) <= 1e-4 * residual  # the reported delta is the true one
        assert abs(info.objective.item() - values[-1]) <= 1e-5 * abs(values[-1])
        assert 0 < info.accepted.item() < K  # it rejected the too-long first steps and then moved
        assert info.iterations.item() == K  # no tolerance: every step tried

        values, residual = _trajectory(loss, theta, "gd", ks=(0, 1, K))
        assert values[1] - values[0] > 1.0  # G jumps at step 1
        assert residual > RESIDUAL_TOL, residual
        _, info = proximal_adapt(loss, theta, LAM, K, optimizer="gd", lr=LR)
        assert info.rose and info.accepted.item() == K == info.iterations.item()
        assert abs(info.residual.item() - residual) <= 1e-4 * residual


@needs_omniglot
def test_batched_safeguarded_solver_equals_looped_per_task(setting):
    """The 4 tasks solved at once (one [T, P] problem, the native batched forward) against each task solved
    on its own with dicts: the same accept / reject decisions per task (accepted counts differ between
    tasks, so the masks are exercised) and the same phi to float32 rounding."""
    model, theta, tasks = setting
    sx = torch.stack([t[0] for t in tasks])
    sy = torch.stack([t[1] for t in tasks])
    solver = GDArmijo(steps=K, lr=LR)
    phi_b, info_b = adapt_tasks(
        model, theta, sx, sy, loss_fn=F.cross_entropy, lam=LAM, solver=solver, mode="auto"
    )
    accepted = []
    for i, (x, y) in enumerate(tasks):
        phi, info = proximal_adapt(
            make_task_loss(model, x, y, F.cross_entropy), theta, LAM, K, optimizer="gd_armijo", lr=LR
        )
        assert info.accepted.item() == info_b.accepted[i].item()
        assert info.iterations.item() == info_b.iterations[i].item() == K
        assert bool(info.rose) == bool(info_b.rose[i])
        err = _norm({k: phi_b[k][i] - phi[k] for k in phi}) / _norm(phi)
        assert err < 1e-5, err
        assert abs(info.residual.item() - info_b.residual[i].item()) <= 1e-3 * info.residual.item()
        assert abs(info.residual0.item() - info_b.residual0[i].item()) <= 1e-5 * info.residual0.item()
        accepted.append(info.accepted.item())
    assert len(set(accepted)) > 1, accepted


def test_watchdog_warns_once_after_patience_failing_steps():
    """SolveWatchdog directly: a meta-step fails when most (> half) of its tasks' objective rose or their
    residual ended above the starting gradient norm; the message comes once, after ``patience`` failing
    steps in a row, and a good step starts the count again."""

    def step(rose, rel):
        return {"inner_rose": torch.tensor(rose), "inner_residual_rel": torch.tensor(rel)}

    failing = step([1.0, 1.0, 0.0], [0.1, 0.1, 0.1])  # 2 of 3 rose
    also_failing = step([0.0, 0.0, 0.0], [2.0, 1.5, 0.5])  # 2 of 3 ended above their start
    half = step([1.0, 0.0], [0.5, 0.5])  # exactly half: not "most"
    fine = step([0.0, 0.0, 0.0], [0.5, 1.0, 0.2])  # residual_rel 1.0 is not above 1

    dog = SolveWatchdog()
    assert dog.patience == 20
    messages = [dog.update(failing if i % 2 else also_failing, "gd") for i in range(19)]
    assert messages == [None] * 19
    message = dog.update(failing, "gd")
    assert message is not None and "'gd'" in message and "gd_armijo" in message
    assert "20 meta-steps" in message
    assert "0.67" in message  # the share of tasks that rose
    assert all(dog.update(failing, "gd") is None for _ in range(30))  # once, not at every further step

    dog = SolveWatchdog(patience=3)
    assert [dog.update(s, "sgd") for s in (failing, failing, half)] == [None, None, None]  # reset by half
    assert [dog.update(s, "sgd") for s in (failing, failing, fine, failing, failing)] == [None] * 5
    assert dog.update(failing, "sgd") is not None and dog.failures == 3
    # a learner without inner-solve diagnostics (MAML) never triggers it
    assert SolveWatchdog(patience=1).update({"query_loss": torch.ones(2)}, "gd") is None


@needs_omniglot
def test_training_logs_inner_metrics_and_warns_when_solves_keep_failing(setting):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_imaml import IMAML

    _, _, tasks = setting
    sx = torch.stack([t[0] for t in tasks[:2]])
    sy = torch.stack([t[1] for t in tasks[:2]])
    batch = (sx, sy, sx.clone(), sy.clone())
    steps = SolveWatchdog().patience  # the learners' default: a warning after 20 failing meta-steps

    def fit(max_steps, **kw):
        torch.manual_seed(0)
        learner = IMAML(
            OmniglotConv4(5, hidden=16, head_init="paper"), inner_steps=3, cg_steps=2, batched_tasks=False,
            optimizer=functools.partial(torch.optim.SGD, lr=0.0),  # theta stays: every step, the same solves
            **kw,
        )  # fmt: skip
        tr = pl.Trainer(
            max_steps=max_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr.fit(learner, DataLoader([batch] * max_steps, batch_size=None))
        return tr.logged_metrics, [
            str(w.message) for w in caught if "inner solves keep failing" in str(w.message)
        ]

    # fixed-step GD with a step far beyond the curvature: every solve rises -> the warning names the fix,
    # after 20 failing steps and not before
    logged, warned = fit(steps - 1, inner_optimizer="gd", inner_lr=1.0)
    keys = ("inner_residual", "inner_residual_max", "inner_residual_rel", "inner_rose", "inner_accepted",
            "inner_iterations", "cg_residual", "cg_residual_max", "cg_steps", "loss", "support_loss", "acc",
            "skipped_steps")  # fmt: skip
    for key in keys:
        assert f"train/{key}" in logged, key
    assert logged["train/inner_rose"] == 1.0
    assert logged["train/inner_iterations"] == 3.0 == logged["train/inner_accepted"]
    assert not warned
    logged, warned = fit(steps, inner_optimizer="gd", inner_lr=1.0)
    assert len(warned) == 1 and "gd_armijo" in warned[0] and "'gd'" in warned[0]
    # the safeguarded default at the same largest step: no rise, no warning
    logged, warned = fit(steps, inner_lr=1.0)
    assert logged["train/inner_rose"] == 0.0 and not warned
    assert logged["train/inner_residual_max"] >= logged["train/inner_residual"] > 0
    assert logged["train/inner_iterations"] == 3.0 >= logged["train/inner_accepted"]
