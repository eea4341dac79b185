"""A meta-batch in chunks of tasks (lightning_imaml.batched): chunks of several tasks (one batched
forward, mode "native" or "vmap") against chunks of one task (the per-task loop, mode "loop"), the chunk-size
tuner, the batching probe and the per-task summary.

Reference: ``run_chunked(fn, tasks, 1)``, every task on its own through ``functional_call``. Meta-gradients
are compared per task by a relative norm (conv biases before BatchNorm have a true gradient of zero, so a
per-entry comparison would compare rounding noise). Every float64 comparison checks first that the tasks took
different numbers of inner iterations / accepted steps / CG steps, so that the per-task masks matter.

Removed with the old batched API, so no longer tested here: vmap_tasks and its chunk_size checks,
BatchingUnsupported, BATCHED_INNER_OPTIMIZERS, imaml_batched_meta_gradient, batched_proximal_adapt,
batched_forward and the spies on batched.vmap / metagrad._autocast_ctx (monkeypatching). What they checked
moved: batched BatchNorm statistics per task and the forward of every mode to tests/test_functional.py;
options and autocast reaching every forward to tests/test_metagrad.py; the module's fallback to the loop
belongs to the Lightning module (tests/test_meta.py).
"""

from __future__ import annotations

import math
import re
import time
import warnings
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyCNN, params_of, tiny_batch
from torch import nn

from lightning_imaml.batched import (
    ChunkTuner,
    cat_results,
    choose_chunk_size,
    probe_batching,
    run_chunked,
    summarise_tasks,
)
from lightning_imaml.cg import CG, batched_conjugate_gradient, conjugate_gradient
from lightning_imaml.functional import ForwardCast, mse_loss
from lightning_imaml.inner import (
    GD,
    LBFGS,
    SGD,
    SOLVERS,
    Adam,
    GDArmijo,
    HessianFree,
    InnerInfo,
    TorchOptimizer,
)
from lightning_imaml.metagrad import (
    TaskResults,
    adapt_tasks,
    fomaml_meta_gradient,
    imaml_meta_gradient,
    make_task_loss,
    maml_meta_gradient,
)
from lightning_imaml.models import OmniglotConv4
from lightning_imaml.params import ParamSpec

# per solver, for TinyCNN / tiny_batch at lam 0.2: chosen so that the tasks differ in inner iterations (a
# tolerance stops them at different steps) or in accepted steps (line searches reject some trials)
TINY_SOLVERS = {
    "gd_armijo": GDArmijo(steps=6, lr=1.0),
    "gd": GD(steps=6, lr=0.3, tol=0.2),
    "sgd": SGD(steps=6, lr=0.2, momentum=0.9, nesterov=True, tol=0.2),
    "adam": Adam(steps=6, lr=0.05, betas=(0.8, 0.9), amsgrad=True, tol=0.5),
    "torch": TorchOptimizer(steps=6, lr=0.02, torch_optimizer=torch.optim.RMSprop, tol=0.5),
    "lbfgs": LBFGS(steps=6, lr=1.0, history_size=3),
    "hf": HessianFree(steps=3, lr=1.0, tol=0.5),
}
COUNTS = ("inner_accepted", "inner_iterations", "cg_steps", "cg_negative_curvature", "inner_rose")


def test_every_registered_solver_is_covered():
    assert set(TINY_SOLVERS) == set(SOLVERS)


def row_errors(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Relative difference of every row (task) of two [T, P] tensors."""
    return ((a - b).double().norm(dim=1) / b.double().norm(dim=1)).tolist()


def imaml_fn(model, theta, solver, lam, cg, forced=None):
    """A chunk -> TaskResults function for run_chunked; ``forced`` replaces its mode for chunks of several
    tasks."""

    def fn(chunk, mode):
        mode = forced if forced and mode != "loop" else mode
        return imaml_meta_gradient(
            model, theta, chunk, loss_fn=F.cross_entropy, lam=lam, solver=solver, cg=cg, mode=mode
        )

    return fn


def assert_same_results(batch: TaskResults, loop: TaskResults, tol: float, what=""):
    errs = row_errors(batch.grad, loop.grad)
    assert max(errs) < tol, (what, errs)
    for name in ("query_loss", "support_loss", "query_out"):
        a, b = getattr(batch, name), getattr(loop, name)
        assert max(row_errors(a.reshape(len(a), -1), b.reshape(len(b), -1))) < tol, (what, name)
    assert set(batch.info) == set(loop.info)
    for k in batch.info:
        if k in COUNTS:
            assert batch.info[k].tolist() == loop.info[k].tolist(), (what, k)
        else:
            torch.testing.assert_close(
                batch.info[k], loop.info[k], rtol=max(tol, 1e-9), atol=1e-12, msg=f"{what} {k}"
            )
    return errs


# ---------------------------------------------------------------------------------------- batched = looped


@pytest.mark.parametrize("mode", ["native", "vmap"])
@pytest.mark.parametrize("name", list(TINY_SOLVERS))
def test_every_solver_batched_equals_looped_float64_with_masks_exercised(name, mode):
    torch.manual_seed(0)
    model = TinyCNN().double()
    batch = tiny_batch(4)
    fn = imaml_fn(model, params_of(model), TINY_SOLVERS[name], 0.2, CG(8), forced=mode)
    loop = run_chunked(fn, batch, 1)
    # the masks matter: tasks took different numbers of inner steps and CG steps (L-BFGS's solutions are
    # conditioned well enough for 8 CG steps on every task: there only the inner counts differ)
    varied = {
        k: len(set(loop.info[k].tolist())) > 1 for k in ("inner_accepted", "inner_iterations", "cg_steps")
    }
    assert (varied["cg_steps"] or name == "lbfgs") and (
        varied["inner_accepted"] or varied["inner_iterations"]
    ), {k: loop.info[k].tolist() for k in varied}
    errs = assert_same_results(run_chunked(fn, batch, 4), loop, 1e-10, name)
    print(
        f"{name} ({mode}): batched vs looped, per task {[f'{e:.1e}' for e in errs]}; "
        f"{loop.info['inner_iterations'].tolist()} iterations, "
        f"{loop.info['inner_accepted'].tolist()} accepted, "
        f"{loop.info['cg_steps'].tolist()} CG steps"
    )


@pytest.mark.parametrize("mode", ["native", "vmap"])
def test_maml_and_fomaml_batched_equal_looped_float64(mode):
    torch.manual_seed(0)
    model = TinyCNN().double()
    theta = params_of(model)
    batch = tiny_batch(4)
    fns = {
        "maml": lambda c, m: maml_meta_gradient(
            model, theta, c, loss_fn=F.cross_entropy, lam=0.5, inner_steps=3, inner_lr=0.3, mode=m
        ),
        "fomaml": lambda c, m: fomaml_meta_gradient(
            model, theta, c, loss_fn=F.cross_entropy, lam=0.2, solver=TINY_SOLVERS["sgd"], mode=m
        ),
    }
    for name, fn in fns.items():
        forced = lambda c, m, fn=fn: fn(c, mode if m != "loop" else m)  # noqa: E731
        assert_same_results(run_chunked(forced, batch, 4), run_chunked(forced, batch, 1), 1e-10, name)


@pytest.mark.parametrize("mode", ["native", "vmap"])
def test_inner_solutions_equal_the_solver_on_each_task_alone(mode):
    """adapt_tasks (T tasks at once) = the solver's one-task dict call on each task's functional_call loss."""
    torch.manual_seed(0)
    model = TinyCNN().double()
    theta = params_of(model)
    sx, sy, *_ = tiny_batch(3)
    for name, solver in TINY_SOLVERS.items():
        phis, info = adapt_tasks(
            model, theta, sx, sy, loss_fn=F.cross_entropy, lam=1.0, solver=solver, mode=mode
        )
        for t in range(3):
            phi, one = solver(make_task_loss(model, sx[t], sy[t], F.cross_entropy), theta, 1.0)
            flat = ParamSpec.of(theta).flatten
            assert row_errors(flat({k: p[t] for k, p in phis.items()})[None], flat(phi)[None])[0] < 1e-12, (
                name
            )
            for field in InnerInfo._fields:
                a, b = float(getattr(info, field)[t]), float(getattr(one, field))
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-13), (name, field, a, b)


def test_every_chunk_size_gives_the_same_result_and_fn_sees_chunks_and_modes():
    torch.manual_seed(0)
    model = TinyCNN().double()
    batch = tiny_batch(5)
    inner = imaml_fn(model, params_of(model), TINY_SOLVERS["gd_armijo"], 1.0, CG(4))
    calls = []

    def fn(chunk, mode):
        calls.append((chunk[0].shape[0], mode))
        return inner(chunk, mode)

    ref = run_chunked(fn, batch, 1)
    assert calls == [(1, "loop")] * 5
    for size, chunks in [(2, [2, 2, 1]), (3, [3, 2]), (4, [4, 1]), (5, [5]), (8, [5])]:
        calls.clear()
        res = run_chunked(fn, batch, size)
        assert calls == [(c, "auto" if size > 1 else "loop") for c in chunks], size
        assert_same_results(res, ref, 1e-10, f"chunk {size}")
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            run_chunked(fn, batch, bad)


def test_cat_results_concatenates_along_the_task_dimension():
    a = TaskResults(
        torch.ones(2, 3), torch.zeros(2), torch.ones(2, 4, 5), torch.zeros(2), {"x": torch.arange(2)}
    )
    b = TaskResults(
        2 * torch.ones(1, 3), torch.ones(1), torch.zeros(1, 4, 5), torch.ones(1), {"x": torch.arange(1) + 7}
    )
    out = cat_results([a, b])
    assert isinstance(out, TaskResults) and out.lam_grad is None  # None stays None
    assert torch.equal(out.grad, torch.tensor([[1.0] * 3, [1.0] * 3, [2.0] * 3]))
    assert torch.equal(out.query_loss, torch.tensor([0.0, 0.0, 1.0])) and out.query_out.shape == (3, 4, 5)
    assert torch.equal(out.info["x"], torch.tensor([0, 1, 7]))
    # tuples of results (e.g. outputs before / after adaptation), plain tensors and dicts, one part
    pair = cat_results([(torch.zeros(2, 1), {"y": torch.ones(2)}), (torch.ones(3, 1), {"y": torch.zeros(3)})])
    assert (
        isinstance(pair, tuple)
        and pair[0].shape == (5, 1)
        and torch.equal(pair[1]["y"], torch.tensor([1.0] * 2 + [0.0] * 3))
    )
    assert cat_results([a]) is a and cat_results([None, None]) is None

    class Other(NamedTuple):
        u: torch.Tensor
        v: torch.Tensor | None

    both = cat_results([Other(torch.zeros(1), None), Other(torch.ones(2), None)])
    assert isinstance(both, Other) and torch.equal(both.u, torch.tensor([0.0, 1.0, 1.0])) and both.v is None


def test_summarise_tasks_by_hand():
    logits = torch.tensor(
        [
            [[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 1.0, 0.0]],  # predicts 0, 1, 2, 0
            [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        ]  # predicts 1, 1, 1, 2
    )
    y = torch.tensor([[0, 1, 2, 1], [1, 0, 2, 2]])  # task 0: 3 of 4 right, task 1: 2 of 4
    spec = ParamSpec(("w", "b"), ((2,), (1,)))
    results = TaskResults(
        grad=torch.tensor([[1.0, 2.0, 10.0], [3.0, 6.0, 20.0]]),
        query_loss=torch.tensor([0.5, 1.5], dtype=torch.float64),
        query_out=logits,
        support_loss=torch.tensor([0.25, 0.75]),
        info={
            "cg_steps": torch.tensor([3, 5]),
            "inner_residual": torch.tensor([0.1, 0.2], dtype=torch.float64),
        },
    )
    grad, metrics = summarise_tasks(results, spec, y, classification=True)
    assert set(grad) == {"w", "b"} and grad["b"].shape == (1,)
    assert torch.equal(grad["w"], torch.tensor([2.0, 4.0])) and grad["b"].item() == 15.0
    assert set(metrics) == {"query_loss", "support_loss", "query_acc", "cg_steps", "inner_residual"}
    assert torch.equal(metrics["query_acc"], torch.tensor([0.75, 0.5]))
    assert all(v.dtype == torch.float32 and v.shape == (2,) for v in metrics.values())
    assert torch.equal(metrics["query_loss"], torch.tensor([0.5, 1.5]))
    assert torch.equal(metrics["support_loss"], torch.tensor([0.25, 0.75]))
    assert torch.equal(metrics["cg_steps"], torch.tensor([3.0, 5.0]))
    _, metrics = summarise_tasks(results, spec, y, classification=False)
    assert "query_acc" not in metrics


def test_summarise_tasks_of_a_scalar_parameter():
    """A 0-d parameter (a learned temperature, say): its mean meta-gradient is 0-d too."""
    spec = ParamSpec.of({"w": torch.zeros(2), "scale": torch.tensor(1.0)})
    results = TaskResults(
        torch.tensor([[1.0, 2.0, 10.0], [3.0, 6.0, 20.0]]),
        torch.zeros(2),
        torch.zeros(2, 1, 1),
        torch.zeros(2),
        {},
    )
    grad, _ = summarise_tasks(results, spec, torch.zeros(2, 1), classification=False)
    assert grad["scale"].shape == () and grad["scale"].item() == 15.0
    assert torch.equal(grad["w"], torch.tensor([2.0, 4.0]))


# ----------------------------------------------------------------------------------------- float32 Omniglot

# real Omniglot, float32, lam 10 (I + H/lam positive definite on these tasks: no CG truncation); steps
# within what Conv4 takes. Adam and RMSprop run without a tolerance: on conv biases before BatchNorm
# (gradient 0 up to rounding) their normalised steps move by lr along the sign of rounding noise, so where a
# tolerance on ||grad G|| stops a task depends on that noise (measured: 3 of 4 tasks stopped one step apart,
# batched vs looped)
OMNIGLOT_SOLVERS = {
    "gd_armijo": GDArmijo(steps=6, lr=1.0),
    "gd": GD(steps=6, lr=0.1, tol=0.2),
    "sgd": SGD(steps=6, lr=0.05, momentum=0.9, nesterov=True, tol=0.2),
    "adam": Adam(steps=6, lr=0.02, betas=(0.8, 0.9), amsgrad=True),
    "torch": TorchOptimizer(steps=6, lr=0.01, torch_optimizer=torch.optim.RMSprop),
    "lbfgs": LBFGS(steps=6, lr=1.0, history_size=3),
    "hf": HessianFree(steps=3, lr=1.0, tol=0.5),
}


def test_every_solver_batched_equals_looped_float32_on_omniglot(omniglot):
    """Conv4 (16 channels), 4 real 5-way 1-shot tasks, float32, chunk 4 (native and vmap) vs chunk 1.
    Measured per task (1 thread, several runs: the kernels' grouped / per-group choice is timed, so it
    varies): 4.6e-7 to 1.1e-6 for every solver but RMSprop ("torch"), whose normalised steps amplify float32
    rounding to up to 1.2e-5; bounded at 1e-4."""
    errs = {}
    for name, solver in OMNIGLOT_SOLVERS.items():
        torch.manual_seed(0)
        model = OmniglotConv4(5, hidden=16)
        theta = params_of(model)
        loop = run_chunked(imaml_fn(model, theta, solver, 10.0, CG(3)), omniglot, 1)
        assert not loop.info["cg_negative_curvature"].any(), name
        for mode in ("native", "vmap"):
            res = run_chunked(imaml_fn(model, theta, solver, 10.0, CG(3), forced=mode), omniglot, 4)
            for k in ("inner_accepted", "inner_iterations", "cg_steps"):
                assert res.info[k].tolist() == loop.info[k].tolist(), (name, mode, k)
            errs[name, mode] = row_errors(res.grad, loop.grad)
            assert max(row_errors(res.query_out.flatten(1), loop.query_out.flatten(1))) < 1e-4, (name, mode)
    print(
        "float32 Omniglot batched vs looped, per task:",
        {f"{n}/{m}": [f"{e:.1e}" for e in v] for (n, m), v in errs.items()},
    )
    assert max(max(v) for v in errs.values()) < 1e-4, errs


def test_ill_conditioned_float32_gap_is_reported(omniglot):
    """At lam 0.1 I + H/lam is indefinite on a task (CG truncates) and HF's Newton directions come from a
    truncated CG too: float32 rounding differences between the batched and the looped kernels are then
    amplified (as between 1 and 2 threads of the loop itself). Measured up to 3.4e-4 per task -- reported,
    bounded at 5e-2 and finite."""
    torch.manual_seed(0)
    model = OmniglotConv4(5, hidden=16)
    theta = params_of(model)
    fn = imaml_fn(model, theta, HessianFree(steps=3, lr=1.0), 0.1, CG(3))
    loop = run_chunked(fn, omniglot, 1)
    res = run_chunked(fn, omniglot, 4)
    errs = row_errors(res.grad, loop.grad)
    print(
        f"ill-conditioned float32 gap (hf, lam 0.1): {[f'{e:.1e}' for e in errs]}; CG truncated "
        f"{loop.info['cg_negative_curvature'].tolist()}"
    )
    assert loop.info["cg_negative_curvature"].any()
    assert torch.isfinite(res.grad).all() and max(errs) < 5e-2


# --------------------------------------------------------------------------------------------- CG per row


def test_batched_cg_rows_equal_per_system_cg_with_masking_and_truncation():
    torch.manual_seed(0)
    n, T = 12, 5
    mats = []
    for t in range(T):
        q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        if t < 3:  # t+2 distinct eigenvalues -> exact CG converges after t+2 steps: different steps per task
            ev = torch.tensor([1.0 + 3 * (i % (t + 2)) for i in range(n)], dtype=torch.float64)
        elif t == 3:  # indefinite: truncation somewhere after the first step
            ev = torch.linspace(-2.0, 5.0, n, dtype=torch.float64)
        else:  # negative definite: truncated on the very first direction -> returns b
            ev = -torch.linspace(1.0, 2.0, n, dtype=torch.float64)
        mats.append(q @ torch.diag(ev) @ q.T)
    A = torch.stack(mats)
    b = torch.randn(T, n, dtype=torch.float64)
    calls = []

    def matvec(v):
        calls.append(1)
        return torch.einsum("tij,tj->ti", A, v)

    x, info = batched_conjugate_gradient(matvec, b, max_steps=n)
    batched_calls = len(calls)
    per_task_calls = []
    for t in range(T):
        calls.clear()
        xt, it = conjugate_gradient(lambda v, a=A[t]: calls.append(1) or a @ v, b[t], max_steps=n)
        per_task_calls.append(len(calls))
        torch.testing.assert_close(x[t], xt, rtol=1e-12, atol=1e-12)
        assert int(info.steps[t]) == int(it.steps)
        assert bool(info.negative_curvature[t]) == bool(it.negative_curvature)
        assert bool(info.converged[t]) == bool(it.converged)
        assert math.isclose(
            float(info.residual_norm[t]), float(it.residual_norm), rel_tol=1e-9, abs_tol=1e-12
        )
    assert batched_calls == max(per_task_calls) <= n  # the loop ends when the last row has stopped
    assert info.steps[:3].tolist() == [2, 3, 4]  # converged tasks stopped (masked) at different steps
    assert info.converged[:3].all() and not info.converged[3:].any()
    assert info.negative_curvature[3:].all()
    torch.testing.assert_close(x[4], b[4])  # step-1 truncation returns b, as a single system does
    for t in range(3):
        torch.testing.assert_close(A[t] @ x[t], b[t], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------- probe


def test_probe_accepts_conv4_and_tinycnn():
    sx = torch.randn(2, 5, 1, 28, 28)
    sy = torch.arange(5).repeat(2, 1)
    assert probe_batching(OmniglotConv4(5), sx, sy, F.cross_entropy) == (True, "ok")
    tx, ty, *_ = tiny_batch(2, dtype=torch.float32)
    model = TinyCNN()
    assert probe_batching(model, tx, ty, F.cross_entropy) == (True, "ok")
    # more tasks than it needs: it tries the first two
    tx, ty, *_ = tiny_batch(5, dtype=torch.float32)
    assert probe_batching(model, tx, ty, F.cross_entropy, params=params_of(model)) == (True, "ok")


def test_probe_rejects_batchnorm_with_running_statistics_in_training_and_names_it():
    from collections import OrderedDict

    running = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, 3),
            norm=nn.BatchNorm2d(4),
            relu=nn.ReLU(),
            flat=nn.Flatten(),
            fc=nn.Linear(144, 5),
        )
    )
    sx, sy, *_ = tiny_batch(2, dtype=torch.float32)
    before = running.norm.running_mean.clone()
    ok, reason = probe_batching(running, sx, sy, F.cross_entropy)
    assert not ok and reason.startswith("norm:") and "running statistics" in reason, reason
    assert torch.equal(running.norm.running_mean, before)  # it did not run the layer
    # in evaluation mode the running statistics are only read: that batches
    running.eval()
    assert probe_batching(running, sx, sy, F.cross_entropy) == (True, "ok")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        return h if h.sum() > 0 else -h  # Python branch on a tensor value: vmap cannot trace it


def test_probe_reports_the_first_line_of_what_failed():
    sx, sy, *_ = tiny_batch(2, dtype=torch.float32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

    def failing(message):
        def loss_fn(out, y):
            raise ValueError(message)

        return loss_fn

    assert probe_batching(model, sx, sy, failing("bad target\nsecond line")) == (
        False,
        "ValueError: bad target",
    )
    assert probe_batching(model, sx, sy, failing("")) == (False, "ValueError: ")
    ok, reason = probe_batching(DataDependent(), sx, sy, F.cross_entropy)
    assert not ok and reason.startswith("RuntimeError: vmap") and "\n" not in reason, reason
    tiny = TinyCNN()
    wrong = {k: v[..., :1] for k, v in params_of(tiny).items()}  # shapes the model cannot use
    ok, reason = probe_batching(tiny, sx, sy, F.cross_entropy, params=wrong)
    assert not ok and reason.startswith("RuntimeError"), reason


class _Noise(nn.Module):
    def forward(
        self, x
    ):  # random without being a Dropout: the batched call draws other numbers than one task's
        return x * (1 + torch.rand(()))


class Wrapped(nn.Module):
    """Any module that is not an nn.Sequential: batched by vmap."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_probe_compares_batched_and_one_task_losses():
    sx, sy, *_ = tiny_batch(2, dtype=torch.float32)
    torch.manual_seed(0)
    noisy = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), _Noise())
    ok, reason = probe_batching(noisy, sx, sy, F.cross_entropy)
    assert not ok and re.fullmatch(r"batched loss \S+ != one-task loss \S+", reason), reason
    # Dropout is random by design, so the losses are not compared there
    dropout = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 5))
    assert probe_batching(dropout, sx, sy, F.cross_entropy) == (True, "ok")
    # bfloat16 rounding is no mismatch: batched (vmap) and one-task losses differ by a few bfloat16 eps
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        conv = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5))
        cast = ForwardCast("cpu", torch.bfloat16)
        assert probe_batching(Wrapped(conv), sx, sy, F.cross_entropy, cast=cast) == (True, "ok"), seed
    # both mean squared errors batch now (double backward, no forward-over-reverse)
    mlp = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    assert probe_batching(mlp, x, y, F.mse_loss) == (True, "ok")
    assert probe_batching(mlp, x, y, mse_loss) == (True, "ok")


def test_probe_accepts_native_networks_under_a_forward_cast():
    """The native forward (grouped convolution, BatchNorm kernels) under a CPU bfloat16 ForwardCast."""
    sx, sy, *_ = tiny_batch(2, dtype=torch.float32)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5))
    cast = ForwardCast("cpu", torch.bfloat16)
    assert probe_batching(conv, sx, sy, F.cross_entropy, cast=cast) == (True, "ok")
    assert probe_batching(TinyCNN(), sx, sy, F.cross_entropy, cast=cast) == (True, "ok")


# -------------------------------------------------------------------------------------------- ChunkTuner


@pytest.mark.parametrize(
    "candidates,sample,expected",
    [((1, 2, 4), 16, {1, 2, 4}), ((1, 2, 8), 16, {1, 2, 4}), ((1, 4, 8), 2, {1, 2})],
)
def test_chunk_tuner_times_each_candidate_within_the_task_count(candidates, sample, expected):
    torch.manual_seed(0)
    model = TinyCNN().double()
    batch = tiny_batch(4)
    inner = imaml_fn(model, params_of(model), TINY_SOLVERS["gd"], 0.2, CG(4))
    seen = []

    def fn(chunk, mode):
        seen.append(chunk[0].shape[0])
        return inner(chunk, mode)

    tuner = ChunkTuner(candidates=candidates, sample=sample)
    choice = tuner.choose(fn, batch)
    # a time per candidate, a candidate above the (sampled) task count run as one chunk of all of them
    assert set(tuner.times) == expected and choice in expected
    assert all(isinstance(t, float) and t > 0 for t in tuner.times.values())
    assert max(seen) <= min(sample, 4)
    # its choice gives the same meta-gradient as the loop
    assert_same_results(
        run_chunked(inner, batch, choice), run_chunked(inner, batch, 1), 1e-10, f"chunk {choice}"
    )


def test_chunk_tuner_keeps_the_fastest_per_task_time_and_samples_tasks_not_examples():
    """fn costs 20 ms per call plus 1 ms per task: per task 21 ms at chunk 1, 6 ms at 4, 3.5 ms at 8, so 8
    wins. 9 tasks of 2 examples each: the sample is 8 tasks (not 2)."""
    tasks = tuple(torch.zeros(9, 2, 3) for _ in range(4))
    seen = []

    def fn(chunk, mode):
        seen.append(chunk[0].shape[0])
        time.sleep(0.02 + 0.001 * chunk[0].shape[0])
        return chunk[0].sum(dim=(1, 2))

    tuner = ChunkTuner(candidates=(1, 4, 8), sample=8)
    assert tuner.choose(fn, tasks) == 8
    assert sorted(tuner.times) == [1, 4, 8] and max(seen) == 8
    for c, expected in ((1, 0.021), (4, 0.006), (8, 0.0035)):  # seconds per task, sleep's overshoot allowed
        assert expected <= tuner.times[c] < expected + 0.01, (c, tuner.times)


# ---------------------------------------------------------------------------------------- inference mode


@pytest.mark.parametrize("chunk", [1, 4])
def test_inference_mode_inputs_work(chunk):
    """Lightning evaluates under torch.inference_mode; the learner leaves it (inference_mode(False)) for the
    solve, but the batch was made inside it."""
    torch.manual_seed(0)
    model = TinyCNN().double()
    theta = params_of(model)
    fn = imaml_fn(model, theta, TINY_SOLVERS["gd_armijo"], 0.2, CG(4))
    ref = run_chunked(fn, tiny_batch(4), chunk)
    with torch.inference_mode():
        batch = tiny_batch(4)
        assert batch[0].is_inference()
        with torch.inference_mode(False):
            res = run_chunked(fn, batch, chunk)
            phis, _ = adapt_tasks(
                model,
                theta,
                batch[0],
                batch[1],
                loss_fn=F.cross_entropy,
                lam=0.2,
                solver=TINY_SOLVERS["gd_armijo"],
            )
    assert_same_results(res, ref, 1e-12, "inference mode")
    ref_phis, _ = adapt_tasks(
        model, theta, *tiny_batch(4)[:2], loss_fn=F.cross_entropy, lam=0.2, solver=TINY_SOLVERS["gd_armijo"]
    )
    for k in theta:
        torch.testing.assert_close(phis[k], ref_phis[k], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- the learners' chunk-size rule


def test_choose_chunk_size_follows_the_documented_rule(tiny):
    """False: the loop, nothing timed; a model the probe accepts: the given size, else the timed choice (1
    among the candidates only when batching was not asked for); a model it refuses (BatchNorm with running
    statistics): the loop with the probe's reason, and a warning only when batching was asked for."""
    model, _, batch = tiny
    calls = []

    def fn(chunk, mode):
        calls.append((chunk[0].shape[0], mode))
        return chunk[0].sum(dim=tuple(range(1, chunk[0].dim())))  # one number per task

    assert choose_chunk_size(False, 3, fn, batch, model, F.cross_entropy) == (1, "batched_tasks=False")
    assert calls == []
    assert choose_chunk_size(None, 3, fn, batch, model, F.cross_entropy) == (3, "batched_chunk_size")
    assert choose_chunk_size(True, 2, fn, batch, model, F.cross_entropy) == (2, "batched_chunk_size")
    assert calls == []
    assert batch[0].shape[0] == 4  # so the candidates above 4 become 4
    for asked, sizes in ((None, [1, 4]), (True, [4])):
        calls.clear()
        size, why = choose_chunk_size(asked, None, fn, batch, model, F.cross_entropy)
        assert size in sizes and re.fullmatch(r"timed \(s per task\): \d+: \d\.\d{4}(, \d+: \d\.\d{4})*", why)
        assert [int(c) for c in re.findall(r"(\d+): ", why)] == sizes
        assert sorted({c for c, _ in calls}) == sizes and ("loop" in {m for _, m in calls}) == (1 in sizes)
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(0)
    tasks = (
        torch.randn(3, 5, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 1, generator=g, dtype=torch.float64),
    )
    tasks = tasks + tasks
    ok, reason = probe_batching(bn, tasks[0], tasks[1], mse_loss, dict(bn.named_parameters()))
    assert not ok
    with pytest.warns(UserWarning, match=r"batched_tasks=True: using the per-task loop instead \(.+\)"):
        assert choose_chunk_size(True, None, fn, tasks, bn, mse_loss) == (1, reason)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_chunk_size(None, 2, fn, tasks, bn, mse_loss) == (1, reason)


def test_choose_chunk_size_times_the_documented_candidates():
    """With 16 tasks (the tuner's sample): 1, 4, 8, 16 when batching is left to it, 4, 8, 16 when asked."""
    torch.manual_seed(0)
    model = TinyCNN().double()
    batch = tiny_batch(16)

    def fn(chunk, mode):
        return chunk[0].sum(dim=tuple(range(1, chunk[0].dim())))

    for asked, sizes in ((None, [1, 4, 8, 16]), (True, [4, 8, 16])):
        _, why = choose_chunk_size(asked, None, fn, batch, model, F.cross_entropy)
        assert [int(c) for c in re.findall(r"(\d+): ", why)] == sizes, why
