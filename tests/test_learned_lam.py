"""Learned proximal strength (issue 13): the lam gradient of the implicit solve against closed forms and
finite differences, the scalar path unchanged, and IMAML(learn_lam=...) training, checkpointing and input
checks.

Ridge ground truth, per-feature Lam = diag(lam_1..lam_d): L_s(phi) = 1/K ||X phi - y||^2,
A = 2/K X^T X + Lam, phi* = A^{-1} (2/K X^T y + Lam theta), F = L_q(phi*). The exact derivatives come from
autograd through that closed form (torch.linalg.solve), independently of the CG code.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from helpers import rel, ridge_batch, ridge_closed_form
from torch import nn

from lightning_imaml import IMAML
from lightning_imaml.cg import CG, batched_conjugate_gradient
from lightning_imaml.implicit import RetainedHVP, implicit_meta_gradient, implicit_solve
from lightning_imaml.inner import make_solver, proximal_adapt
from lightning_imaml.lam import LearnedLam
from lightning_imaml.metagrad import imaml_meta_gradient, mse_loss
from lightning_imaml.params import ParamSpec

D, K, Q = 5, 12, 9


def ridge_problem(seed=0):
    """One task of helpers.ridge_batch (x [K, D], y [K]) with a theta and a different lam per feature."""
    X, y, Xq, yq = (t[0] for t in ridge_batch(n_tasks=1, k=K, q=Q, d=D, seed=seed))
    g = torch.Generator().manual_seed(seed + 100)
    theta = torch.randn(D, generator=g, dtype=torch.float64)
    lam = 0.5 + torch.rand(D, generator=g, dtype=torch.float64) * 3
    return X, y[:, 0], Xq, yq[:, 0], theta, lam


def closed_form_F(X, y, Xq, yq, theta, lam):
    """F = L_q(phi*) and phi* for a per-feature lam [D] (a number lam: lam * ones)."""
    k = X.shape[0]
    A = 2.0 / k * X.T @ X + torch.diag(lam)
    phi = torch.linalg.solve(A, 2.0 / k * X.T @ y + lam * theta)
    return ((Xq @ phi - yq) ** 2).mean(), phi


def closed_form_batch(batch, theta, lam):
    """Mean of F over the tasks of a ridge_batch for nn.Linear(d, 1, bias=False), a per-feature lam [d]."""
    sx, sy, qx, qy = batch
    return (
        sum(closed_form_F(sx[i], sy[i, :, 0], qx[i], qy[i, :, 0], theta, lam)[0] for i in range(sx.shape[0]))
        / sx.shape[0]
    )


def test_closed_form_at_equal_lam_is_the_shared_ridge_closed_form():
    """The local per-feature closed form agrees with helpers.ridge_closed_form where both apply."""
    batch = ridge_batch(n_tasks=3, d=D)
    theta = torch.randn(D, generator=torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_(
        True
    )
    (grad,) = torch.autograd.grad(
        closed_form_batch(batch, theta, torch.full((D,), 1.7, dtype=torch.float64)), theta
    )
    assert rel(grad, ridge_closed_form(theta.detach(), batch, 1.7)) < 1e-12


def test_ridge_lam_gradient_equals_exact_derivative_and_finite_differences():
    X, y, Xq, yq, theta, lam = ridge_problem()
    th, la = theta.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    F, phi = closed_form_F(X, y, Xq, yq, th, la)
    exact_theta, exact_lam = torch.autograd.grad(F, [th, la])
    phi = phi.detach()

    def support(p):
        return ((X @ p["w"] - y) ** 2).mean()

    gq = torch.func.grad(lambda p: ((Xq @ p["w"] - yq) ** 2).mean())({"w": phi})
    out = implicit_meta_gradient(
        support, {"w": phi}, gq, lam={"w": lam}, cg_steps=D, rtol=0.0, theta={"w": theta}
    )
    x, dlam = out.grad, out.lam_grad
    assert set(dlam) == {"w"} and dlam["w"].shape == (D,)
    err_theta, err_lam = rel(x["w"], exact_theta), rel(dlam["w"], exact_lam)
    # central finite differences of F in each lam_i, the inner problem re-solved in closed form
    h, fd = 1e-6, torch.zeros(D, dtype=torch.float64)
    for i in range(D):
        e = torch.zeros(D, dtype=torch.float64)
        e[i] = h
        fd[i] = (
            closed_form_F(X, y, Xq, yq, theta, lam + e)[0] - closed_form_F(X, y, Xq, yq, theta, lam - e)[0]
        ) / (2 * h)
    err_fd = rel(dlam["w"], fd)
    print(f"\nridge per-feature lam: theta {err_theta:.1e}, lam {err_lam:.1e} (exact), {err_fd:.1e} (FD)")
    assert err_theta < 1e-10 and err_lam < 1e-6 and err_fd < 1e-6

    # one lam for the whole tensor (0-d): d F / d lam = sum of the per-entry derivatives at equal values
    lam0 = torch.tensor(1.7, dtype=torch.float64)
    th = theta.clone().requires_grad_(True)
    l0 = lam0.clone().requires_grad_(True)
    F, phi = closed_form_F(X, y, Xq, yq, th, l0.expand(D))
    ex_theta, ex_lam = torch.autograd.grad(F, [th, l0])
    gq = torch.func.grad(lambda p: ((Xq @ p["w"] - yq) ** 2).mean())({"w": phi.detach()})
    out = implicit_meta_gradient(
        support, {"w": phi.detach()}, gq, lam={"w": lam0}, cg_steps=D, rtol=0.0, theta={"w": theta}
    )
    assert out.lam_grad["w"].dim() == 0
    assert rel(out.grad["w"], ex_theta) < 1e-10 and abs(
        out.lam_grad["w"].item() - ex_lam.item()
    ) < 1e-6 * abs(ex_lam.item())
    # and the number lam 1.7: dF/dlam a 0-d tensor, the same value
    num = implicit_meta_gradient(
        support, {"w": phi.detach()}, gq, lam=1.7, cg_steps=D, rtol=0.0, theta={"w": theta}
    )
    assert num.lam_grad.dim() == 0 and abs(num.lam_grad.item() - ex_lam.item()) < 1e-6 * abs(ex_lam.item())


def test_ridge_lam_gradient_of_several_tasks_in_one_implicit_solve():
    """[T, P] rows with a [P] lam: each row's dF/dLam is its own task's closed-form derivative."""
    T = 3
    sx, sy, qx, qy = ridge_batch(n_tasks=T, k=K, q=Q, d=D, seed=4)
    theta = torch.randn(D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lam = torch.linspace(0.6, 2.4, D, dtype=torch.float64)
    phis, exact = [], []
    for t in range(T):
        la = lam.clone().requires_grad_(True)
        F, phi = closed_form_F(sx[t], sy[t, :, 0], qx[t], qy[t, :, 0], theta, la)
        exact.append(torch.autograd.grad(F, la)[0])
        phis.append(phi.detach())
    phi = torch.stack(phis)

    def support_rows(p):
        return ((torch.einsum("tkd,td->tk", sx, p) - sy[..., 0]) ** 2).mean(1)

    def query_rows(p):
        return ((torch.einsum("tkd,td->tk", qx, p) - qy[..., 0]) ** 2).mean(1)

    leaf = phi.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(query_rows(leaf).sum(), leaf)
    _, dlam, info = implicit_solve(
        RetainedHVP(support_rows, phi), G, lam, CG(steps=D, rtol=0.0), diff=phi - theta
    )
    for t in range(T):
        assert rel(dlam[t], exact[t]) < 1e-8, t


def test_nonconvex_network_lam_gradient_against_finite_differences_with_inner_resolve():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(2)
    sx, qx = (torch.linspace(-2, 2, n, dtype=torch.float64)[:, None] for n in (10, 7))
    sy, qy = torch.sin(2 * sx), torch.sin(2 * qx)
    theta = {
        k: v.detach() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
        for k, v in net.named_parameters()
    }
    lam = {k: torch.tensor(v, dtype=torch.float64) for k, v in zip(theta, (1.5, 2.5, 1.0, 3.0), strict=True)}

    def support(p):
        return mse_loss(torch.func.functional_call(net, p, (sx,)), sy)

    def query(p):
        return mse_loss(torch.func.functional_call(net, p, (qx,)), qy)

    def solve(lam_):  # the inner problem to (float64) convergence
        phi, info = proximal_adapt(
            support, theta, lam_, 100, optimizer="lbfgs", history_size=20, tolerance_grad=1e-14
        )
        assert info.residual < 1e-10, info.residual
        return phi

    phi = solve(lam)
    out = implicit_meta_gradient(
        support, phi, torch.func.grad(query)(phi), lam=lam, cg_steps=60, rtol=1e-14, theta=theta
    )
    dlam = out.lam_grad
    assert set(dlam) == set(lam) and all(dlam[k].dim() == 0 for k in lam)
    h, errs = 1e-5, {}
    for k in lam:
        up = query(solve({**lam, k: lam[k] + h}))
        down = query(solve({**lam, k: lam[k] - h}))
        fd = ((up - down) / (2 * h)).item()
        errs[k] = abs(dlam[k].item() - fd) / max(abs(fd), 1e-12)
    print("\nnonconvex MLP lam gradient vs FD (inner re-solved):", {k: f"{e:.1e}" for k, e in errs.items()})
    assert max(errs.values()) < 1e-5, errs


def test_scalar_lam_takes_the_plain_cg_path_bit_for_bit():
    """A number lam: CG on ((1 + d) I + H/lam) x = g, unscaled -- the same as CG run by hand on that operator
    with public pieces (RetainedHVP, batched_conjugate_gradient); a per-tensor lam equal to the number solves
    the same system by the scaled one (equal to rounding); and in float64 both are the dense solve."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(10, 1), torch.randn(10, 1)
    phi = {k: v.detach() + 0.05 for k, v in net.named_parameters()}

    def support(p):
        return mse_loss(torch.func.functional_call(net, p, (x,)), y)

    g = {k: torch.randn_like(v) for k, v in phi.items()}
    lam, d = 2.0, 0.3
    spec = ParamSpec.of(phi)
    hv = RetainedHVP(lambda row: support(spec.unflatten(row[0])).reshape(1), spec.flatten(phi)[None])
    ref, _ = batched_conjugate_gradient(
        lambda v: torch.add(v * (1 + d), hv(v), alpha=1 / lam), spec.flatten(g)[None], 5
    )
    ref = spec.unflatten(ref[0])
    x_new = implicit_meta_gradient(support, phi, g, lam=lam, cg_steps=5, cg_damping=d).grad
    assert all(torch.equal(x_new[k], ref[k]) for k in ref)
    # a per-tensor lam equal to the number: the same solution, by the scaled system (to float32 rounding)
    x_dict = implicit_meta_gradient(
        support, phi, g, lam={k: torch.tensor(lam) for k in phi}, cg_steps=5, cg_damping=d
    ).grad
    assert max(rel(x_dict[k], ref[k]) for k in ref) < 1e-5
    # float64: both are the dense solution of ((1 + d) I + H/lam) x = g (P = 25, so CG needs <= 25 steps)
    net64 = net.double()
    phi64 = {k: v.double() for k, v in phi.items()}
    g64 = {k: v.double() for k, v in g.items()}
    x64, y64 = x.double(), y.double()

    def support64(p):
        return mse_loss(torch.func.functional_call(net64, p, (x64,)), y64)

    H = torch.func.hessian(lambda v: support64(spec.unflatten(v)))(spec.flatten(phi64))
    A = (1 + d) * torch.eye(spec.numel, dtype=torch.float64) + H / lam
    assert torch.linalg.eigvalsh(A).min() > 0
    exact = torch.linalg.solve(A, spec.flatten(g64))
    for lam_ in (lam, {k: torch.tensor(lam, dtype=torch.float64) for k in phi}):
        out = implicit_meta_gradient(support64, phi64, g64, lam=lam_, cg_steps=40, cg_damping=d, rtol=1e-13)
        assert rel(spec.flatten(out.grad), exact) < 1e-9


def _learner(**kw):
    torch.manual_seed(0)
    return IMAML(
        nn.Sequential(nn.Linear(3, 1, bias=False)).double(), lam=2.0, inner_steps=30, inner_lr=1.0,
        inner_optimizer="lbfgs", task_type="regression", learn_lam="parameter", cg_damping=0.0,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1), lam_lr=0.5, **kw,
    )  # fmt: skip


def test_learned_lam_gradient_reaches_the_outer_step_and_checkpoints(tmp_path):
    from torch.utils.data import DataLoader

    batch = ridge_batch(n_tasks=2, k=8, q=8, d=3)
    learner = _learner()
    # parameter "0.weight": log lam key "0__weight" (no dots in a ParameterDict), grad key "log_lam.0__weight"
    assert set(learner.log_lam) == {"0__weight"} and learner.log_lam["0__weight"].shape == (1, 3)
    assert torch.allclose(learner.log_lam["0__weight"], torch.full((1, 3), 2.0, dtype=torch.float64).log())
    grad, _ = learner.meta_gradient(batch)
    assert set(grad) == {"0.weight", "log_lam.0__weight"}
    theta = {k: v.detach() for k, v in learner.meta_parameters().items()}
    lam = learner.current_lam()
    assert set(lam) == {"0.weight"}
    # ground truth 1: the closed form, per-feature lam, d F / d log lam = lam dF/dlam (mean over tasks)
    la = lam["0.weight"][0].clone().requires_grad_(True)
    th = theta["0.weight"][0].clone().requires_grad_(True)
    dth, dla = torch.autograd.grad(closed_form_batch(batch, th, la), [th, la])
    err_lam = rel(grad["log_lam.0__weight"][0], lam["0.weight"][0] * dla)
    err_theta = rel(grad["0.weight"][0], dth)
    print(f"\nIMAML learned lam vs closed form: theta {err_theta:.1e}, log lam {err_lam:.1e}")
    assert err_theta < 1e-8 and err_lam < 1e-8
    # ground truth 2: the pure-torch engine one task at a time (mode "loop") with the learner's own solver
    per_task = [
        imaml_meta_gradient(
            learner.model, theta, tuple(t[i : i + 1] for t in batch), loss_fn=mse_loss, lam=lam,
            solver=learner.inner_solver, cg=learner.cg, lam_grad=True, mode="loop",
        ).lam_grad[0]
        for i in range(2)
    ]  # fmt: skip
    expected = lam["0.weight"] * (sum(per_task) / 2).reshape(1, 3)
    assert torch.allclose(grad["log_lam.0__weight"], expected, rtol=1e-10, atol=0)

    log_lam_before = learner.log_lam["0__weight"].detach().clone()
    tr = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path, limit_val_batches=0)  # fmt: skip
    tr.fit(learner, DataLoader([batch], batch_size=None))
    step = learner.log_lam["0__weight"].detach() - log_lam_before
    # SGD with lam_lr 0.5 on log lam (the network keeps lr 0.1): step = -0.5 dF/dlog lam
    assert torch.allclose(step, -0.5 * grad["log_lam.0__weight"], rtol=1e-10, atol=1e-15)
    assert "train/lam/0.weight" in tr.callback_metrics
    ckpt = tmp_path / "lam.ckpt"
    tr.save_checkpoint(ckpt)
    loaded = IMAML.load_from_checkpoint(
        ckpt, model=nn.Sequential(nn.Linear(3, 1, bias=False)).double(), weights_only=False
    )
    assert torch.equal(loaded.log_lam["0__weight"], learner.log_lam["0__weight"])
    assert loaded.learn_lam == "parameter" and loaded.lam_lr == 0.5
    # evaluation without eval_lam uses the learned values
    assert torch.equal(loaded.current_eval_lam()["0.weight"], learner.current_lam()["0.weight"])
    assert torch.equal(loaded.current_eval_lam()["0.weight"], learner.log_lam["0__weight"].detach().exp())


def test_learned_lam_per_layer_is_the_sum_over_the_tensor():
    """learn_lam="layer": one log lam per parameter tensor (0-d); its gradient is lam * the sum over the
    tensor's entries of dF/dlam, i.e. the closed-form derivative for one shared lam."""
    batch = ridge_batch(n_tasks=2, k=8, q=8, d=3, seed=1)
    torch.manual_seed(0)
    learner = IMAML(
        nn.Linear(3, 1, bias=False).double(), lam=1.5, inner_steps=30, inner_lr=1.0, inner_optimizer="lbfgs",
        task_type="regression", learn_lam="layer", cg_damping=0.0,  # the closed form's system, I + H/lam
    )  # fmt: skip
    assert learner.log_lam["weight"].dim() == 0
    grad, _ = learner.meta_gradient(batch)
    th = learner.model.weight.detach()[0]
    la = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    (dla,) = torch.autograd.grad(closed_form_batch(batch, th, la.expand(3)), la)
    assert grad["log_lam.weight"].dim() == 0
    assert abs(grad["log_lam.weight"].item() - 1.5 * dla.item()) < 1e-8 * abs(1.5 * dla.item())


def test_learned_lam_module_keys_and_log_gradients():
    params = {
        "0.weight": torch.zeros(2, 3, dtype=torch.float64),
        "0.bias": torch.zeros(2, dtype=torch.float64),
    }
    spec = ParamSpec.of(params)
    per_scalar = LearnedLam(params, 0.5, "parameter")
    per_layer = LearnedLam(params, 0.5, "layer")
    assert set(per_scalar) == {"0__weight", "0__bias"} and per_scalar["0__weight"].shape == (2, 3)
    assert per_layer["0__bias"].dim() == 0
    assert all(torch.allclose(v, torch.full_like(v, 0.5)) for v in per_scalar.values_by_name().values())
    assert set(per_layer.values_by_name()) == set(params)
    dlam = torch.arange(1.0, 9.0, dtype=torch.float64)  # dF/dlam per entry, weight's 6 then bias's 2
    logs = per_scalar.log_gradients(dlam, spec)
    assert torch.equal(logs["0__weight"], 0.5 * dlam[:6].reshape(2, 3)) and torch.equal(
        logs["0__bias"], 0.5 * dlam[6:]
    )
    logs = per_layer.log_gradients(dlam, spec)
    assert logs["0__weight"].item() == pytest.approx(0.5 * 21) and logs["0__bias"].item() == pytest.approx(
        0.5 * 15
    )


def test_learned_lam_bad_input():
    with pytest.raises(ValueError, match="learn_lam"):
        IMAML(nn.Linear(2, 1), learn_lam="neuron")
    with pytest.raises(ValueError, match="learn_lam"):
        LearnedLam({"w": torch.zeros(2)}, 1.0, "neuron")
    for lam in (0.0, -1.0):
        with pytest.raises(ValueError, match="lam"):
            IMAML(nn.Linear(2, 1), lam=lam, learn_lam="layer")
        with pytest.raises(ValueError, match="lam"):
            LearnedLam({"w": torch.zeros(2)}, lam, "layer")
    with pytest.raises(ValueError, match="lam_lr"):
        IMAML(nn.Linear(2, 1), learn_lam="layer", lam_lr=-1.0)
    phi = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"per-parameter lam must be > 0.*\['w'\]"):
        implicit_meta_gradient(
            lambda p: (p["w"] ** 2).sum(), phi, phi, lam={"w": torch.tensor(0.0)}, cg_steps=2
        )
    with pytest.raises(ValueError, match=r"lam\['w'\] has shape"):
        proximal_adapt(lambda p: (p["w"] ** 2).sum(), phi, {"w": torch.ones(3)}, 2)
    with pytest.raises(ValueError, match=r"missing \['w'\]"):
        make_solver("gd", steps=2)(lambda p: (p["w"] ** 2).sum(), phi, {"v": torch.ones(())})
