"""Omniglot 5-way 1-shot accuracy under one budget of meta-steps: iMAML-GD vs FOMAML vs MAML (issue 6).

Each method is trained with the Lightning ``Trainer`` on the project's ``OmniglotDataModule`` (paper split:
1100 meta-train / 100 validation / 423 meta-test characters, rotations as extra training classes) with the
project's ``IMAML`` / ``FOMAML`` / ``MAML`` modules, for the same number of meta-steps (``--steps``) and
meta-batch size, with a validation pass every ``--val-every`` steps (and one before training) on
``--eval-tasks`` fixed validation tasks (learning curve: val accuracy vs step), then meta-tested on
``--test-tasks`` (600) fixed test tasks with the final weights: accuracy +- 95% CI (1.96 standard errors).

Per-method settings are those of ``configs/omniglot_5way1shot_{imaml_gd,fomaml,maml}.yaml`` (paper and
official code): iMAML-GD 16 inner GD steps, lr 0.1, lam 2, 5 CG steps, test-time 16 GD steps lr 0.1 lam 0;
MAML and FOMAML 1 inner step lr 0.4 (Finn et al.), test-time 3 steps lr 0.4; Adam lr 1e-3; 1 query image
per class as in the official code. ``--like-for-like`` gives MAML and FOMAML iMAML's inner loop instead.

Budget: the three runs should take about 90 minutes together on 2 CPU cores; the wall time is dominated by
iMAML (16 inner steps + 5 CG steps per task). ``--budget-minutes 90`` times 2 meta-steps of each method on
this machine first and sets the shared ``--steps`` to fit 85% of the budget (the rest for validation and
the meta-test); the calibration is recorded in the JSON.

Runs sequentially and is resumable: a method whose ``<out stem>_<method>.json`` exists is skipped (delete it
to re-run); progress goes to ``<out stem>.log``. Meant to be launched in the background:

  nohup .venv/bin/python benchmarks/accuracy.py --budget-minutes 90 > /dev/null 2>&1 &
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

METHODS = ("imaml", "fomaml", "maml")

# configs/omniglot_5way1shot_*.yaml, model init_args (besides the network and the optimiser)
SETTINGS = {
    "imaml": dict(
        cls="IMAML",
        lam=2.0,
        cg_steps=5,
        cg_damping=0.0,
        inner_optimizer="gd",
        inner_steps=16,
        inner_lr=0.1,
        eval_inner_steps=16,
        eval_inner_lr=0.1,
        eval_lam=0.0,
        eval_inner_optimizer="gd",
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
        help="iMAML: solve ((1 + d) I + H/lam) x = g instead of the paper's d = 0 (configs: 0)",
    )
    p.add_argument("--inner-steps-override", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.meta_batch_size, a.val_every, a.eval_tasks, a.test_tasks = 2, 2, 1, 2, 4
        a.eval_meta_batch_size = 2
        a.inner_steps_override = 2
    return a


def method_settings(method: str, a) -> dict:
    s = dict(SETTINGS[method])
    if a.like_for_like and method != "imaml":
        s.update(inner_steps=16, inner_lr=0.1, eval_inner_steps=16, eval_inner_lr=0.1)
    if a.inner_steps_override is not None:
        s.update(inner_steps=a.inner_steps_override, eval_inner_steps=a.inner_steps_override)
        if "cg_steps" in s:
            s["cg_steps"] = 2
    if a.cg_damping is not None and "cg_damping" in s:
        s["cg_damping"] = a.cg_damping
    return s


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def run_method(method: str, a, out_path: Path) -> dict:
    import pytorch_lightning as pl
    import torch

    from datamodules import OmniglotDataModule
    from lightning_imaml import meta
    from lightning_imaml.models import OmniglotConv4

    class Curves(pl.Callback):
        def __init__(self):
            self.val, self.train = [], []
            self.t0 = time.time()

        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            row = {
                "step": int(trainer.global_step),
                "wall_s": time.time() - self.t0,
                "val_acc": _float(m.get("val/acc")),
                "val_loss": _float(m.get("val/loss")),
                "val_acc_pre": _float(m.get("val/acc_pre")),
            }
            self.val.append(row)
            log.info(
                "%s step %d: val/acc %s val/loss %s (%.0f s)",
                method,
                row["step"],
                row["val_acc"],
                row["val_loss"],
                row["wall_s"],
            )

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = int(trainer.global_step)
            if step % max(1, a.val_every // 5) == 0 or step == 1:
                m = trainer.callback_metrics
                self.train.append(
                    {
                        "step": step,
                        "wall_s": time.time() - self.t0,
                        "train_acc": _float(m.get("train/acc")),
                        "train_loss": _float(m.get("train/loss")),
                    }
                )

    if a.threads:
        torch.set_num_threads(a.threads)
    pl.seed_everything(a.seed, workers=True, verbose=False)
    device = common.pick_device(a.device)
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
    curves = Curves()
    trainer = pl.Trainer(
        max_steps=a.steps,
        val_check_interval=a.val_every,
        check_val_every_n_epoch=None,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[curves],
    )
    t0 = time.time()
    log.info("%s: start (%s)", method, json.dumps(method_settings(method, a)))
    trainer.validate(module, datamodule=dm, verbose=False)  # the step-0 point of the learning curve
    trainer.fit(module, datamodule=dm)
    train_s = time.time() - t0
    if not curves.val or curves.val[-1]["step"] != a.steps:
        trainer.validate(module, datamodule=dm, verbose=False)
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    res = {
        "method": method,
        "settings": method_settings(method, a),
        "steps": a.steps,
        "meta_batch_size": a.meta_batch_size,
        "val_curve": curves.val,
        "train_curve": curves.train,
        "test_acc": _float(test.get("test/acc")),
        "test_acc_ci95": _float(test.get("test/acc_ci95")),
        "test_loss": _float(test.get("test/loss")),
        "test_tasks": a.test_tasks,
        "train_wall_s": train_s,
        "total_wall_s": time.time() - t0,
        "s_per_meta_step": train_s / max(1, a.steps),
        "skipped_steps": int(getattr(module, "skipped_steps", 0)),
        "machine": common.machine_info(device),
    }
    common.write_json(out_path, res)
    log.info(
        "%s: test acc %.4f +- %.4f (%d tasks), %.0f s",
        method,
        res["test_acc"] or float("nan"),
        res["test_acc_ci95"] or float("nan"),
        a.test_tasks,
        res["total_wall_s"],
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
    methods = a.methods.split(",")
    log.info("accuracy benchmark: %s", " ".join(sys.argv))
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
            "test_weights": "final (no checkpoint selection)",
            "budget_minutes": a.budget_minutes,
            "calibration_s_per_meta_step": calibration,
        },
        "methods": {
            m: {
                k: r[k]
                for k in (
                    "test_acc",
                    "test_acc_ci95",
                    "test_loss",
                    "train_wall_s",
                    "s_per_meta_step",
                    "settings",
                    "val_curve",
                    "train_curve",
                    "skipped_steps",
                )
            }
            for m, r in per_method.items()
        },
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    common.write_json(out, result)
    plot(result, common.png_path(out))
    log.info("wrote %s", out)
    for m, r in result["methods"].items():
        log.info("  %-7s test acc %s +- %s", m, r["test_acc"], r["test_acc_ci95"])
    return result


def plot(result, path):
    plt = common.pyplot()
    cfg, mach = result["config"], result["machine"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = {"imaml": "tab:red", "maml": "tab:blue", "fomaml": "tab:green"}
    for m, r in result["methods"].items():
        pts = [(v["step"], v["val_acc"]) for v in r["val_curve"] if v["val_acc"] is not None]
        lab = m
        if r["test_acc"] is not None:
            lab += f"  (test {100 * r['test_acc']:.2f} +- {100 * (r['test_acc_ci95'] or 0):.2f} %)"
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=".", color=colors.get(m), label=lab)
    dev = mach["gpu_name"] or f"CPU, {cfg['threads']} thread(s)"
    ax.set_xlabel("meta-step")
    ax.set_ylabel(f"validation accuracy (%) on {cfg['eval_tasks']} tasks")
    ax.set_title(
        f"Omniglot {cfg['n_way']}-way {cfg['k_shot']}-shot, meta-batch {cfg['meta_batch_size']}, "
        f"{cfg['steps']} meta-steps ({dev})",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
