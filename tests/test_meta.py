"""IMAML / MAML / FOMAML LightningModules: exact meta-gradients, evaluation, NaN guard, resume, AMP, the inner
solvers as objects / configs / flat arguments, checkpointed hyperparameters and the task chunking.

Ground truths: ridge-regression tasks, where the proximal inner problem
    phi*(theta) = argmin_phi 1/K ||X phi - y||^2 + lam/2 ||phi - theta||^2
has the closed form phi* = A^{-1} (2/K X^T y + lam theta), A = 2/K X^T X + lam I, and the exact
meta-gradient of L_q(phi*(theta)) is lam A^{-1} grad L_q(phi*) (A symmetric), ``helpers.ridge_closed_form``;
with IMAML's default cg_damping d = 1 the system solved is ((1 + d) I + H/lam), so the reference is
lam (A + d lam I)^{-1} grad L_q(phi*).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from helpers import rel, ridge_batch, ridge_closed_form
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_imaml import FOMAML, IMAML, MAML, MetaLearner, OmniglotConv4, SinusoidMLP
from lightning_imaml.batched import ChunkTuner
from lightning_imaml.functional import ForwardCast
from lightning_imaml.inner import (
    GD,
    LBFGS,
    SGD,
    Adam,
    GDArmijo,
    HessianFree,
    TorchOptimizer,
    make_solver,
    proximal_adapt,
)
from lightning_imaml.metagrad import maml_meta_gradient, mse_loss

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


def ridge_model(d=4, dtype=torch.float64, seed=1):
    """nn.Linear(d, 1, bias=False): the model of ``helpers.ridge_closed_form``."""
    torch.manual_seed(seed)
    return nn.Linear(d, 1, bias=False).to(dtype)


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


def flat(params) -> torch.Tensor:
    return torch.cat([params[k].reshape(-1) for k in sorted(params)])


def _theta(module):
    return {k: v.detach().clone() for k, v in module.meta_parameters().items()}


class _Record(pl.Callback):
    """The meta-parameters after every training step."""

    def __init__(self):
        self.params = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(_theta(pl_module))


class _LogRecords(logging.Handler):
    """Collects the messages of Lightning's rank-zero logger (it does not propagate to the root logger)."""

    name_ = "pytorch_lightning.utilities.rank_zero"

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger = logging.getLogger(self.name_)
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


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
    expected = theta0 - lr * ridge_closed_form(theta0, batch, lam, cg_damping=1.0)  # IMAML's default damping
    err = rel(theta1 - theta0, expected - theta0)
    print(f"\nridge: relative error of the IMAML step vs -lr x closed form = {err:.2e}")
    assert err < 1e-9


def test_imaml_meta_gradient_matches_closed_form_with_float32():
    batch = ridge_batch(dtype=torch.float32)
    model = ridge_model(dtype=torch.float32)
    learner = IMAML(
        model,
        lam=2.0,
        inner_steps=200,
        inner_lr=0.1,
        cg_steps=10,
        cg_damping=0.0,  # the paper's system (I + H/lam)
        task_type="regression",
        batched_tasks=False,
    )
    grad, metrics = learner.meta_gradient(batch)
    exact = ridge_closed_form(model.weight.detach().reshape(-1).double(), [t.double() for t in batch], 2.0)
    assert rel(grad["weight"].reshape(-1), exact) < 1e-5
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
    imaml = IMAML(
        model,
        lam=lam,
        inner_optimizer="gd_armijo",
        inner_steps=400,
        inner_lr=lr,
        cg_steps=100,
        cg_damping=0.0,  # the exact implicit gradient, which MAML(lam) tends to
        task_type="regression",
    )
    reference, _ = imaml.meta_gradient(batch)
    gaps = {}
    for steps in (1, 5, 10, 25, 50, 100, 200):
        maml = MAML(
            model, lam=lam, inner_steps=steps, inner_lr=lr, task_type="regression", batched_tasks=False
        )
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
    one = tuple(t[:1] for t in batch)
    # plain MAML, one step: d/dtheta L_q(theta - a grad L_s(theta)) = (I - a H) grad L_q(phi)
    a = 0.1
    sx, sy, qx, qy = (t[0] for t in one)
    t = theta["weight"].reshape(-1)
    h = 2.0 / sx.shape[0] * sx.T @ sx
    phi = t - a * (h @ t - 2.0 / sx.shape[0] * sx.T @ sy[:, 0])
    gq = 2.0 / qx.shape[0] * qx.T @ (qx @ phi - qy[:, 0])
    maml = MAML(model, lam=0.0, inner_steps=1, inner_lr=a, task_type="regression")
    grad, metrics = maml.meta_gradient(one)
    assert rel(grad["weight"].reshape(-1), (torch.eye(4, dtype=t.dtype) - a * h) @ gq) < 1e-12
    # (the logged metrics are float32)
    assert metrics["query_loss"].item() == pytest.approx(float(((qx @ phi - qy[:, 0]) ** 2).mean()), rel=1e-6)
    # FOMAML with "gd" = gradient of the query loss at MAML's phi_T
    fo = FOMAML(model, inner_steps=1, inner_lr=a, task_type="regression")
    grad, _ = fo.meta_gradient(one)
    assert rel(grad["weight"].reshape(-1), gq) < 1e-12
    # the unrolled loop with every inner gradient detached: the same
    fo_maml = maml_meta_gradient(
        model, theta, one, loss_fn=mse_loss, inner_steps=1, inner_lr=a, first_order=True
    )
    assert rel(fo_maml.grad[0], gq) < 1e-12


# ------------------------------------------------------------------------------------------------------
# evaluation under default Trainer settings (inference_mode=True)


def test_validation_and_test_regression_default_trainer():
    model = ridge_model()
    learner = IMAML(
        model,
        lam=2.0,
        inner_optimizer="gd_armijo",
        inner_steps=20,
        inner_lr=0.1,
        eval_lam=0.0,
        task_type="regression",
    )
    batches = [ridge_batch(n_tasks=3, seed=s) for s in (10, 11)]
    seen = []

    class _Spy(pl.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen.append((torch.is_inference_mode_enabled(), batch[0].is_inference()))

    tr = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[_Spy()])
    assert tr.checkpoint_callback is not None  # default settings (validate/test write no checkpoint)
    (val,) = tr.validate(learner, dataloaders=loader(batches), verbose=False)
    assert seen and all(mode and inf for mode, inf in seen)  # the default really is inference mode
    for key in ("val/loss", "val/loss_pre", "val/mse", "val/mse_pre", "val/mse_ci95", "val/n_tasks"):
        assert key in val and math.isfinite(val[key]), key
    assert "val/acc" not in val
    assert val["val/loss"] < 0.5 * val["val/loss_pre"]
    (test,) = tr.test(learner, dataloaders=loader(batches), verbose=False)
    # per-task post-adaptation MSE by hand (20 gd_armijo steps of lr 0.1 at lam 0 from theta, the query
    # MSE at phi): the mean and 1.96 std / sqrt(n); before adaptation: the MSE at theta
    theta = _theta(learner)
    mses, pre = [], []
    for sx, sy, qx, qy in batches:
        for i in range(sx.shape[0]):

            def support(p, i=i, sx=sx, sy=sy):
                return ((torch.func.functional_call(model, p, (sx[i],)) - sy[i]) ** 2).mean()

            phi, _ = proximal_adapt(support, theta, 0.0, 20, optimizer="gd_armijo", lr=0.1)
            assert rel(learner.adapt_task(theta, sx[i], sy[i]), phi) < 1e-12
            mses.append(
                float(nn.functional.mse_loss(torch.func.functional_call(model, phi, (qx[i],)), qy[i]))
            )
            pre.append(float(nn.functional.mse_loss(model(qx[i]), qy[i])))
    mses = torch.tensor(mses, dtype=torch.float64)
    assert test["test/mse"] == pytest.approx(float(mses.mean()), rel=1e-5)
    assert test["test/loss"] == test["test/mse"]
    assert test["test/mse_pre"] == pytest.approx(sum(pre) / len(pre), rel=1e-5)
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
    assert {"val/loss", "val/acc", "val/loss_pre", "val/acc_pre", "val/acc_ci95", "val/n_tasks"} <= set(val)
    assert "val/mse" not in val and val["val/n_tasks"] == 4
    assert val["val/acc"] > val["val/acc_pre"]  # adaptation on the prototypes helps
    (test,) = tr.test(learner, dataloaders=loader(batches), verbose=False)
    assert {"test/acc", "test/acc_ci95", "test/loss", "test/acc_pre"} <= set(test)
    assert 0.0 <= test["test/acc"] <= 1.0 and test["test/acc_ci95"] >= 0.0
    # accuracy by hand: adapt each task with the evaluation solver (5 steps of lr 0.3 at lam 0), argmax
    theta = _theta(learner)
    hits = []
    for sx, sy, qx, qy in batches:
        for i in range(sx.shape[0]):

            def support(p, i=i, sx=sx, sy=sy):
                return nn.functional.cross_entropy(torch.func.functional_call(net, p, (sx[i],)), sy[i])

            phi, _ = proximal_adapt(support, theta, 0.0, 5, optimizer=learner.eval_solver.name, lr=0.3)
            out = torch.func.functional_call(net, phi, (qx[i],))
            hits.append(float((out.argmax(-1) == qy[i]).float().mean()))
    assert test["test/acc"] == pytest.approx(sum(hits) / len(hits), abs=1e-6)


# ------------------------------------------------------------------------------------------------------
# robustness


def _nan_and_clean_batches():
    bad = list(ridge_batch(n_tasks=2, d=1, dtype=torch.float32, seed=1))
    bad[3] = bad[3].clone()
    bad[3][1, 0, 0] = float("nan")  # one query target of one task
    good = ridge_batch(n_tasks=2, d=1, dtype=torch.float32, seed=2)
    return bad, good


def test_nan_meta_gradient_skips_step_and_is_counted():
    torch.manual_seed(0)
    net = SinusoidMLP(hidden=8)
    init = {k: v.detach().clone() for k, v in net.named_parameters()}
    bad, good = _nan_and_clean_batches()
    learner = IMAML(net, inner_steps=3, task_type="regression")
    rec = _Record()
    tr = trainer(max_steps=2, callbacks=[rec])
    tr.fit(learner, train_dataloaders=loader([bad, good]))
    for k, v in rec.params[0].items():
        assert torch.equal(v, init[k]), k
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
            # the per-task loop in every run: a chunk size chosen by timing may differ between runs, and
            # chunk sizes agree only to float rounding (bit-exact resume is what this checks)
            batched_tasks=False,
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
    # checkpoints hold primitives only and load back without the CLI: pass the network
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hp["lr_scheduler"] == {
        "class_path": "torch.optim.lr_scheduler.StepLR",
        "init_args": {"step_size": 1, "gamma": 0.5},
    }
    loaded = IMAML.load_from_checkpoint(ckpt, model=SinusoidMLP(hidden=8))
    assert loaded.hparams.inner_steps == 3 and loaded.task_type == "regression"
    assert loaded.inner_solver == half.inner_solver == LBFGS(steps=3, lr=1.0)  # the default solver, its lr
    assert loaded.eval_solver == half.eval_solver
    assert loaded.skipped_steps == 0 and loaded.batched_tasks is False


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
    # (the per-task loop for the comparison: a chunk size is chosen once per stage, here without autocast;
    # the Trainer below chooses it under its autocast)
    learner = IMAML(
        net, lam=2.0, inner_steps=3, inner_lr=0.1, cg_steps=5, inner_optimizer="gd", batched_tasks=False
    )
    first_order = FOMAML(net, lam=2.0, inner_steps=3, inner_lr=0.1, batched_tasks=False)  # same phi, no CG
    bf16 = ForwardCast("cpu", torch.bfloat16)

    def bf16_gap(module):
        ref, _ = module.meta_gradient(batches[0])  # float32 reference at the initial theta
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = module.meta_gradient(batches[0], bf16)
        return rel(low, ref)

    gap, gap_fo = bf16_gap(learner), bf16_gap(first_order)
    print(f"\nbf16 vs float32 relative gap at init: implicit {gap:.2e}, query gradient alone {gap_fo:.2e}")
    # bf16 forwards alone move the query gradient by ~0.1-0.3 on this tiny 8-channel toy; CG (run in
    # float32 on float32 vectors) must not amplify that materially
    assert 0 < gap < 2.0 * gap_fo
    dtypes.clear()
    learner = IMAML(
        net, lam=2.0, inner_steps=3, inner_lr=0.1, cg_steps=5, eval_inner_steps=3, inner_optimizer="gd"
    )
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
    (val,) = tr.validate(learner, dataloaders=loader(batches[:1]), verbose=False)
    assert math.isfinite(val["val/loss"])


# ------------------------------------------------------------------------------------------------------
# construction


BAD_VALUES = [  # (class, constructor arguments, a word the error must name)
    (IMAML, {"lam": 0.0}, r"\blam\b"),
    (IMAML, {"lam": -1.0}, r"\blam\b"),
    (MAML, {"lam": -1.0}, r"\blam\b"),
    (IMAML, {"eval_lam": -0.5}, "eval_lam"),
    (IMAML, {"cg_steps": 0}, "cg_steps"),
    (IMAML, {"cg_steps": 2.0}, "cg_steps"),
    (IMAML, {"cg_damping": -1.0}, "cg_damping"),
    (IMAML, {"learn_lam": "everything"}, "learn_lam"),
    (IMAML, {"lam_lr": 0.0}, "lam_lr"),
    (IMAML, {"inner_optimizer": "newton"}, "'newton'"),
    (IMAML, {"eval_inner_optimizer": "newton"}, "eval_inner_optimizer"),
    (MAML, {"task_type": "ranking"}, "task_type"),
    (FOMAML, {"inner_steps": -1}, "steps"),
    (MAML, {"inner_steps": -1}, "inner_steps"),
    (IMAML, {"inner_lr": 0.0}, r"\blr\b"),
    (IMAML, {"inner_tol": -1e-3}, r"\btol\b"),
    (IMAML, {"inner_atol": -1e-3}, r"\batol\b"),
    (IMAML, {"inner_optimizer": "gd", "inner_optimizer_kwargs": {"momentum": 0.9}}, "momentum"),
    (IMAML, {"inner_optimizer": "lbfgs", "inner_optimizer_kwargs": {"history_size": 0}}, "history_size"),
    (
        IMAML,
        {"eval_inner_optimizer": "hf", "eval_inner_optimizer_kwargs": {"max_backtracks": 0}},
        "max_backtracks",
    ),
    (IMAML, {"batched_chunk_size": 0}, "batched_chunk_size"),
    (IMAML, {"batched_chunk_size": 2.0}, "batched_chunk_size"),
    (IMAML, {"optimizer": None}, "optimizer"),
    (IMAML, {"optimizer": {"class_path": "torch.optim.NoSuchOptimizer"}}, "optimizer"),
    (IMAML, {"lr_scheduler": 3}, "lr_scheduler"),
    (IMAML, {"inner_solver": "newton"}, "'newton'"),
    (IMAML, {"inner_solver": {"class_path": "torch.optim.SGD"}}, "inner_solver"),
    (IMAML, {"inner_solver": {"class_path": "lightning_imaml.inner.NoSuchSolver"}}, "inner_solver"),
    (IMAML, {"eval_solver": 3}, "eval_solver"),
    (
        IMAML,
        {"inner_solver": {"class_path": "lightning_imaml.inner.GD", "init_args": {"steps": -2}}},
        "steps",
    ),
]


@pytest.mark.parametrize(
    "cls,kwargs,name",
    BAD_VALUES,
    ids=[f"{c.__name__}-{next(iter(k))}-{i}" for i, (c, k, _) in enumerate(BAD_VALUES)],
)
def test_constructor_validation_names_bad_values(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(SinusoidMLP(), **kwargs)


def test_constructor_and_episode_checks():
    with pytest.raises(ValueError, match="model"):
        IMAML("not a module")
    net = SinusoidMLP()
    learner = IMAML(net, task_type="regression")
    with pytest.raises(ValueError, match="leading task dimension"):
        learner.meta_gradient((torch.zeros(2, 3, 1), torch.zeros(3, 3, 1)) * 2)
    with pytest.raises(ValueError, match="query_y"):
        learner.meta_gradient({"support_x": 0, "support_y": 0, "query_x": 0})
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
            "--model.inner_optimizer=sgd",
            "--model.inner_steps=4",
            "--model.inner_optimizer_kwargs={momentum: 0.5}",
            "--model.inner_tol=1e-4",
            "--model.optimizer=torch.optim.SGD",
            "--model.optimizer.lr=0.05",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    learner = cli.model
    assert isinstance(learner.model, SinusoidMLP) and learner.lam == 1.5
    assert learner.inner_solver == SGD(steps=4, lr=0.1, tol=1e-4, momentum=0.5)
    assert learner.eval_solver == SGD(steps=4, lr=0.1, momentum=0.5)
    (opt,) = [learner.configure_optimizers()]
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.05
    # defaults: Adam with lr 1e-3
    cli = LightningCLI(
        IMAML, run=False, args=["--model.model=lightning_imaml.SinusoidMLP", "--trainer.logger=false"]
    )
    opt = cli.model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3
    assert cli.model.inner_solver == LBFGS(steps=8, lr=1.0)
    # under the CLI the network's config is kept in the hyperparameters (checkpoints rebuild it)
    assert cli.model.hparams["model"]["class_path"] == "lightning_imaml.SinusoidMLP"
    # MAML under the CLI: every inherited argument arrives with its default, which is not "another solver"
    cli = LightningCLI(
        MAML, run=False, args=["--model.model=lightning_imaml.SinusoidMLP", "--trainer.logger=false"]
    )
    assert cli.model.inner_solver == GD(steps=1, lr=0.4)


def test_lightning_cli_takes_solver_class_path_configs(tmp_path):
    """``inner_solver`` / ``eval_solver`` by class_path on the command line, as the docstring of MetaLearner
    (solvers "as objects, registered names or class_path configs") and the configs format promise."""
    from pytorch_lightning.cli import LightningCLI

    cli = LightningCLI(
        IMAML,
        run=False,
        args=[
            "--model.model=lightning_imaml.SinusoidMLP",
            "--model.inner_solver=lightning_imaml.inner.GDArmijo",
            "--model.inner_solver.steps=3",
            "--model.eval_solver=lightning_imaml.inner.GD",
            "--model.eval_solver.steps=2",
            "--model.eval_solver.lr=0.05",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert cli.model.inner_solver == GDArmijo(steps=3)
    assert cli.model.eval_solver == GD(steps=2, lr=0.05)


# ------------------------------------------------------------------------------------------------------
# inner solvers: objects, configs, names and flat arguments


def test_solver_objects_configs_and_names_give_the_same_learner():
    net = SinusoidMLP(hidden=8)
    by_object = IMAML(net, inner_solver=GDArmijo(steps=3), eval_solver=GD(steps=2, lr=0.05))
    by_config = IMAML(
        net,
        inner_solver={"class_path": "lightning_imaml.inner.GDArmijo", "init_args": {"steps": 3}},
        eval_solver={"class_path": "lightning_imaml.inner.GD", "init_args": {"steps": 2, "lr": 0.05}},
    )
    for learner in (by_object, by_config):
        assert learner.inner_solver == GDArmijo(steps=3, lr=0.1, armijo_c=0.5)
        assert learner.eval_solver == GD(steps=2, lr=0.05)
    # a solver object wins over the flat arguments
    learner = IMAML(net, inner_optimizer="sgd", inner_steps=9, inner_solver=Adam(steps=2, betas=(0.5, 0.6)))
    assert learner.inner_solver == Adam(steps=2, betas=(0.5, 0.6))
    assert learner.eval_solver == Adam(steps=2, betas=(0.5, 0.6))  # the evaluation one inherits it


def test_solver_names_give_the_registered_solvers():
    """A registered name for ``inner_solver`` / ``eval_solver`` (MetaLearner's docstring: "as objects (...),
    registered names or class_path configs"): the solver with its default options."""
    by_name = IMAML(SinusoidMLP(hidden=8), inner_solver="gd_armijo", eval_solver="gd")
    assert by_name.inner_solver == GDArmijo() and by_name.eval_solver == GD()


def test_solver_objects_are_the_ones_used_in_training_and_evaluation():
    """The training solver decides phi (its steps are the diagnostics' iterations; the meta-gradient equals
    the flat-argument learner's), the evaluation solver the validation loss (against proximal_adapt by
    name)."""
    batch = ridge_batch(n_tasks=2, d=3)
    model = ridge_model(d=3)
    learner = IMAML(model, lam=1.0, task_type="regression", eval_lam=0.0,
                    inner_solver=GDArmijo(steps=3), eval_solver=GD(steps=2, lr=0.05))  # fmt: skip
    grad, metrics = learner.meta_gradient(batch)
    assert torch.all(metrics["inner_iterations"] == 3)
    flat_learner = IMAML(model, lam=1.0, task_type="regression", inner_optimizer="gd_armijo", inner_steps=3)
    grad_flat, _ = flat_learner.meta_gradient(batch)
    assert torch.equal(grad["weight"], grad_flat["weight"])
    tr = trainer()
    tr.validate(learner, dataloaders=loader([batch]), verbose=False)
    expected = _expected_val_loss(learner, batch, "gd", 2, 0.05, {})
    assert tr.callback_metrics["val/loss"].item() == pytest.approx(expected, rel=1e-6)  # logged in float32


FLAT_CASES = [  # (flat arguments of IMAML, training solver, evaluation solver)
    ({}, LBFGS(steps=8, lr=1.0), LBFGS(steps=8, lr=1.0)),  # the default: 8 L-BFGS iterations from step 1
    ({"inner_optimizer": "gd_armijo"}, GDArmijo(steps=16, lr=0.1), GDArmijo(steps=16, lr=0.1)),  # its own
    (
        {
            "inner_optimizer": "sgd",
            "inner_steps": 4,
            "inner_lr": 0.02,
            "inner_optimizer_kwargs": {"momentum": 0.9},
        },
        SGD(steps=4, lr=0.02, momentum=0.9),
        SGD(steps=4, lr=0.02, momentum=0.9),
    ),
    (
        {"inner_optimizer": "hf", "inner_steps": 2, "inner_lr": 0.5, "hf_cg_steps": 7},
        HessianFree(steps=2, lr=0.5, cg_steps=7),
        HessianFree(steps=2, lr=0.5, cg_steps=7),
    ),
    (
        {"inner_optimizer": "gd", "inner_steps": 3, "eval_inner_optimizer": "hf", "hf_cg_steps": 3},
        GD(steps=3, lr=0.1),
        HessianFree(steps=3, lr=0.1, cg_steps=3),
    ),
    (
        {"eval_inner_steps": 7, "eval_inner_lr": 0.01},
        LBFGS(steps=8, lr=1.0),
        LBFGS(steps=7, lr=0.01),
    ),
    (
        {
            "inner_optimizer": "adam",
            "inner_steps": 5,
            "inner_optimizer_kwargs": {"betas": (0.5, 0.6)},
            "eval_inner_optimizer": "lbfgs",
            "eval_inner_optimizer_kwargs": {"history_size": 3},
        },
        Adam(steps=5, lr=0.1, betas=(0.5, 0.6)),
        LBFGS(steps=5, lr=0.1, history_size=3),
    ),
    (
        {
            "inner_optimizer": "sgd",
            "inner_optimizer_kwargs": {"momentum": 0.9},
            "eval_inner_optimizer": "sgd",
            "eval_inner_optimizer_kwargs": {"momentum": 0.1},
            "eval_inner_steps": 4,
        },
        SGD(steps=16, lr=0.1, momentum=0.9),
        SGD(steps=4, lr=0.1, momentum=0.1),
    ),
    (
        {
            "inner_optimizer": "torch",
            "inner_steps": 2,
            "inner_optimizer_kwargs": {"torch_optimizer": "torch.optim.RMSprop", "kwargs": {"alpha": 0.9}},
        },
        TorchOptimizer(steps=2, lr=0.1, torch_optimizer=torch.optim.RMSprop, kwargs={"alpha": 0.9}),
        TorchOptimizer(steps=2, lr=0.1, torch_optimizer=torch.optim.RMSprop, kwargs={"alpha": 0.9}),
    ),
    ({"inner_optimizer": "gd", "inner_steps": None, "inner_lr": None}, GD(), GD()),  # the solver's defaults
    # the tolerances stop training solves early; evaluation solves run all their steps
    ({"inner_tol": 1e-3, "inner_atol": 1e-6}, LBFGS(tol=1e-3, atol=1e-6), LBFGS()),
    (
        {"inner_optimizer": "gd", "inner_tol": 1e-3, "eval_inner_optimizer": "sgd"},
        GD(tol=1e-3),
        SGD(),
    ),
    (
        {"inner_optimizer": "sgd", "inner_atol": 1e-5, "eval_inner_optimizer_kwargs": {"momentum": 0.5}},
        SGD(atol=1e-5),
        SGD(momentum=0.5),
    ),
]


@pytest.mark.parametrize("kwargs,train,evaluation", FLAT_CASES)
def test_flat_arguments_build_the_same_solvers_as_objects(kwargs, train, evaluation):
    learner = IMAML(SinusoidMLP(hidden=8), **kwargs)
    assert learner.inner_solver == train
    assert learner.eval_solver == evaluation
    assert learner.eval_solver.tol == learner.eval_solver.atol == 0.0


def test_inner_tolerance_stops_training_solves_early_and_keeps_the_meta_gradient():
    lam = 2.0
    batch = ridge_batch()
    model = ridge_model()
    learner = IMAML(model, lam=lam, inner_steps=300, inner_lr=0.1, cg_steps=20, task_type="regression",
                    inner_tol=1e-10)  # fmt: skip
    assert learner.inner_solver.tol == 1e-10 and learner.eval_solver.tol == 0.0
    grad, metrics = learner.meta_gradient(batch)
    assert torch.all(metrics["inner_iterations"] < 300), metrics["inner_iterations"]
    assert torch.all(metrics["inner_residual_rel"] <= 1e-10)
    exact = ridge_closed_form(model.weight.detach().reshape(-1), batch, lam, cg_damping=1.0)
    assert rel(grad["weight"].reshape(-1), exact) < 1e-8
    without = IMAML(
        model,
        lam=lam,
        inner_steps=300,
        inner_lr=0.1,
        cg_steps=20,
        task_type="regression",
        batched_tasks=False,
    )
    _, full = without.meta_gradient(batch)
    assert torch.all(full["inner_iterations"] == 300)


def test_maml_refuses_another_training_solver():
    net = SinusoidMLP(hidden=8)
    with pytest.raises(ValueError, match="inner_optimizer"):
        MAML(net, inner_optimizer="sgd")
    with pytest.raises(ValueError, match="inner_optimizer"):
        MAML(net, inner_optimizer="gd_armijo")
    with pytest.raises(ValueError, match="momentum"):
        MAML(net, inner_optimizer_kwargs={"momentum": 0.9})
    with pytest.raises(ValueError, match="GDArmijo"):
        MAML(net, inner_solver=GDArmijo(steps=3))
    # plain GD by name, and any evaluation solver, are fine
    learner = MAML(net, inner_optimizer="gd", inner_steps=2, inner_lr=0.3, eval_inner_optimizer="lbfgs")
    assert learner.inner_solver == GD(steps=2, lr=0.3)
    assert learner.eval_solver == LBFGS(steps=2, lr=0.3)
    assert (learner.inner_steps, learner.inner_lr) == (2, 0.3)
    fo = FOMAML(net, inner_optimizer="sgd", inner_optimizer_kwargs={"momentum": 0.9})
    assert fo.inner_solver == SGD(steps=1, lr=0.4, momentum=0.9)


def _assert_primitive(value, path="hparams"):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), path
            _assert_primitive(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_primitive(v, f"{path}[{i}]")
    else:
        assert value is None or isinstance(value, (bool, int, float, str)), (path, value)


SOLVER_PAIRS = {
    "gd_armijo-gd": (GDArmijo(steps=3), GD(steps=2, lr=0.05)),
    "adam-lbfgs": (Adam(steps=2, betas=(0.5, 0.6), amsgrad=True), LBFGS(steps=3, history_size=2)),
    "hf-sgd": (HessianFree(steps=2, cg_steps=3, c1=1e-3), SGD(steps=2, momentum=0.9, nesterov=True)),
    "tol": (GD(steps=3, tol=1e-3, atol=1e-6), None),
    "torch-rmsprop": (
        TorchOptimizer(steps=2, torch_optimizer=torch.optim.RMSprop, kwargs={"alpha": 0.9}),
        GD(),
    ),
}


@pytest.mark.parametrize("pair", list(SOLVER_PAIRS))
def test_checkpoint_hyperparameters_are_primitives_and_rebuild_the_solvers(pair, tmp_path):
    inner, evaluation = SOLVER_PAIRS[pair]
    torch.manual_seed(0)
    learner = IMAML(
        SinusoidMLP(hidden=8), task_type="regression", inner_solver=inner, eval_solver=evaluation,
        optimizer=sgd(0.01), lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2),
        batched_tasks=False,
    )  # fmt: skip
    tr = trainer(max_steps=1)
    tr.fit(learner, train_dataloaders=loader([ridge_batch(n_tasks=2, d=1, dtype=torch.float32)]))
    ckpt = tmp_path / "solvers.ckpt"
    tr.save_checkpoint(ckpt)
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    _assert_primitive(hp)
    assert hp["inner_solver"]["class_path"] == f"lightning_imaml.inner.{type(inner).__name__}"
    assert hp["optimizer"]["init_args"] == {"lr": 0.01}
    loaded = IMAML.load_from_checkpoint(ckpt, model=SinusoidMLP(hidden=8))
    opt = loaded.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.01
    assert loaded.inner_solver == learner.inner_solver == inner
    assert loaded.eval_solver == learner.eval_solver
    assert torch.equal(flat(_theta(loaded)), flat(_theta(learner)))


def test_checkpoint_of_flat_arguments_rebuilds_the_solvers(tmp_path):
    learner = IMAML(
        SinusoidMLP(hidden=8), task_type="regression", inner_optimizer="sgd", inner_steps=2,
        inner_optimizer_kwargs={"momentum": 0.9}, inner_tol=1e-4, eval_inner_optimizer="hf", hf_cg_steps=3,
        eval_inner_steps=2, batched_tasks=False,
    )  # fmt: skip
    tr = trainer(max_steps=1)
    tr.fit(learner, train_dataloaders=loader([ridge_batch(n_tasks=2, d=1, dtype=torch.float32)]))
    ckpt = tmp_path / "flat.ckpt"
    tr.save_checkpoint(ckpt)
    _assert_primitive(torch.load(ckpt, weights_only=True)["hyper_parameters"])
    loaded = IMAML.load_from_checkpoint(ckpt, model=SinusoidMLP(hidden=8))
    assert loaded.inner_solver == learner.inner_solver == SGD(steps=2, lr=0.1, momentum=0.9, tol=1e-4)
    assert loaded.eval_solver == learner.eval_solver == HessianFree(steps=2, lr=0.1, cg_steps=3)


# ------------------------------------------------------------------------------------------------------
# evaluation solvers


EVAL_KW = {
    "gd_armijo": {"grow": 1.5},
    "gd": {},
    "sgd": {"momentum": 0.9},
    "adam": {"betas": (0.8, 0.9)},
    "lbfgs": {"history_size": 3},
    "hf": {"c1": 1e-3},
}


def _expected_val_loss(learner, batch, optimizer, steps, lr, kwargs):
    """Mean query MSE after adapting with proximal_adapt by solver name (the reference for val/loss)."""
    sx, sy, qx, qy = batch
    theta = _theta(learner)
    lam = learner.lam if learner.eval_lam is None else learner.eval_lam
    losses = []
    for i in range(sx.shape[0]):

        def support(p, i=i):
            return nn.functional.mse_loss(torch.func.functional_call(learner.model, p, (sx[i],)), sy[i])

        phi, _ = proximal_adapt(support, theta, lam, steps, optimizer=optimizer, lr=lr, **kwargs)
        out = torch.func.functional_call(learner.model, phi, (qx[i],))
        losses.append(nn.functional.mse_loss(out, qy[i]).item())
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
        assert learner.inner_solver == make_solver(train_opt, steps=3, lr=0.05, **EVAL_KW[train_opt])
        assert learner.eval_solver == make_solver(eval_opt, steps=3, lr=0.05)  # none of the training options
        tr = trainer()
        tr.validate(learner, dataloaders=loader([batch]), verbose=False)
        expected = _expected_val_loss(learner, batch, eval_opt, 3, 0.05, {})
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
        ("sgd", {"momentum": 0.9}, "gd", None, {}),  # another solver: none of them
    ]
    for train_opt, train_kw, eval_opt, eval_kw, used in cases:
        learner = IMAML(
            ridge_model(d=3), lam=1.0, inner_steps=3, inner_lr=0.05, inner_optimizer=train_opt,
            inner_optimizer_kwargs=train_kw, eval_inner_optimizer=eval_opt,
            eval_inner_optimizer_kwargs=eval_kw, eval_lam=0.0, eval_inner_lr=0.03, eval_inner_steps=4,
            task_type="regression",
        )  # fmt: skip
        assert learner.eval_solver == make_solver(eval_opt or train_opt, steps=4, lr=0.03, **used)
        assert (learner.eval_solver.lr, learner.eval_solver.steps) == (0.03, 4)
        tr = trainer()
        tr.validate(learner, dataloaders=loader([batch]), verbose=False)
        expected = _expected_val_loss(learner, batch, eval_opt or train_opt, 4, 0.03, used)
        assert tr.callback_metrics["val/loss"].item() == pytest.approx(expected, rel=1e-6)
    # MAML and FOMAML take the option too (steps and lr from their own defaults 1 and 0.4)
    for cls in (MAML, FOMAML):
        learner = cls(
            ridge_model(d=3), eval_inner_optimizer="sgd", eval_inner_optimizer_kwargs={"momentum": 0.5}
        )
        assert learner.eval_solver == SGD(steps=1, lr=0.4, momentum=0.5)


def test_first_order_maml_with_lam_is_the_query_gradient_at_phi_T():
    """issue 16, bug 3: with first_order=True and lam > 0, d phi_T / d theta = I (the docstring said
    "I + the proximal part"; keeping the proximal part differentiable gives I as well). Checked against
    central finite differences of L_q at phi_T, against the chain with the proximal term kept live, and
    FOMAML with its "gd" inner solver gives the same."""
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
    tasks = tuple(t.unsqueeze(0) for t in (sx, sy, qx, qy))
    res = maml_meta_gradient(
        model, theta, tasks, loss_fn=mse_loss, lam=lam, inner_steps=steps, inner_lr=a, first_order=True
    )
    from lightning_imaml.params import ParamSpec

    spec = ParamSpec.of(theta)
    res_grad = spec.unflatten(res.grad[0])

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
            worst = max(worst, abs(fd - res_grad[k].reshape(-1)[idx].item()))
    scale = max(v.abs().max().item() for v in res_grad.values())
    assert worst < 1e-8 * max(1.0, scale), worst

    # proximal term kept differentiable, support gradient detached: the same gradient
    th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    p = dict(th)
    for _ in range(steps):
        gs = torch.func.grad(lambda q: loss(f(q, sx), sy))({k: v.detach() for k, v in p.items()})
        p = {k: p[k] - a * (gs[k] + lam * (p[k] - th[k])) for k in p}
    live = torch.autograd.grad(loss(f(p, qx), qy), list(th.values()))
    for k, gl in zip(th, live, strict=True):
        assert torch.allclose(gl, res_grad[k], rtol=1e-12, atol=1e-14), k

    # FOMAML: its "gd" solver reaches the same phi_T, so the same query gradient
    fo = FOMAML(model, lam=lam, inner_steps=steps, inner_lr=a, task_type="regression")
    grad, _ = fo.meta_gradient(tasks)
    assert rel(grad, res_grad) < 1e-12


def test_16_mixed_grad_scaler_skips_a_nan_step_on_cpu():
    """The GradScaler branch of the NaN guard, driven on CPU with Lightning's own 16-mixed plugin and a CPU
    GradScaler (Lightning would turn precision="16-mixed" into bf16 on CPU): the NaN step is skipped by the
    scaler itself (its scale halves, parameters and Adam state untouched), the clean step moves."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    net = SinusoidMLP(hidden=8)
    init = {k: v.detach().clone() for k, v in net.named_parameters()}
    bad, good = _nan_and_clean_batches()
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


# ------------------------------------------------------------------------------------------------------
# tasks at once: batched_tasks and batched_chunk_size


def _bn_running_stats_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()


def test_batched_tasks_none_picks_a_timed_chunk_size_and_logs_it(tiny):
    model, _, batch = tiny
    learner = IMAML(model, inner_steps=2, cg_steps=2)
    with _LogRecords() as logs:
        learner.meta_gradient(batch)
    n = batch[0].shape[0]
    candidates = {min(c, n) for c in ChunkTuner().candidates}
    size = learner.chunk_sizes["train"]
    assert size in candidates and 1 in candidates and n in candidates
    (message,) = [m for m in logs.messages if "task(s) at once" in m]
    assert f"train: {size} task(s) at once" in message and "timed" in message
    for c in candidates:  # every candidate was timed
        assert f"{c}: " in message.split("timed", 1)[1]
    # decided once per stage: the next batch keeps it, and logs nothing more
    with _LogRecords() as logs:
        learner.meta_gradient(batch)
    assert learner.chunk_sizes["train"] == size and not logs.messages


def test_batched_tasks_false_true_and_chunk_size(tiny):
    model, _, batch = tiny
    n = batch[0].shape[0]
    off = IMAML(model, inner_steps=2, cg_steps=2, batched_tasks=False)
    with _LogRecords() as logs:
        off.meta_gradient(batch)
    assert off.chunk_sizes["train"] == 1
    assert any("train: 1 task(s) at once (batched_tasks=False)" in m for m in logs.messages)
    on = IMAML(model, inner_steps=2, cg_steps=2, batched_tasks=True)
    on.meta_gradient(batch)
    assert on.chunk_sizes["train"] != 1 and on.chunk_sizes["train"] <= n
    for batched in (True, None):
        given = IMAML(model, inner_steps=2, cg_steps=2, batched_tasks=batched, batched_chunk_size=3)
        with _LogRecords() as logs:
            given.meta_gradient(batch)
        assert given.chunk_sizes["train"] == 3
        assert any("train: 3 task(s) at once (batched_chunk_size)" in m for m in logs.messages)
    # validation decides its own ("eval") chunk size the same way
    off_val = IMAML(model, inner_steps=2, batched_tasks=False)
    trainer().validate(off_val, dataloaders=loader([batch]), verbose=False)
    assert off_val.chunk_sizes == {"eval": 1}
    chunk_val = IMAML(model, inner_steps=2, batched_tasks=True, batched_chunk_size=2)
    trainer().validate(chunk_val, dataloaders=loader([batch]), verbose=False)
    assert chunk_val.chunk_sizes == {"eval": 2}


def test_batched_tasks_true_on_a_model_that_cannot_batch_warns_and_loops():
    """BatchNorm with running statistics updates them in place: the batched forward is refused, the per-task
    loop runs and gives the meta-gradient."""
    batch = ridge_batch(n_tasks=3, d=4)
    learner = IMAML(
        _bn_running_stats_net(), inner_steps=2, cg_steps=2, task_type="regression", batched_tasks=True
    )
    with pytest.warns(UserWarning, match="batched_tasks"):
        grad, _ = learner.meta_gradient(batch)
    assert learner.chunk_sizes["train"] == 1
    assert all(torch.isfinite(g).all() for g in grad.values())
    quiet = IMAML(
        _bn_running_stats_net(), inner_steps=2, cg_steps=2, task_type="regression"
    )  # None: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grad_none, _ = quiet.meta_gradient(batch)
    assert quiet.chunk_sizes["train"] == 1
    assert rel(grad_none, grad) < 1e-12


BATCHED_CHOICES = {
    "loop": {"batched_tasks": False},
    "batched": {"batched_tasks": True},
    "timed": {"batched_tasks": None},
    "chunk3": {"batched_tasks": True, "batched_chunk_size": 3},  # chunks of 3 and 1 tasks
}


def test_every_batched_choice_gives_the_same_results(tiny):
    """Float64, TinyCNN (native batched forward), tasks whose solves differ: the meta-gradient, the per-task
    metrics, a training step and the validation metrics agree whatever the chunking."""
    model, _, batch = tiny
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    results = {}
    for name, kw in BATCHED_CHOICES.items():
        model.load_state_dict(init)
        learner = IMAML(
            model,
            inner_optimizer="gd_armijo",
            inner_steps=5,
            inner_lr=0.5,
            cg_steps=3,
            eval_inner_steps=3,
            optimizer=sgd(0.1),
            **kw,
        )
        grad, metrics = learner.meta_gradient(batch)
        tr = trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
        tr.fit(learner, train_dataloaders=loader([batch]), val_dataloaders=loader([batch]))
        (val,) = tr.validate(learner, dataloaders=loader([batch]), verbose=False)
        results[name] = (grad, metrics, _theta(learner), val)
    ref_grad, ref_metrics, ref_theta, ref_val = results["loop"]
    assert len(set(ref_metrics["inner_accepted"].tolist())) > 1  # the tasks' solves differ
    for name, (grad, metrics, theta, val) in results.items():
        assert rel(grad, ref_grad) < 1e-10, name
        for key, value in ref_metrics.items():
            assert torch.allclose(metrics[key], value, rtol=1e-9, atol=1e-12), (name, key)
        assert rel(theta, ref_theta) < 1e-10, name
        for key in ("val/loss", "val/loss_pre", "val/acc", "val/acc_pre"):
            assert val[key] == pytest.approx(ref_val[key], rel=1e-9, abs=1e-12), (name, key)
