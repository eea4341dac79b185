"""IMAML / MAML / FOMAML LightningModules: exact meta-gradients, evaluation, NaN guard, resume, AMP.

Ground truths: ridge-regression tasks, where the proximal inner problem
    phi*(theta) = argmin_phi 1/K ||X phi - y||^2 + lam/2 ||phi - theta||^2
has the closed form phi* = A^{-1} (2/K X^T y + lam theta), A = 2/K X^T X + lam I, and the exact
meta-gradient of L_q(phi*(theta)) is lam A^{-1} grad L_q(phi*) (A symmetric).
"""

from __future__ import annotations

import functools
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_imaml import FOMAML, IMAML, MAML, MetaLearner, OmniglotConv4, SinusoidMLP
from lightning_imaml.metagrad import maml_task_meta_gradient

# ------------------------------------------------------------------------------------------------------
# helpers


class _Batches(Dataset):
    """A fixed list of ready-made meta-batches; DataLoader(batch_size=None) yields fresh copies (made
    while the loop fetches them: inference tensors under the Trainer's default evaluation)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return tuple(t.clone() for t in self.batches[i])


def loader(batches):
    return DataLoader(_Batches(batches), batch_size=None)


def trainer(**kw) -> pl.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    base.update(kw)
    return pl.Trainer(**base)


def ridge_batch(n_tasks=3, k=10, q=12, d=4, dtype=torch.float64, seed=0):
    """Regression episodes with x [B, K, d], y [B, K, 1] (targets from a per-task linear map + noise)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_tasks, d, 1, generator=g, dtype=dtype)
    sx = torch.randn(n_tasks, k, d, generator=g, dtype=dtype)
    qx = torch.randn(n_tasks, q, d, generator=g, dtype=dtype)
    sy = sx @ w + 0.1 * torch.randn(n_tasks, k, 1, generator=g, dtype=dtype)
    qy = qx @ w + 0.1 * torch.randn(n_tasks, q, 1, generator=g, dtype=dtype)
    return sx, sy, qx, qy


def ridge_model(d=4, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(d, 1, bias=False).to(dtype)


def ridge_closed_form(theta: torch.Tensor, batch, lam: float) -> torch.Tensor:
    """Mean over tasks of lam A^{-1} grad L_q(phi*), theta of shape [d]."""
    sx, sy, qx, qy = batch
    grads = []
    for i in range(sx.shape[0]):
        k, d = sx[i].shape
        a = 2.0 / k * sx[i].T @ sx[i] + lam * torch.eye(d, dtype=theta.dtype)
        phi = torch.linalg.solve(a, 2.0 / k * sx[i].T @ sy[i, :, 0] + lam * theta)
        gq = 2.0 / qx[i].shape[0] * qx[i].T @ (qx[i] @ phi - qy[i, :, 0])
        grads.append(lam * torch.linalg.solve(a, gq))
    return torch.stack(grads).mean(0)


def rel(a, b) -> float:
    """Global relative difference ||a - b|| / ||b|| over dicts (or tensors)."""
    if isinstance(a, dict):
        a = torch.cat([a[k].reshape(-1) for k in sorted(a)])
        b = torch.cat([b[k].reshape(-1) for k in sorted(b)])
    return float((a - b).norm() / b.norm())


def classification_batch(n_tasks=2, n_way=5, k_shot=1, k_query=2, hw=14, seed=0, dtype=torch.float32):
    """Learnable toy episodes: per task, a random prototype image per class plus noise.
    support_x [B, N*K, 1, hw, hw], support_y int64 [B, N*K], query likewise. 14 x 14 images keep the
    tests fast and still fit OmniglotConv4 (14 -> 7 -> 4 -> pad 5 -> 3 -> 2: the same 2 x 2 head)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(n_tasks, n_way, 1, hw, hw, generator=g, dtype=dtype)

    def draw(per_class):
        y = torch.arange(n_way).repeat_interleave(per_class).expand(n_tasks, -1).contiguous()
        x = torch.stack([protos[t, y[t]] for t in range(n_tasks)])
        return x + 0.5 * torch.randn(x.shape, generator=g, dtype=dtype), y

    sx, sy = draw(k_shot)
    qx, qy = draw(k_query)
    return sx, sy, qx, qy


def sgd(lr):
    return functools.partial(torch.optim.SGD, lr=lr)


# ------------------------------------------------------------------------------------------------------
# exact meta-gradients


def test_imaml_step_is_minus_lr_times_closed_form_meta_gradient():
    lam, lr = 2.0, 0.1
    batch = ridge_batch()
    model = ridge_model()
    theta0 = model.weight.detach().clone().reshape(-1)
    learner = IMAML(
        model,
        lam=lam,
        inner_steps=300,
        inner_lr=0.1,
        cg_steps=20,
        task_type="regression",
        optimizer=sgd(lr),
    )
    trainer(max_steps=1).fit(learner, train_dataloaders=loader([batch]))
    theta1 = model.weight.detach().reshape(-1)
    expected = theta0 - lr * ridge_closed_form(theta0, batch, lam)
    err = rel(theta1 - theta0, expected - theta0)
    print(f"\nridge: relative error of the IMAML step vs -lr x closed form = {err:.2e}")
    assert err < 1e-9


def test_imaml_meta_gradient_matches_closed_form_with_float32():
    batch = ridge_batch(dtype=torch.float32)
    model = ridge_model(dtype=torch.float32)
    learner = IMAML(model, lam=2.0, inner_steps=200, inner_lr=0.1, cg_steps=10, task_type="regression")
    grad, metrics = learner.meta_gradient(batch)
    exact = ridge_closed_form(model.weight.detach().reshape(-1).double(), [t.double() for t in batch], 2.0)
    assert rel(grad["weight"].reshape(-1).double(), exact) < 1e-5
    assert metrics["query_loss"].shape == (3,) and torch.all(metrics["cg_negative_curvature"] == 0)


def _tanh_mlp(seed=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def test_maml_with_lam_converges_to_implicit_gradient():
    """Unrolled (MAML, lam > 0) meta-gradient -> implicit one as the inner loop converges (float64)."""
    lam, lr = 4.0, 0.1
    g = torch.Generator().manual_seed(5)
    sx, qx = (
        torch.randn(2, 10, 2, generator=g, dtype=torch.float64),
        torch.randn(2, 10, 2, generator=g).double(),
    )
    batch = (sx, torch.sin(sx.sum(-1, keepdim=True)), qx, torch.sin(qx.sum(-1, keepdim=True)))
    model = _tanh_mlp()
    imaml = IMAML(model, lam=lam, inner_steps=400, inner_lr=lr, cg_steps=100, task_type="regression")
    reference, _ = imaml.meta_gradient(batch)
    gaps = {}
    for steps in (1, 5, 10, 25, 50, 100, 200):
        maml = MAML(model, lam=lam, inner_steps=steps, inner_lr=lr, task_type="regression")
        grad, _ = maml.meta_gradient(batch)
        gaps[steps] = rel(grad, reference)
    print("\nMAML(lam=4) vs IMAML relative gap by inner steps:", {k: f"{v:.1e}" for k, v in gaps.items()})
    values = list(gaps.values())
    assert all(
        b < a for a, b in zip(values[:5], values[1:6], strict=True)
    )  # shrinking while not at the floor
    assert values[0] > 1e-2
    assert gaps[200] < 1e-4


def test_maml_lam_zero_is_plain_maml_and_first_order_variants():
    batch = ridge_batch(n_tasks=2)
    model = ridge_model()
    theta = {"weight": model.weight.detach()}
    task = tuple(t[0] for t in batch)
    loss = nn.functional.mse_loss
    # plain MAML, one step: d/dtheta L_q(theta - a grad L_s(theta)) = (I - a H) grad L_q(phi)
    a = 0.1
    res = maml_task_meta_gradient(model, theta, task, loss_fn=loss, lam=0.0, inner_steps=1, inner_lr=a)
    sx, sy, qx, qy = task
    t = theta["weight"].reshape(-1)
    h = 2.0 / sx.shape[0] * sx.T @ sx
    phi = t - a * (h @ t - 2.0 / sx.shape[0] * sx.T @ sy[:, 0])
    gq = 2.0 / qx.shape[0] * qx.T @ (qx @ phi - qy[:, 0])
    assert rel(res.grad["weight"].reshape(-1), (torch.eye(4, dtype=t.dtype) - a * h) @ gq) < 1e-12
    # FOMAML with "gd" = gradient of the query loss at MAML's phi_T
    fo = FOMAML(model, inner_steps=1, inner_lr=a, task_type="regression")
    grad, _ = fo.meta_gradient(tuple(x[:1] for x in batch))
    assert rel(grad["weight"].reshape(-1), gq) < 1e-12
    fo_maml = maml_task_meta_gradient(
        model, theta, task, loss_fn=loss, inner_steps=1, inner_lr=a, first_order=True
    )
    assert rel(fo_maml.grad["weight"].reshape(-1), gq) < 1e-12


# ------------------------------------------------------------------------------------------------------
# evaluation under default Trainer settings (inference_mode=True)


def test_validation_and_test_regression_default_trainer():
    model = ridge_model()
    learner = IMAML(model, lam=2.0, inner_steps=20, inner_lr=0.1, eval_lam=0.0, task_type="regression")
    batches = [ridge_batch(n_tasks=3, seed=s) for s in (10, 11)]
    seen = []

    class _Spy(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append((torch.is_inference_mode_enabled(), batch[0].is_inference()))

    tr = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[_Spy()])
    assert tr.checkpoint_callback is not None  # default settings (validate/test write no checkpoint)
    (val,) = tr.validate(learner, dataloaders=loader(batches), verbose=False)
    assert seen and all(mode and inf for mode, inf in seen)  # the default really is inference mode
    for key in ("val/loss", "val/loss_pre", "val/mse", "val/mse_pre", "val/mse_ci95"):
        assert key in val and math.isfinite(val[key]), key
    assert val["val/loss"] < 0.5 * val["val/loss_pre"]
    (test,) = tr.test(learner, dataloaders=loader(batches), verbose=False)
    # recompute per-task post-adaptation MSE by hand: the mean and 1.96 std / sqrt(n)
    theta = {k: v.detach() for k, v in learner.meta_parameters().items()}
    mses = []
    for sx, sy, qx, qy in batches:
        for i in range(sx.shape[0]):
            phi = learner.adapt_task(theta, sx[i], sy[i])
            pred = torch.func.functional_call(model, phi, (qx[i],))
            mses.append(float(nn.functional.mse_loss(pred, qy[i])))
    mses = torch.tensor(mses, dtype=torch.float64)
    assert test["test/mse"] == pytest.approx(float(mses.mean()), rel=1e-5)
    assert test["test/mse_ci95"] == pytest.approx(float(1.96 * mses.std() / math.sqrt(6)), rel=1e-4)
    assert test["test/n_tasks"] == 6


@pytest.mark.parametrize("cls", [IMAML, MAML, FOMAML])
def test_validation_and_test_classification_default_trainer(cls, tmp_path):
    torch.manual_seed(0)
    net = OmniglotConv4(n_way=5, hidden=8)
    kwargs = dict(inner_steps=2, inner_lr=0.3, eval_inner_steps=5, eval_lam=0.0)
    learner = cls(net, **kwargs)
    batches = [classification_batch(n_tasks=2, seed=s) for s in (0, 1)]
    tr = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        max_steps=1,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    tr.fit(learner, train_dataloaders=loader(batches[:1]), val_dataloaders=loader(batches[:1]))
    (val,) = tr.validate(learner, dataloaders=loader(batches), verbose=False)
    assert {"val/loss", "val/acc", "val/loss_pre", "val/acc_pre"} <= set(val)
    assert val["val/acc"] > val["val/acc_pre"]  # adaptation on the prototypes helps
    (test,) = tr.test(learner, dataloaders=loader(batches), verbose=False)
    assert {"test/acc", "test/acc_ci95", "test/loss", "test/acc_pre"} <= set(test)
    assert 0.0 <= test["test/acc"] <= 1.0 and test["test/acc_ci95"] >= 0.0


# ------------------------------------------------------------------------------------------------------
# robustness


class _Record(pl.Callback):
    def __init__(self):
        self.params = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append({k: v.detach().clone() for k, v in pl_module.meta_parameters().items()})


def test_nan_meta_gradient_skips_step_and_is_counted():
    torch.manual_seed(0)
    net = SinusoidMLP(hidden=8)
    init = {k: v.detach().clone() for k, v in net.named_parameters()}
    bad = list(ridge_batch(n_tasks=2, d=1, dtype=torch.float32, seed=1))
    bad[3] = bad[3].clone()
    bad[3][1, 0, 0] = float("nan")  # one query target of one task
    good = ridge_batch(n_tasks=2, d=1, dtype=torch.float32, seed=2)
    learner = IMAML(net, inner_steps=3, task_type="regression")
    rec = _Record()
    tr = trainer(max_steps=2, callbacks=[rec])
    tr.fit(learner, train_dataloaders=loader([bad, good]))
    for k, v in rec.params[0].items():
        assert torch.equal(v, init[k]), k  # untouched by the NaN step
    assert all(torch.isfinite(v).all() for v in rec.params[1].values())
    assert any(not torch.equal(rec.params[1][k], init[k]) for k in init)  # the clean step moved
    assert tr.callback_metrics["train/skipped_steps"] == 1
    assert learner.skipped_steps == 1 and tr.global_step == 2
    adam_steps = {float(s["step"]) for s in tr.optimizers[0].state.values()}
    assert adam_steps == {1.0}  # the skipped step left the optimiser state alone


class _Repeat(torch.utils.data.IterableDataset):
    """An endless stream of one meta-batch: the data cannot depend on where a run resumes, so any
    difference between a resumed and an uninterrupted run comes from the module's own state."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield tuple(t.clone() for t in self.batch)


def test_exact_resume(tmp_path):
    batch = ridge_batch(n_tasks=2, d=1, dtype=torch.float32, seed=3)

    def stream():
        return DataLoader(_Repeat(batch), batch_size=None)

    def make(seed):
        torch.manual_seed(seed)
        return IMAML(
            SinusoidMLP(hidden=8),
            inner_steps=3,
            task_type="regression",
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        )

    full = make(0)
    tr_full = trainer(max_steps=4)
    tr_full.fit(full, train_dataloaders=stream())

    half = make(0)
    tr_half = trainer(max_steps=2)
    tr_half.fit(half, train_dataloaders=stream())
    ckpt = tmp_path / "half.ckpt"
    tr_half.save_checkpoint(ckpt)

    resumed = make(123)  # different init: everything must come from the checkpoint
    tr_res = trainer(max_steps=4)
    tr_res.fit(resumed, train_dataloaders=stream(), ckpt_path=ckpt)

    assert tr_res.global_step == tr_full.global_step == 4
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    sa, sb = tr_full.optimizers[0].state_dict(), tr_res.optimizers[0].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for name in sa["state"][i]:
            assert torch.equal(sa["state"][i][name], sb["state"][i][name]), (i, name)
    assert (
        tr_full.lr_scheduler_configs[0].scheduler.state_dict()
        == tr_res.lr_scheduler_configs[0].scheduler.state_dict()
    )
    # checkpoints load back without the CLI: pass the network
    loaded = IMAML.load_from_checkpoint(ckpt, model=SinusoidMLP(hidden=8))
    assert loaded.hparams.inner_steps == 3 and loaded.task_type == "regression"


def test_bf16_mixed_on_cpu_trains_without_nan():
    torch.manual_seed(0)
    # the Xavier head: at a zero head the support Hessian is a saddle (head x conv blocks only), I + H/lam
    # can be indefinite and CG's truncation point itself moves with bf16 rounding -- not what this measures
    net = OmniglotConv4(n_way=5, hidden=8, head_init="paper")
    dtypes = []
    net.conv1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    batches = [classification_batch(n_tasks=2, seed=s) for s in range(2)]
    # fixed-step GD for both, so that phi follows the same path and only CG differs (gd_armijo's accept /
    # reject decisions would themselves see the bf16 noise)
    learner = IMAML(
        net, lam=2.0, inner_steps=3, inner_lr=0.1, cg_steps=5, eval_inner_steps=3, inner_optimizer="gd"
    )
    first_order = FOMAML(net, lam=2.0, inner_steps=3, inner_lr=0.1)  # same phi, no CG

    def bf16_gap(module):
        ref, _ = module.meta_gradient(batches[0])  # float32 reference at the initial theta
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = module.meta_gradient(batches[0], module._forward_cast())
        return rel(low, ref)

    gap, gap_fo = bf16_gap(learner), bf16_gap(first_order)
    print(f"\nbf16 vs float32 relative gap at init: implicit {gap:.2e}, query gradient alone {gap_fo:.2e}")
    # bf16 forwards alone move the query gradient by ~0.1-0.3 on this tiny 8-channel toy; CG (run in
    # float32 on float32 vectors) must not amplify that materially
    assert gap < 2.0 * gap_fo
    dtypes.clear()
    tr = trainer(max_steps=2, precision="bf16-mixed")
    tr.fit(learner, train_dataloaders=loader(batches))
    assert torch.bfloat16 in dtypes  # the forward really ran in bf16
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())
    assert math.isfinite(float(tr.callback_metrics["train/loss"]))
    assert learner.skipped_steps == 0
    (val,) = tr.validate(learner, dataloaders=loader(batches[:1]), verbose=False)
    assert math.isfinite(val["val/loss"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed needs a GPU")
def test_fp16_mixed_on_gpu_trains_without_nan():
    torch.manual_seed(0)
    net = OmniglotConv4(n_way=5, hidden=16)
    batches = [classification_batch(n_tasks=2, seed=s) for s in range(3)]
    learner = IMAML(net, lam=2.0, inner_steps=4, inner_lr=0.1, cg_steps=5)
    tr = trainer(max_steps=3, precision="16-mixed", accelerator="gpu")
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    tr.fit(learner, train_dataloaders=loader(batches))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(before[k], v.detach().cpu()) for k, v in net.named_parameters())


# ------------------------------------------------------------------------------------------------------
# construction


def test_constructor_validation_names_bad_values():
    net = SinusoidMLP()
    with pytest.raises(ValueError, match="lam"):
        IMAML(net, lam=0.0)
    with pytest.raises(ValueError, match="cg_steps"):
        IMAML(net, cg_steps=0)
    with pytest.raises(ValueError, match="'newton'"):
        IMAML(net, inner_optimizer="newton")
    with pytest.raises(ValueError, match="task_type"):
        MAML(net, task_type="ranking")
    with pytest.raises(ValueError, match="inner_steps"):
        FOMAML(net, inner_steps=-1)
    with pytest.raises(ValueError, match="leading task dimension"):
        IMAML(net, task_type="regression").meta_gradient((torch.zeros(2, 3, 1), torch.zeros(3, 3, 1)) * 2)
    assert issubclass(IMAML, MetaLearner) and IMAML(net).automatic_optimization is False


def test_lightning_cli_instantiates_with_injected_optimizer(tmp_path):
    from pytorch_lightning.cli import LightningCLI

    cli = LightningCLI(
        IMAML,
        run=False,
        save_config_kwargs={"overwrite": True},
        args=[
            "--model.model=lightning_imaml.SinusoidMLP",
            "--model.task_type=regression",
            "--model.lam=1.5",
            "--model.optimizer=torch.optim.SGD",
            "--model.optimizer.lr=0.05",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    learner = cli.model
    assert isinstance(learner.model, SinusoidMLP) and learner.lam == 1.5
    (opt,) = [learner.configure_optimizers()]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.05
    # defaults: Adam with lr 1e-3
    cli = LightningCLI(
        IMAML, run=False, args=["--model.model=lightning_imaml.SinusoidMLP", "--trainer.logger=false"]
    )
    opt = cli.model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3
    # under the CLI the network's config is kept in the hyperparameters (checkpoints rebuild it)
    assert cli.model.hparams["model"]["class_path"] == "lightning_imaml.SinusoidMLP"


EVAL_KW = {
    "gd_armijo": {"grow": 1.5},
    "gd": {},
    "sgd": {"momentum": 0.9},
    "adam": {"betas": (0.8, 0.9)},
    "lbfgs": {"history_size": 3},
    "hf": {"c1": 1e-3},
}


def _expected_val_loss(learner, batch, optimizer, kwargs):
    """Mean query MSE after adapting with proximal_adapt directly (the reference for val/loss)."""
    from lightning_imaml.inner import proximal_adapt

    sx, sy, qx, qy = batch
    theta = {k: v.detach() for k, v in learner.model.named_parameters()}
    losses = []
    for i in range(sx.shape[0]):

        def support(p, i=i):
            return torch.nn.functional.mse_loss(torch.func.functional_call(learner.model, p, (sx[i],)), sy[i])

        phi = proximal_adapt(
            support, theta, learner.eval_lam, learner.eval_inner_steps, optimizer=optimizer,
            lr=learner.eval_inner_lr, **kwargs,
        )  # fmt: skip
        out = torch.func.functional_call(learner.model, phi, (qx[i],))
        losses.append(torch.nn.functional.mse_loss(out, qy[i]).item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize("train_opt", list(EVAL_KW))
def test_validation_with_every_other_eval_optimizer(train_opt):
    """issue 16, bug 2: the evaluation solver gets its own options, not the training solver's (SGD momentum
    used to reach "gd" and kill the first validation)."""
    batch = ridge_batch(n_tasks=2, d=3)
    for eval_opt in [o for o in EVAL_KW if o != train_opt]:
        learner = IMAML(
            ridge_model(d=3), lam=1.0, inner_steps=3, inner_lr=0.05, inner_optimizer=train_opt,
            inner_optimizer_kwargs=EVAL_KW[train_opt], eval_inner_optimizer=eval_opt, eval_lam=0.0,
            task_type="regression",
        )  # fmt: skip
        assert learner.eval_inner_optimizer_kwargs == {}
        tr = trainer()
        tr.validate(learner, dataloaders=loader([batch]), verbose=False)
        expected = _expected_val_loss(learner, batch, eval_opt, {})
        assert tr.callback_metrics["val/loss"].item() == pytest.approx(expected, rel=1e-6), (
            train_opt,
            eval_opt,
        )


def test_eval_optimizer_options_explicit_and_inherited():
    batch = ridge_batch(n_tasks=2, d=3)
    cases = [  # (train, train kwargs, eval, eval kwargs given, eval kwargs used)
        ("sgd", {"momentum": 0.9}, "adam", {"betas": (0.5, 0.6)}, {"betas": (0.5, 0.6)}),
        ("sgd", {"momentum": 0.9}, None, None, {"momentum": 0.9}),  # same solver: inherits
        ("sgd", {"momentum": 0.9}, "sgd", {"momentum": 0.1}, {"momentum": 0.1}),
    ]
    for train_opt, train_kw, eval_opt, eval_kw, used in cases:
        learner = IMAML(
            ridge_model(d=3), lam=1.0, inner_steps=3, inner_lr=0.05, inner_optimizer=train_opt,
            inner_optimizer_kwargs=train_kw, eval_inner_optimizer=eval_opt,
            eval_inner_optimizer_kwargs=eval_kw, eval_lam=0.0, eval_inner_lr=0.03, eval_inner_steps=4,
            task_type="regression",
        )  # fmt: skip
        assert learner.eval_inner_optimizer_kwargs == used
        assert (learner.eval_inner_lr, learner.eval_inner_steps) == (0.03, 4)
        tr = trainer()
        tr.validate(learner, dataloaders=loader([batch]), verbose=False)
        expected = _expected_val_loss(learner, batch, eval_opt or train_opt, used)
        assert tr.callback_metrics["val/loss"].item() == pytest.approx(expected, rel=1e-6)
    # MAML and FOMAML take the option too
    for cls in (MAML, FOMAML):
        learner = cls(
            ridge_model(d=3), eval_inner_optimizer="sgd", eval_inner_optimizer_kwargs={"momentum": 0.5}
        )
        assert learner.eval_inner_optimizer_kwargs == {"momentum": 0.5}


def test_first_order_maml_with_lam_is_the_query_gradient_at_phi_T():
    """issue 16, bug 3: with first_order=True and lam > 0, d phi_T / d theta = I (the docstring said
    "I + the proximal part"; keeping the proximal part differentiable gives I as well). Checked against
    central finite differences of L_q at phi_T, and against the chain with the proximal term kept live."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    g = torch.Generator().manual_seed(1)
    sx, qx = (
        torch.randn(6, 2, generator=g, dtype=torch.float64),
        torch.randn(6, 2, generator=g, dtype=torch.float64),
    )
    sy, qy = torch.sin(sx.sum(1, keepdim=True)), torch.sin(qx.sum(1, keepdim=True))
    theta = {k: v.detach() for k, v in model.named_parameters()}
    lam, a, steps = 0.7, 0.2, 3
    loss = nn.functional.mse_loss
    res = maml_task_meta_gradient(
        model, theta, (sx, sy, qx, qy), loss_fn=loss, lam=lam, inner_steps=steps, inner_lr=a, first_order=True
    )

    def f(p, x):
        return torch.func.functional_call(model, p, (x,))

    phi = dict(theta)
    for _ in range(steps):  # plain unrolled loop, no graph
        gs = torch.func.grad(lambda p: loss(f(p, sx), sy))(phi)
        phi = {k: phi[k] - a * (gs[k] + lam * (phi[k] - theta[k])) for k in phi}
    h, worst = 1e-6, 0.0
    for k in phi:
        for idx in range(phi[k].numel()):
            e = torch.zeros_like(phi[k]).reshape(-1)
            e[idx] = h
            e = e.reshape(phi[k].shape)
            up = loss(f({**phi, k: phi[k] + e}, qx), qy)
            down = loss(f({**phi, k: phi[k] - e}, qx), qy)
            fd = ((up - down) / (2 * h)).item()
            worst = max(worst, abs(fd - res.grad[k].reshape(-1)[idx].item()))
    scale = max(v.abs().max().item() for v in res.grad.values())
    assert worst < 1e-8 * max(1.0, scale), worst

    # proximal term kept differentiable, support gradient detached: the same gradient
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    p = dict(th)
    for _ in range(steps):
        gs = torch.func.grad(lambda q: loss(f(q, sx), sy))({k: v.detach() for k, v in p.items()})
        p = {k: p[k] - a * (gs[k] + lam * (p[k] - th[k])) for k in p}
    live = torch.autograd.grad(loss(f(p, qx), qy), list(th.values()))
    for k, gl in zip(th, live, strict=True):
        assert torch.allclose(gl, res.grad[k], rtol=1e-12, atol=1e-14), k


def test_16_mixed_grad_scaler_skips_a_nan_step_on_cpu():
    """The GradScaler branch of the NaN guard, driven on CPU with Lightning's own 16-mixed plugin and a CPU
    GradScaler (Lightning would turn precision="16-mixed" into bf16 on CPU): the NaN step is skipped by the
    scaler itself (its scale halves, parameters and Adam state untouched), the clean step moves."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    net = SinusoidMLP(hidden=8)
    init = {k: v.detach().clone() for k, v in net.named_parameters()}
    bad = list(ridge_batch(n_tasks=2, d=1, dtype=torch.float32, seed=1))
    bad[3] = bad[3].clone()
    bad[3][1, 0, 0] = float("nan")
    good = ridge_batch(n_tasks=2, d=1, dtype=torch.float32, seed=2)
    learner = IMAML(net, inner_steps=3, task_type="regression")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    rec = _Record()
    tr = trainer(
        max_steps=2, plugins=[MixedPrecision("16-mixed", device="cpu", scaler=scaler)], callbacks=[rec]
    )
    tr.fit(learner, train_dataloaders=loader([bad, good]))
    assert scaler.get_scale() == 2.0**7  # one inf/NaN step seen by the scaler
    assert learner.skipped_steps == 1
    assert all(torch.equal(rec.params[0][k], init[k]) for k in init)
    assert any(not torch.equal(rec.params[1][k], init[k]) for k in init)
    assert {float(s["step"]) for s in tr.optimizers[0].state.values()} == {1.0}


def test_reduce_lr_on_plateau_steps_on_validation_loss_only():
    """A ReduceLROnPlateau outer scheduler is stepped after each validation on val/loss (not per training
    step): with a tiny outer lr (1e-6: ReduceLROnPlateau ignores changes below its eps 1e-8) the validation
    loss cannot improve by its 1e-4 threshold, so after the first (best) validation
    every further one halves the lr (patience 0)."""
    batch = ridge_batch(n_tasks=2, d=1, dtype=torch.float32, seed=3)
    learner = IMAML(
        SinusoidMLP(hidden=8), inner_steps=2, task_type="regression",
        optimizer=functools.partial(torch.optim.SGD, lr=1e-6),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5),
    )  # fmt: skip
    tr = trainer(max_steps=3, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    tr.fit(learner, train_dataloaders=loader([batch] * 3), val_dataloaders=loader([batch]))
    # 3 validations: the first sets the best, the two others do not improve on it
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-6 * 0.25)
