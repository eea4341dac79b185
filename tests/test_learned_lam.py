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
from torch import nn

from lightning_imaml import IMAML
from lightning_imaml.implicit import _RetainedGradHVP, conjugate_gradient, implicit_meta_gradient
from lightning_imaml.inner import proximal_adapt
from lightning_imaml.metagrad import imaml_task_meta_gradient, mse_loss

D, K, Q = 5, 12, 9


def ridge_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(K, D, generator=g, dtype=torch.float64)
    Xq = torch.randn(Q, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    y = X @ w + 0.1 * torch.randn(K, generator=g, dtype=torch.float64)
    yq = Xq @ w + 0.1 * torch.randn(Q, generator=g, dtype=torch.float64)
    theta = torch.randn(D, generator=g, dtype=torch.float64)
    lam = 0.5 + torch.rand(D, generator=g, dtype=torch.float64) * 3  # a different lam per feature
    return X, y, Xq, yq, theta, lam


def closed_form_F(X, y, Xq, yq, theta, lam):
    A = 2.0 / K * X.T @ X + torch.diag(lam)
    phi = torch.linalg.solve(A, 2.0 / K * X.T @ y + lam * theta)
    return ((Xq @ phi - yq) ** 2).mean(), phi


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_ridge_lam_gradient_equals_exact_derivative_and_finite_differences():
    X, y, Xq, yq, theta, lam = ridge_problem()
    th, la = theta.clone().requires_grad_(True), lam.clone().requires_grad_(True)
    F, phi = closed_form_F(X, y, Xq, yq, th, la)
    exact_theta, exact_lam = torch.autograd.grad(F, [th, la])
    phi = phi.detach()

    def support(p):
        return ((X @ p["w"] - y) ** 2).mean()

    gq = torch.func.grad(lambda p: ((Xq @ p["w"] - yq) ** 2).mean())({"w": phi})
    x, dlam = implicit_meta_gradient(
        support,
        {"w": phi},
        gq,
        lam={"w": lam},
        cg_steps=D,
        rtol=0.0,
        theta={"w": theta},
        return_lam_grad=True,
    )
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
    x, dlam = implicit_meta_gradient(
        support, {"w": phi.detach()}, gq, lam={"w": lam0}, cg_steps=D, rtol=0.0, theta={"w": theta},
        return_lam_grad=True,
    )  # fmt: skip
    assert rel(x["w"], ex_theta) < 1e-10 and abs(dlam["w"].item() - ex_lam.item()) < 1e-6 * abs(ex_lam.item())


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
            support,
            theta,
            lam_,
            100,
            optimizer="lbfgs",
            return_info=True,
            history_size=20,
            tolerance_grad=1e-14,
        )
        assert info.residual < 1e-10, info.residual
        return phi

    phi = solve(lam)
    _, dlam = implicit_meta_gradient(
        support, phi, torch.func.grad(query)(phi), lam=lam, cg_steps=60, rtol=1e-14, theta=theta,
        return_lam_grad=True,
    )  # fmt: skip
    h, errs = 1e-5, {}
    for k in lam:
        up = query(solve({**lam, k: lam[k] + h}))
        down = query(solve({**lam, k: lam[k] - h}))
        fd = ((up - down) / (2 * h)).item()
        errs[k] = abs(dlam[k].item() - fd) / max(abs(fd), 1e-12)
    print("\nnonconvex MLP lam gradient vs FD (inner re-solved):", {k: f"{e:.1e}" for k, e in errs.items()})
    assert max(errs.values()) < 1e-5, errs


def test_scalar_lam_takes_todays_path_bit_for_bit():
    """A number lam: the same CG on ((1 + d) I + H/lam) as before per-parameter lam existed."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(10, 1), torch.randn(10, 1)
    phi = {k: v.detach() + 0.05 for k, v in net.named_parameters()}

    def support(p):
        return mse_loss(torch.func.functional_call(net, p, (x,)), y)

    g = {k: torch.randn_like(v) for k, v in phi.items()}
    lam, d = 2.0, 0.3
    hv = _RetainedGradHVP(support, phi)
    ref, _ = conjugate_gradient(
        lambda v: {k: torch.add(v[k] * (1 + d), h, alpha=1 / lam) for k, h in hv(v).items()}, g, 5
    )
    x_new = implicit_meta_gradient(support, phi, g, lam=lam, cg_steps=5, cg_damping=d)
    assert all(torch.equal(x_new[k], ref[k]) for k in ref)
    # a per-tensor lam equal to the number: the same solution, by the scaled system (to rounding)
    x_dict = implicit_meta_gradient(
        support, phi, g, lam={k: torch.tensor(lam) for k in phi}, cg_steps=5, cg_damping=d
    )
    assert max(rel(x_dict[k], ref[k]) for k in ref) < 1e-5


def _ridge_batch(n_tasks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_tasks, 3, 1, generator=g, dtype=torch.float64)
    sx = torch.randn(n_tasks, 8, 3, generator=g, dtype=torch.float64)
    qx = torch.randn(n_tasks, 8, 3, generator=g, dtype=torch.float64)
    return sx, sx @ w, qx, qx @ w


def test_learned_lam_gradient_reaches_the_outer_step_and_checkpoints(tmp_path):
    from torch.utils.data import DataLoader

    batch = _ridge_batch()
    torch.manual_seed(0)
    learner = IMAML(
        nn.Linear(3, 1, bias=False).double(), lam=2.0, inner_steps=40, inner_lr=0.2, task_type="regression",
        learn_lam="parameter", optimizer=lambda p: torch.optim.SGD(p, lr=0.1), lam_lr=0.5,
    )  # fmt: skip
    # the outer gradient of log lam is lam * dF/dlam, dF/dlam from the per-task function
    grad, _ = learner.meta_gradient(batch)
    theta = {k: v.detach() for k, v in learner.meta_parameters().items()}
    lam = learner.current_lam()
    expected = sum(
        imaml_task_meta_gradient(
            learner.model, theta, tuple(t[i] for t in batch), loss_fn=mse_loss, lam=lam, inner_steps=40,
            inner_lr=0.2, lam_grad=True,
        ).lam_grad["weight"]
        for i in range(2)
    ) / 2  # fmt: skip
    assert torch.allclose(grad["lam:weight"], expected, rtol=1e-12)
    log_lam_before = learner.log_lam["weight"].detach().clone()
    tr = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=tmp_path, limit_val_batches=0)  # fmt: skip
    tr.fit(learner, DataLoader([batch], batch_size=None))
    step = learner.log_lam["weight"].detach() - log_lam_before
    # SGD with lam_lr 0.5 on log lam: step = -0.5 * lam * dF/dlam
    assert torch.allclose(step, -0.5 * lam["weight"] * expected, rtol=1e-10)
    assert "train/lam/weight" in tr.callback_metrics
    ckpt = tmp_path / "lam.ckpt"
    tr.save_checkpoint(ckpt)
    loaded = IMAML.load_from_checkpoint(ckpt, model=nn.Linear(3, 1, bias=False).double(), weights_only=False)
    assert torch.equal(loaded.log_lam["weight"], learner.log_lam["weight"])
    assert loaded.learn_lam == "parameter" and loaded.lam_lr == 0.5
    # evaluation without eval_lam uses the learned values
    assert torch.equal(loaded.current_eval_lam()["weight"], learner.current_lam()["weight"])


def test_learned_lam_bad_input():
    with pytest.raises(ValueError, match="learn_lam must be one of"):
        IMAML(nn.Linear(2, 1), learn_lam="neuron")
    with pytest.raises(ValueError, match="lam > 0"):
        IMAML(nn.Linear(2, 1), lam=0.0, learn_lam="layer")
    with pytest.raises(ValueError, match="lam_lr must be > 0"):
        IMAML(nn.Linear(2, 1), learn_lam="layer", lam_lr=-1.0)
    phi = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="per-parameter lam must be > 0"):
        implicit_meta_gradient(
            lambda p: (p["w"] ** 2).sum(), phi, phi, lam={"w": torch.tensor(0.0)}, cg_steps=2
        )
    with pytest.raises(ValueError, match="needs theta"):
        implicit_meta_gradient(
            lambda p: (p["w"] ** 2).sum(), phi, phi, lam=1.0, cg_steps=2, return_lam_grad=True
        )
    with pytest.raises(ValueError, match=r"lam\['w'\] has shape"):
        proximal_adapt(lambda p: (p["w"] ** 2).sum(), phi, {"w": torch.ones(3)}, 2)
