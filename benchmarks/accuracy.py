"""Omniglot 5-way 1-shot accuracy under one budget of meta-steps: iMAML-GD, iMAML-HF, MAML and FOMAML side by
side (issues 6 and 11).

Each method is trained with the Lightning ``Trainer`` on the project's ``OmniglotDataModule`` (paper split:
1100 meta-train / 100 validation / 423 meta-test characters, rotations as extra training classes) with the
project's ``IMAML`` / ``FOMAML`` / ``MAML`` modules, for the same number of meta-steps (``--steps``) and
meta-batch size, with a validation pass every ``--val-every`` steps (and one before training) on
``--eval-tasks`` fixed validation tasks (learning curve: val accuracy vs step and vs seconds of training),
then meta-tested on ``--test-tasks`` (600) fixed test tasks with the final weights: accuracy +- 95% CI
(1.96 standard errors).

Per-method settings (``SETTINGS``; network ``OmniglotConv4`` with its default zero head for every method):
- imaml (iMAML-GD, the package default): 16 inner steps of ``gd_armijo`` (safeguarded GD, largest step 0.1),
  lam 2, 5 CG steps on (2 I + H/lam) (CG damping 1; ``--cg-damping 0``: the paper's I + H/lam, the runs before
  2026-12-04); test-time 16 ``gd_armijo`` steps, largest step 0.1, lam 0;
- imaml_hf (iMAML-HF): Hessian-free Newton-CG inner solver (5 CG steps per direction, line search), lam 2,
  5 CG steps for the meta-gradient; test-time the same solve;
- maml / fomaml: 1 inner step lr 0.4 (Finn et al.), test-time 3 steps lr 0.4;
Adam lr 1e-3; 1 query image per class as in the official code. ``--like-for-like`` gives MAML and FOMAML
iMAML's 16 steps of lr 0.1 instead.

Besides accuracy it records, per method: windowed means of the training metrics (query loss/accuracy after
adaptation, the inner-solve residual ||grad L_s(phi) + lam (phi - theta)||, the share of tasks whose proximal
objective rose, the CG residual), and at every validation a probe on 4 fixed training tasks: the top
eigenvalue of the support-loss Hessian at theta (power iteration) and the method's own inner solve from
there. A "collapse" verdict per method: validation accuracy never more than 3 points below its running
best, and the windowed training query loss in the last 10 % of steps below 1.5 x its minimum.

Runs the methods one after another and is resumable at two levels: a method whose
``<out stem>_<method>.json`` exists is skipped (delete it to re-run), and a method cut off mid-run resumes
from its last checkpoint (``<out stem>_ckpt/<method>/last.ckpt``, written at every validation, with the
curves so far; the task stream restarts from its seed). Progress goes to ``<out stem>.log``. Meant to be
launched in the background:

  nohup .venv/bin/python benchmarks/accuracy.py --steps 1000 --threads 2 > /dev/null 2>&1 &
  tail -f benchmarks/results/accuracy.log
  python benchmarks/accuracy.py --quick --out /tmp/acc/accuracy.json      # seconds, for the tests
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

METHODS = ("imaml", "maml", "fomaml", "imaml_hf", "imaml_lam")

# configs/omniglot_5way1shot_*.yaml, model init_args (besides the network and the optimiser)
SETTINGS = {
    "imaml": dict(
        cls="IMAML",
        lam=2.0,
        cg_steps=5,
        cg_damping=1.0,  # as the configs since 2026-12-04 (README, "CG damping"); 0: the runs before
        inner_optimizer="gd_armijo",
        inner_steps=16,
        inner_lr=0.1,
        eval_inner_steps=16,
        eval_inner_lr=0.1,
        eval_lam=0.0,
        eval_inner_optimizer="gd_armijo",
    ),
    "imaml_hf": dict(
        cls="IMAML",
        lam=2.0,
        cg_steps=5,
        cg_damping=1.0,  # as for "imaml"
        inner_optimizer="hf",
        inner_steps=5,
        hf_cg_steps=3,  # the study's winner (below); the paper's 5 is "imaml_hf_cg5"
        inner_lr=1.0,
    ),
    "fomaml": dict(
        cls="FOMAML",
        lam=0.0,
        inner_steps=1,
        inner_lr=0.4,
        eval_inner_steps=3,
        eval_inner_lr=0.4,
        eval_lam=0.0,
        eval_inner_optimizer="gd",
    ),
    "maml": dict(
        cls="MAML",
        lam=0.0,
        inner_steps=1,
        inner_lr=0.4,
        eval_inner_steps=3,
        eval_inner_lr=0.4,
        eval_lam=0.0,
        eval_inner_optimizer="gd",
    ),
}
# iMAML-GD with one learned lam per parameter tensor, from 2.0 (issue 13)
SETTINGS["imaml_lam"] = dict(SETTINGS["imaml"], learn_lam="layer")
# the iMAML-HF study (issue 23): one change each against the undamped Newton-CG that HessianFree was before
# the study (its "imaml_hf" runs in benchmarks/results/hf_study_imaml_hf.json; now "imaml_hf_newton"); the
# winner, Levenberg-Marquardt damping ("imaml_hf_lm"), is now HessianFree's default; so is the second round's
# winner, 3 CG steps per direction ("imaml_hf_cg3"): "imaml_hf" is now both. Every variant changes one thing
# against the paper's 5 CG steps per direction ("imaml_hf_cg5", damped), as when it was run.
# --hf-eval gd validates them like iMAML-GD (16 gd_armijo steps at lam 0), --hf-eval hf (default) with HF's
# own protocol (HF at lam 2)
_HF_EVAL_GD = dict(eval_inner_optimizer="gd_armijo", eval_inner_steps=16, eval_inner_lr=0.1, eval_lam=0.0)
_UNDAMPED = {"damping": 0.0, "adapt_damping": False}
HF_STUDY = {
    "imaml_hf_newton": dict(inner_optimizer_kwargs=_UNDAMPED),
    "imaml_hf_newton10": dict(inner_steps=10, inner_optimizer_kwargs=_UNDAMPED),
    "imaml_hf_cg10": dict(hf_cg_steps=10, inner_optimizer_kwargs=_UNDAMPED),
    "imaml_hf_gn": dict(inner_optimizer_kwargs={**_UNDAMPED, "curvature": "gauss_newton"}),
    "imaml_hf_lm": dict(inner_optimizer_kwargs={"damping": 1.0, "adapt_damping": True}),
    "imaml_hf_gn_lm": dict(
        inner_optimizer_kwargs={"curvature": "gauss_newton", "damping": 1.0, "adapt_damping": True}
    ),
    # cheaper than the damped default, toward HF <= 2x iMAML-GD's time (counted: 174.2 GFLOP vs 75.9): fewer
    # CG steps per Newton direction, or fewer Newton iterations (training and test-time solve alike)
    "imaml_hf_cg3": dict(hf_cg_steps=3),
    "imaml_hf_steps4": dict(inner_steps=4),
}
SETTINGS["imaml_hf_cg5"] = dict(SETTINGS["imaml_hf"], hf_cg_steps=5)
for _name, _change in HF_STUDY.items():
    SETTINGS[_name] = dict(SETTINGS["imaml_hf_cg5"], **_change)
# iMAML with a cheaper training-time inner solve (issue 21): 8 L-BFGS iterations (8 gradients against
# gd_armijo's 16) reached gd_armijo's 16-step residual at one point of training; test-time solve unchanged
SETTINGS["imaml_lbfgs8"] = dict(SETTINGS["imaml"], inner_optimizer="lbfgs", inner_steps=8, inner_lr=1.0)
# half of that (4 gradients): does the time to 90 % validation accuracy fall with the cost per meta-step?
SETTINGS["imaml_lbfgs4"] = dict(SETTINGS["imaml_lbfgs8"], inner_steps=4)
# windowed training metrics (per-step values averaged over --val-every / 5 steps)
TRAIN_KEYS = {
    "train_loss": "train/loss",
    "train_acc": "train/acc",
    "inner_residual": "train/inner_residual",
    "inner_residual_max": "train/inner_residual_max",
    "inner_rose": "train/inner_rose",
    "inner_accepted": "train/inner_accepted",
    "inner_iterations": "train/inner_iterations",
    "cg_residual_max": "train/cg_residual_max",
}
# steps at which the probe records the training solver's residual (a solve of that many steps from theta)
PROFILE_STEPS = (0, 1, 2, 4, 6, 8, 10, 12, 14, 16)

log = logging.getLogger("accuracy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for the tests)")
    p.add_argument("--out", default=str(common.default_out("accuracy")))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=500, help="meta-steps per method (the shared budget)")
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="instead of --steps: time 2 meta-steps of each method here first, then choose the shared number "
        "of meta-steps so that the methods' training together takes about this long (85%% of it, the rest "
        "left for validation and test)",
    )
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--val-every", type=int, default=50, help="validation every N meta-steps")
    p.add_argument("--eval-tasks", type=int, default=200, help="fixed validation tasks per validation pass")
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--eval-meta-batch-size", type=int, default=50)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--k-query", type=int, default=1, help="query images per class (official code: 1)")
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--like-for-like", action="store_true", help="MAML/FOMAML use iMAML's 16 steps, lr 0.1")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cg-damping",
        type=float,
        default=None,
        help="iMAML: solve ((1 + d) I + H/lam) x = g (configs: d = 1 since 2026-12-04; the paper: 0)",
    )
    p.add_argument("--probe-tasks", type=int, default=4, help="training tasks probed at each validation")
    p.add_argument(
        "--hf-eval",
        choices=("hf", "gd"),
        default="hf",
        help="iMAML-HF methods: validate and test with HF at lam 2 (the training problem) or with 16 "
        "gd_armijo steps at lam 0 (iMAML-GD's protocol)",
    )
    p.add_argument(
        "--configs",
        default=None,
        help="comma-separated config files (configs/*.yaml) to run instead of --methods: the learner, "
        "network and data module as train.py builds them, each run named after its file's stem",
    )
    p.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="a wall-clock budget of training per run (validation excluded): training stops at the first "
        "step past it (--steps is then only an upper bound)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine-time"),
        default="constant",
        help="outer learning rate: constant, or a cosine from its value down to --lr-floor x it over the "
        "--train-minutes budget (by seconds of training, so it ends where the budget does)",
    )
    p.add_argument("--lr-floor", type=float, default=0.05, help="final learning rate / initial (cosine-time)")
    p.add_argument(
        "--test-weights",
        choices=("final", "best"),
        default="final",
        help="meta-test the final weights, or the ones of the best validation accuracy",
    )
    p.add_argument(
        "--export",
        default=None,
        help="a folder: write each run's tested weights there as <name>.ckpt (weights and hyperparameters "
        "only; IMAML.load_from_checkpoint and train.py test --ckpt_path read it)",
    )
    p.add_argument(
        "--inner-tol",
        type=float,
        default=None,
        help="iMAML-GD: stop a task's inner solve once its proximal gradient norm is below this share of its "
        "norm at theta (IMAML(inner_tol=...); default: the package default)",
    )
    p.add_argument("--inner-steps-override", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.meta_batch_size, a.val_every, a.eval_tasks, a.test_tasks = 2, 2, 1, 2, 4
        a.eval_meta_batch_size = 2
        a.inner_steps_override = 2
        a.probe_tasks = 1
    return a


def method_settings(method: str, a) -> dict:
    if method in getattr(a, "config_paths", {}):  # the config's learner arguments (the network aside)
        class_path, init, net, data = config_parts(a.config_paths[method])
        return {"cls": class_path, **init, "model": net, "data": data}
    s = dict(SETTINGS[method])
    if a.like_for_like and method != "imaml":
        s.update(inner_steps=16, inner_lr=0.1, eval_inner_steps=16, eval_inner_lr=0.1)
    if a.inner_steps_override is not None:
        s.update(inner_steps=a.inner_steps_override, eval_inner_steps=a.inner_steps_override)
        if "cg_steps" in s:
            s["cg_steps"] = 2
    if a.cg_damping is not None and "cg_damping" in s:
        s["cg_damping"] = a.cg_damping
    if a.inner_tol is not None and method in ("imaml", "imaml_lam"):
        s["inner_tol"] = a.inner_tol
    if method.startswith("imaml_hf") and a.hf_eval == "gd":
        s.update(_HF_EVAL_GD)
    return s


def config_parts(path: str) -> tuple[str, dict, dict, dict]:
    """(learner class path, its init_args without the network, network spec, data init_args) of a config."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    model = dict(cfg["model"])
    init = dict(model.get("init_args") or {})
    net = init.pop("model")
    data = dict((cfg.get("data") or {}).get("init_args") or {})
    return model["class_path"], init, net, data


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def first_reaching(val_curve, level: float, key: str = "train_s"):
    """Seconds of training (``key``) at the first validation with accuracy >= ``level``, else None."""
    for row in val_curve:
        if row["val_acc"] is not None and row["val_acc"] >= level:
            return row[key]
    return None


def collapse_check(val_curve, train_curve, drop_points: float = 3.0, loss_factor: float = 1.5) -> dict:
    """The issue's no-collapse criteria: validation accuracy never more than ``drop_points`` points below its
    running best; windowed training query loss over the last 10 % of steps below ``loss_factor`` x its minimum
    over the run."""
    best, worst_drop = -1.0, 0.0
    for row in val_curve:
        if row["val_acc"] is None:
            continue
        best = max(best, row["val_acc"])
        worst_drop = max(worst_drop, 100 * (best - row["val_acc"]))
    losses = [(r["step"], r["train_loss"]) for r in train_curve if r.get("train_loss") is not None]
    ok_loss, ratio = None, None
    if losses:
        last_step = losses[-1][0]
        tail = [v for st, v in losses if st > 0.9 * last_step]
        lo = min(v for _, v in losses)
        ratio = max(tail) / lo if lo > 0 else None
        ok_loss = ratio is not None and ratio < loss_factor
    return {
        "max_val_drop_points": worst_drop,
        "val_ok": worst_drop <= drop_points,
        "train_loss_last10pct_over_min": ratio,
        "train_loss_ok": ok_loss,
        "no_collapse": worst_drop <= drop_points and bool(ok_loss),
    }


def probe_row(module, tasks) -> dict:
    """Curvature and inner-solve probe at the current theta on fixed training tasks (floats): the top
    support-Hessian eigenvalue, the training solver's residual and rise flag, and the residual relative to its
    value at theta after k steps of that solver (without early stopping) for k in PROFILE_STEPS."""
    import dataclasses

    import torch

    from lightning_imaml.diagnostics import hessian_top_eigenvalue
    from lightning_imaml.metagrad import adapt_tasks, make_task_loss

    theta = {k: v.detach() for k, v in module.meta_parameters().items()}
    sx = torch.stack([x for x, _ in tasks])
    sy = torch.stack([y for _, y in tasks])
    lam, solver = module.current_lam(), module.inner_solver
    kw = dict(loss_fn=module.loss_fn, lam=lam)
    with torch.inference_mode(False), torch.enable_grad():
        eigs = [
            hessian_top_eigenvalue(make_task_loss(module.model, x, y, module.loss_fn), theta)
            for x, y in tasks
        ]
        _, info = adapt_tasks(module.model, theta, sx, sy, solver=solver, **kw)
        profile = {}
        if solver.name != "hf":
            exact = dataclasses.replace(solver, tol=0.0, atol=0.0)
            for k in PROFILE_STEPS:
                _, at_k = adapt_tasks(
                    module.model, theta, sx, sy, solver=dataclasses.replace(exact, steps=k), **kw
                )
                profile[str(k)] = (at_k.residual / at_k.residual0).tolist()
    return {
        "eig": eigs,
        "inner_residual": info.residual.tolist(),
        "inner_rose": info.rose.tolist(),
        "inner_iterations": info.iterations.tolist(),
        "residual_rel_by_step": profile,
    }


def _budget_callback():
    import math

    import pytorch_lightning as pl

    class Budget(pl.Callback):
        """Ends training at the first step past ``minutes`` of training (the Curves' clock), and with
        ``schedule="cosine-time"`` sets the outer learning rate of every parameter group before each step to
        base x (floor + (1 - floor) (1 + cos(pi f)) / 2), f = seconds of training / budget: a cosine over the
        budget's time rather than a guessed number of steps."""

        def __init__(self, minutes, schedule, floor, curves):
            self.seconds = None if minutes is None else 60.0 * minutes
            self.schedule, self.floor, self.curves = schedule, floor, curves
            self.base: list[float] | None = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if self.schedule != "cosine-time" or self.seconds is None:
                return
            opt = trainer.optimizers[0]
            if self.base is None:
                self.base = [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
                for g, b in zip(opt.param_groups, self.base, strict=True):
                    g.setdefault("initial_lr", b)
            f = min(1.0, self.curves.train_s / self.seconds)
            scale = self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * f))
            for g, b in zip(opt.param_groups, self.base, strict=True):
                g["lr"] = b * scale

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.seconds is not None and self.curves.train_s >= self.seconds:
                trainer.should_stop = True

    return Budget


def run_method(method: str, a, out_path: Path) -> dict:
    import pytorch_lightning as pl
    import torch

    from datamodules import OmniglotDataModule
    from lightning_imaml import meta
    from lightning_imaml.models import OmniglotConv4

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from inner_stability import probe_tasks

    every = max(1, a.val_every // 5)
    Budget = _budget_callback()

    class Curves(pl.Callback):
        """Learning curves, probes and seconds of training; saved in checkpoints, so a resumed run goes on."""

        def __init__(self):
            self.val, self.train, self.probe = [], [], []
            self.best = None  # {"step", "val_acc", "state_dict"} of the best validation accuracy so far
            self.train_s, self.wall_offset = 0.0, 0.0
            self.t0 = time.time()
            self._window: dict[str, list] = {}
            self._tb = None
            self.tasks = probe_tasks(a.probe_tasks, a.n_way, a.k_shot) if a.probe_tasks else []

        def wall(self):
            return self.wall_offset + time.time() - self.t0

        def state_dict(self):
            return {
                "val": self.val,
                "train": self.train,
                "probe": self.probe,
                "best": self.best,
                "train_s": self.train_s,
                "wall_s": self.wall(),
            }

        def load_state_dict(self, state):
            self.val, self.train, self.probe = state["val"], state["train"], state["probe"]
            self.best = state.get("best")
            self.train_s, self.wall_offset, self.t0 = state["train_s"], state["wall_s"], time.time()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self._tb = time.time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.train_s += time.time() - self._tb
            m = trainer.callback_metrics
            for name, key in TRAIN_KEYS.items():
                if key in m:
                    self._window.setdefault(name, []).append(float(m[key]))
            step = int(trainer.global_step)
            if step % every == 0 or step == 1:
                row = {"step": step, "train_s": self.train_s, "wall_s": self.wall()}
                row["outer_lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])  # the step's own rate
                for name, vals in self._window.items():
                    row[name] = sum(vals) / len(vals) if vals else None
                self._window = {}
                self.train.append(row)

        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            row = {
                "step": int(trainer.global_step),
                "train_s": self.train_s,
                "wall_s": self.wall(),
                "val_acc": _float(m.get("val/acc")),
                "val_loss": _float(m.get("val/loss")),
                "val_acc_pre": _float(m.get("val/acc_pre")),
            }
            if getattr(module, "log_lam", None) is not None:
                row["lam"] = {k: float(v.float().mean()) for k, v in module.current_lam().items()}
            self.val.append(row)
            if row["val_acc"] is not None and (self.best is None or row["val_acc"] > self.best["val_acc"]):
                weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                self.best = {"step": row["step"], "val_acc": row["val_acc"], "state_dict": weights}
            pr = ""
            if self.tasks:
                probe = {"step": row["step"], **probe_row(module, self.tasks)}
                self.probe.append(probe)
                eigs = [round(e, 1) for e in probe["eig"]]
                pr = f" eig {eigs} inner residual {[round(r, 3) for r in probe['inner_residual']]}"
            log.info(
                "%s step %d: val/acc %s val/loss %s (%.0f s training, %.0f s wall)%s",
                method,
                row["step"],
                row["val_acc"],
                row["val_loss"],
                row["train_s"],
                row["wall_s"],
                pr,
            )
            if trainer.state.fn == "fit":
                # Lightning's ModelCheckpoint(save_top_k=0, save_last=True) writes last.ckpt only at the end
                # of fit (2.6: "last" follows a top-k save), so a run cut off mid-way lost everything: save
                # here, after this row is in the curves, and atomically (a kill mid-write keeps the old one).
                tmp = last.with_suffix(".tmp")
                trainer.save_checkpoint(tmp)
                os.replace(tmp, last)
                log.info("%s: checkpoint at step %d -> %s", method, row["step"], last)

    if a.threads:
        torch.set_num_threads(a.threads)
    pl.seed_everything(a.seed, workers=True, verbose=False)
    device = common.pick_device(a.device)
    if method in a.config_paths:  # as train.py builds it: the learner by LightningCLI's instantiator
        from pytorch_lightning.cli import instantiate_module
        from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters_context

        class_path, init, net, data_args = config_parts(a.config_paths[method])
        cls = common.import_object(class_path)
        # the config itself as the hyperparameters (LightningCLI's way): the checkpoints then rebuild the
        # network from its class_path with load_from_checkpoint(path) alone, and hold only primitives
        hparams = {"_class_path": class_path, **init, "model": net}
        with _given_hyperparameters_context(
            hparams=hparams, instantiator="pytorch_lightning.cli.instantiate_module"
        ):
            module = instantiate_module(cls, {**init, "model": net})
        data_args.update(
            seed=a.seed,
            val_tasks=a.eval_tasks,
            test_tasks=a.test_tasks,
            eval_meta_batch_size=a.eval_meta_batch_size,
        )
        dm = OmniglotDataModule(**{k: v for k, v in data_args.items() if k != "root" or v is not None})
    else:
        s = method_settings(method, a)
        cls = getattr(meta, s.pop("cls"))
        module = cls(
            model=OmniglotConv4(a.n_way), optimizer=functools.partial(torch.optim.Adam, lr=a.outer_lr), **s
        )
        dm = OmniglotDataModule(
            n_way=a.n_way,
            k_shot=a.k_shot,
            k_query=a.k_query,
            meta_batch_size=a.meta_batch_size,
            seed=a.seed,
            val_tasks=a.eval_tasks,
            test_tasks=a.test_tasks,
            eval_meta_batch_size=a.eval_meta_batch_size,
            split="paper",
            rotations=True,
        )
    ckpt_dir = out_path.parent / f"{Path(a.out).stem}_ckpt" / method
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.ckpt"
    curves = Curves()
    budget = Budget(a.train_minutes, a.lr_schedule, a.lr_floor, curves)
    trainer = pl.Trainer(
        max_steps=a.steps,
        val_check_interval=a.val_every,
        check_val_every_n_epoch=None,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[curves, budget],
        enable_checkpointing=False,
    )
    log.info("%s: start (%s)", method, json.dumps(method_settings(method, a)))
    if last.exists():
        log.info("%s: resuming from %s", method, last)
        trainer.fit(module, datamodule=dm, ckpt_path=str(last))
    else:
        trainer.validate(module, datamodule=dm, verbose=False)  # the step-0 point of the learning curve
        trainer.fit(module, datamodule=dm)
    if not curves.val or curves.val[-1]["step"] != trainer.global_step:
        trainer.validate(module, datamodule=dm, verbose=False)
    tested = {"weights": "final", "step": int(trainer.global_step)}
    if a.test_weights == "best" and curves.best is not None:
        module.load_state_dict(curves.best["state_dict"])
        tested = {
            "weights": "best validation accuracy",
            "step": curves.best["step"],
            "val_acc": curves.best["val_acc"],
        }
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    exported = None
    if a.export:
        exported = Path(a.export) / f"{method}.ckpt"
        exported.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(
            exported, weights_only=True
        )  # state_dict and hyperparameters: a few hundred kB
    res = {
        "method": method,
        "settings": method_settings(method, a),
        "steps": int(trainer.global_step),
        "meta_batch_size": a.meta_batch_size,
        "config": a.config_paths.get(method),
        "seed": a.seed,
        "train_minutes_budget": a.train_minutes,
        "lr_schedule": {"kind": a.lr_schedule, "floor": a.lr_floor},
        "tested": tested,
        "exported": str(exported) if exported else None,
        "val_curve": curves.val,
        "train_curve": curves.train,
        "probe": curves.probe,
        "test_acc": _float(test.get("test/acc")),
        "test_acc_ci95": _float(test.get("test/acc_ci95")),
        "test_loss": _float(test.get("test/loss")),
        "test_tasks": a.test_tasks,
        "train_wall_s": curves.train_s,
        "total_wall_s": curves.wall(),
        "s_per_meta_step": curves.train_s / max(1, int(trainer.global_step)),
        "train_s_to_val_acc": {f"{int(100 * lv)}%": first_reaching(curves.val, lv) for lv in (0.8, 0.9)},
        "collapse_check": collapse_check(curves.val, curves.train),
        "skipped_steps": int(getattr(module, "skipped_steps", 0)),
        "machine": common.machine_info(device),
        "git": a.git,  # the code this run started from
    }
    common.write_json(out_path, res)
    log.info(
        "%s: test acc %.4f +- %.4f (%d tasks), %.0f s training; to 80 %%/90 %% val acc: %s; %s",
        method,
        res["test_acc"] or float("nan"),
        res["test_acc_ci95"] or float("nan"),
        a.test_tasks,
        res["train_wall_s"],
        res["train_s_to_val_acc"],
        res["collapse_check"],
    )
    return res


def calibrate(methods, a) -> dict:
    """Seconds per meta-step of each method (mean of 2 after 1 warm-up), outside the Trainer."""
    import torch

    from datamodules import OmniglotDataModule
    from lightning_imaml import meta
    from lightning_imaml.models import OmniglotConv4

    if a.threads:
        torch.set_num_threads(a.threads)
    dm = OmniglotDataModule(
        n_way=a.n_way, k_shot=a.k_shot, k_query=a.k_query, meta_batch_size=a.meta_batch_size, seed=a.seed
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    out = {}
    for m in methods:
        s = method_settings(m, a)
        module = getattr(meta, s.pop("cls"))(model=OmniglotConv4(a.n_way), **s)
        ts = []
        for _ in range(3):
            batch = next(it)
            t0 = time.perf_counter()
            module.meta_gradient(batch)
            ts.append(time.perf_counter() - t0)
        out[m] = sum(ts[1:]) / len(ts[1:])
    return out


def main(argv=None):
    a = parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s")
    for h in (logging.FileHandler(out.with_suffix(".log")), logging.StreamHandler()):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*")
    a.config_paths = {Path(c).stem: c for c in a.configs.split(",")} if a.configs else {}
    methods = list(a.config_paths) if a.configs else a.methods.split(",")
    a.git = common.START_GIT  # at start: later commits do not change the code this process runs
    log.info("accuracy benchmark: %s (git %s)", " ".join(sys.argv), a.git)
    calibration = None
    done = [out.with_name(f"{out.stem}_{m}.json") for m in methods]
    done = [json.loads(p.read_text()) for p in done if p.exists()]
    if done and a.budget_minutes:  # resuming: keep the budget the finished methods ran with
        a.steps = int(done[0]["steps"])
        log.info("resuming: %d meta-steps as the finished methods (no re-calibration)", a.steps)
    elif a.budget_minutes:
        calibration = calibrate(methods, a)
        total = sum(calibration.values())
        a.steps = max(1, int(0.85 * 60 * a.budget_minutes / total))
        log.info(
            "calibration s/meta-step %s -> %d meta-steps for %.1f min", calibration, a.steps, a.budget_minutes
        )
    per_method = {}
    for m in methods:
        path = out.with_name(f"{out.stem}_{m}.json")
        if path.exists():
            log.info("%s: %s exists, skipping (delete it to re-run)", m, path)
            per_method[m] = json.loads(path.read_text())
            continue
        try:
            per_method[m] = run_method(m, a, path)
        except Exception:
            log.exception("%s failed", m)
            raise
    import torch

    result = {
        "benchmark": "accuracy",
        "created": common.now(),
        "machine": common.machine_info(common.pick_device(a.device)),
        "config": {
            "dataset": "Omniglot (paper split, rotations)",
            "n_way": a.n_way,
            "k_shot": a.k_shot,
            "k_query": a.k_query,
            "steps": a.steps,
            "meta_batch_size": a.meta_batch_size,
            "val_every": a.val_every,
            "eval_tasks": a.eval_tasks,
            "test_tasks": a.test_tasks,
            "outer_optimizer": f"Adam lr {a.outer_lr}",
            "like_for_like": a.like_for_like,
            "threads": a.threads or torch.get_num_threads(),
            "quick": a.quick,
            "seed": a.seed,
            "test_weights": "final (no checkpoint selection)"
            if a.test_weights == "final"
            else "best validation accuracy",
            "budget_minutes": a.budget_minutes,
            "calibration_s_per_meta_step": calibration,
        },
        "methods": {
            m: {
                k: r[k]
                for k in (
                    "steps",
                    "seed",
                    "config",
                    "tested",
                    "exported",
                    "train_minutes_budget",
                    "lr_schedule",
                    "test_acc",
                    "test_acc_ci95",
                    "test_loss",
                    "train_wall_s",
                    "s_per_meta_step",
                    "train_s_to_val_acc",
                    "collapse_check",
                    "settings",
                    "val_curve",
                    "train_curve",
                    "probe",
                    "skipped_steps",
                    "git",
                )
                if k in r
            }
            for m, r in per_method.items()
        },
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    _config_data_facts(result)
    common.write_json(out, result)
    plot(result, common.png_path(out))
    log.info("wrote %s", out)
    for m, r in result["methods"].items():
        log.info("  %-7s test acc %s +- %s", m, r["test_acc"], r["test_acc_ci95"])
    return result


def _config_data_facts(result) -> None:
    """Runs from --configs: result["config"] gets the task shape and split of the configs, not the flags."""
    data = [r["settings"]["data"] for r in result["methods"].values() if "data" in r.get("settings", {})]
    if not data:
        return
    cfg = result["config"]
    for key in ("n_way", "k_shot", "k_query", "meta_batch_size"):
        values = {d.get(key) for d in data}
        if len(values) == 1 and None not in values:
            cfg[key] = values.pop()
    splits = {(d.get("split", "paper"), d.get("rotations", True)) for d in data}
    if len(splits) == 1:
        split, rotations = splits.pop()
        cfg["dataset"] = f"Omniglot ({split} split{', rotations' if rotations else ''})"


def _method_kind(name: str) -> str:
    """The method a run stands for, from a --methods name or a config stem (omniglot_5way1shot_imaml_gd)."""
    for kind in ("imaml_hf", "imaml_lam", "fomaml", "imaml", "maml"):
        if f"_{kind}" in f"_{name}":
            return kind
    return name


TAB_COLORS = ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")


def plot(result, path):
    """Validation accuracy vs meta-step and vs seconds of training, one line per method."""
    plt = common.pyplot()
    cfg, mach = result["config"], result["machine"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120, sharey=True)
    colors = {
        "imaml": "tab:red",
        "imaml_hf": "tab:purple",
        "maml": "tab:blue",
        "fomaml": "tab:green",
        "imaml_lam": "tab:orange",
        "imaml_lbfgs8": "tab:brown",
        "imaml_lbfgs4": "tab:olive",
    }
    names = {
        "imaml": "iMAML-GD",
        "imaml_hf": "iMAML-HF",
        "maml": "MAML",
        "fomaml": "FOMAML",
        "imaml_lam": "iMAML-GD, learned lam",
        "imaml_lbfgs8": "iMAML, 8 L-BFGS inner steps",
        "imaml_lbfgs4": "iMAML, 4 L-BFGS inner steps",
    }
    last_steps = []
    kinds = [_method_kind(m) for m in result["methods"]]
    # variants of one method (a study) would all take that method's colour: give each its own instead
    own_colors = len(set(kinds)) < len(kinds)
    used = {colors[m] for m in result["methods"] if m in colors}
    free = iter([f"tab:{c}" for c in TAB_COLORS if f"tab:{c}" not in used] * 2)
    for m, r in result["methods"].items():
        rows = [v for v in r["val_curve"] if v["val_acc"] is not None]
        kind = _method_kind(m)
        lab = names.get(m, m) if m in names else f"{names.get(kind, kind)} ({m})"
        color = colors[m] if m in colors else next(free) if own_colors else colors.get(kind)
        last_steps.append(max(v["step"] for v in rows))
        if r["test_acc"] is not None:
            lab += f"  (test {100 * r['test_acc']:.2f} +- {100 * (r['test_acc_ci95'] or 0):.2f} %)"
        acc = [100 * v["val_acc"] for v in rows]
        axes[0].plot([max(v["step"], 1) for v in rows], acc, marker=".", color=color, label=lab)
        secs = [v.get("train_s", v.get("wall_s")) for v in rows]
        axes[1].plot(secs, acc, marker=".", color=color, label=lab)
    if last_steps and max(last_steps) > 5 * max(1, min(last_steps)):
        # equal-time runs: MAML takes ~10x more steps than iMAML, so a linear axis squeezes iMAML's curve
        axes[0].set_xscale("log")
    dev = mach["gpu_name"] or f"CPU, {cfg['threads']} thread(s)"
    budgets = [r.get("train_minutes_budget") or 0 for r in result["methods"].values()]
    length = f"{max(budgets):g} min of training each" if any(budgets) else f"{cfg['steps']} meta-steps"
    axes[0].set_xlabel("meta-step")
    axes[1].set_xlabel("seconds of training (validation excluded)")
    axes[0].set_ylabel(f"validation accuracy (%) on {cfg['eval_tasks']} tasks")
    fig.suptitle(
        f"Omniglot {cfg['n_way']}-way {cfg['k_shot']}-shot, meta-batch {cfg['meta_batch_size']}, "
        f"{length} ({dev})",
        fontsize=9,
    )
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    plot_lam(result, Path(path).with_name(Path(path).stem + "_lam.png"))


def plot_lam(result, path):
    """Learned lam per parameter tensor over meta-steps, for the methods that learn it."""
    learned = {m: r for m, r in result["methods"].items() if any("lam" in v for v in r["val_curve"])}
    if not learned:
        return
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in learned.values():
        rows = [v for v in r["val_curve"] if "lam" in v]
        # one colour per module, solid for its weight and dashed for its bias (18 lines, 10 default colours)
        modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in rows[0]["lam"]))
        cmap = plt.get_cmap("tab10" if len(modules) <= 10 else "tab20")
        for name in rows[0]["lam"]:
            module, _, kind = name.rpartition(".")
            ax.plot(
                [v["step"] for v in rows],
                [v["lam"][name] for v in rows],
                color=cmap(modules.index(module) % cmap.N),
                linestyle="--" if kind == "bias" else "-",
                label=name,
            )
    ax.set_xlabel("meta-step")
    ax.set_ylabel("lam (per parameter tensor)")
    ax.set_yscale("log")
    ax.set_title("learned proximal strength, from 2.0", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
