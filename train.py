#!/usr/bin/env python
"""Train and evaluate iMAML / MAML / FOMAML with PyTorch Lightning's ``LightningCLI``.

    python train.py fit                       # iMAML on sinusoid regression (the embedded default)
    python train.py fit --config configs/omniglot_5way1shot_imaml_gd.yaml
    python train.py test --config configs/omniglot_5way1shot_imaml_gd.yaml --ckpt_path path/to/best.ckpt
    python train.py fit --help                                  # every model, data and Trainer option

Every ``Trainer`` argument is a flag (``--trainer.devices 2 --trainer.strategy ddp
--trainer.precision bf16-mixed --trainer.max_steps 1000 ...``). The model is any ``MetaLearner``
subclass (``--model IMAML``, ``MAML``, ``FOMAML``) around any ``nn.Module``
(``--model.model OmniglotConv4``), the data any ``EpisodicDataModule`` subclass
(``--data OmniglotDataModule``).

What this script adds on top of a plain ``LightningCLI``:

* an embedded default experiment (iMAML + ``SinusoidMLP`` on ``SinusoidDataModule``: no files, no
  download), used when no ``--config`` is given, so that ``python train.py fit`` alone trains, validates
  and meta-tests;
* ``fit`` ends with a meta-test on the best checkpoint (``--test_after_fit false`` to skip) and
  ``fit``/``test`` print a table "accuracy (or MSE) mean +- 95% CI over the test tasks";
* the network's ``n_way`` and the learner's ``task_type`` follow the data module (``--data.n_way 20``
  is enough);
* default callbacks: ``checkpoint`` (``val/acc`` max for classification, ``val/mse`` min for regression,
  plus ``last.ckpt``; configurable as ``--checkpoint.*``) and ``lr_monitor``; default loggers: CSV, plus
  TensorBoard when ``tensorboard`` is installed, both in ``lightning_logs/<experiment>/version_N``;
* a configuration value that the classes reject (``--model.lam -1``) is reported like a parsing error:
  usage line, one message naming the problem, exit status 2, no traceback; the user's errors found once
  the run starts (a missing data root, ``--data.n_way`` larger than a split, a missing, unreadable or
  incompatible ``--ckpt_path``) end in one line ``error: <message>``, exit status 2 (``--traceback`` or
  ``IMAML_CLI_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

# Imported (not only the base classes) so that the short names work on the command line and in configs
# (`--model MAML`, `--model.model OmniglotConv4`, `--data OmniglotDataModule`) and `--help` lists them.
from datamodules import (  # noqa: F401
    EpisodicDataModule,
    L2LTaskSetDataModule,
    MiniImageNetDataModule,
    OmniglotDataModule,
    SinusoidDataModule,
)
from lightning_imaml import FOMAML, IMAML, MAML, MetaLearner, MiniImageNetConv4, OmniglotConv4, SinusoidMLP  # noqa: F401
from lightning_imaml.checkpoints import check_compatible, read_checkpoint
from lightning_imaml.errors import CheckpointError, UserInputError

# ----------------------------------------------------------------------------------------------------------
# The embedded default experiment: `python train.py fit` with no --config runs configs/sinusoid_imaml.yaml
# (iMAML on sinusoid regression; no files, no download; sized to finish, test included, in about a minute).
# ----------------------------------------------------------------------------------------------------------
DEFAULT_EXPERIMENT = "sinusoid_imaml"
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / f"{DEFAULT_EXPERIMENT}.yaml"

# Used by every experiment unless its config or the command line says otherwise.
_LOGGER_NAME_AUTO = "auto"  # replaced by the experiment name (config file stem) before the loggers are built


def _default_loggers() -> list[dict[str, Any]]:
    loggers = [
        {
            "class_path": "pytorch_lightning.loggers.CSVLogger",
            "init_args": {"save_dir": "lightning_logs", "name": _LOGGER_NAME_AUTO},
        }
    ]
    if any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX")):
        loggers.append(
            {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "lightning_logs", "name": _LOGGER_NAME_AUTO},
            }
        )
    return loggers


# ----------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------
def _task_type(trainer: Trainer, pl_module: LightningModule | None = None) -> str:
    for obj in (getattr(trainer, "datamodule", None), pl_module):
        task = getattr(obj, "task_type", None)
        if task is None and obj is not None:
            task = getattr(getattr(obj, "hparams", {}), "get", lambda *_: None)("task_type")
        if task in ("classification", "regression"):
            return task
    return "classification"


class MetaCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose monitored metric follows the task.

    With ``monitor="auto"`` it keeps the best ``val/acc`` (mode max) for classification and the best
    ``val/mse`` (mode min) for regression, read from the data module's ``task_type``. ``mode="auto"`` picks
    max for metric names containing ``acc`` and min otherwise. ``save_last=True`` also keeps ``last.ckpt``.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str | None = "best-step{step}",
        monitor: str | None = "auto",
        mode: str = "auto",
        save_last: bool | None = True,
        save_top_k: int = 1,
        every_n_train_steps: int | None = None,
        auto_insert_metric_name: bool = False,
        verbose: bool = False,
    ) -> None:
        self._auto_monitor = monitor == "auto"
        self._auto_mode = mode == "auto"
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"checkpoint mode must be 'auto', 'min' or 'max', got {mode!r}")
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None if self._auto_monitor else monitor,
            mode="max" if self._auto_mode else mode,
            save_last=save_last,
            save_top_k=save_top_k,
            every_n_train_steps=every_n_train_steps,
            auto_insert_metric_name=auto_insert_metric_name,
            verbose=verbose,
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._auto_monitor:
            self.monitor = "val/mse" if _task_type(trainer, pl_module) == "regression" else "val/acc"
        if self._auto_mode and self.monitor is not None:
            mode = "max" if "acc" in self.monitor else "min"
            self.mode = mode
            inf = float("inf")
            import torch

            self.kth_value = torch.tensor(-inf if mode == "max" else inf)
        super().setup(trainer, pl_module, stage)


class LRMonitor(LearningRateMonitor):
    """``LearningRateMonitor`` that stands aside (instead of failing) when the Trainer has no logger."""

    def on_train_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._disabled = not trainer.loggers
        if not self._disabled:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if not getattr(self, "_disabled", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if not getattr(self, "_disabled", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)


class _SyncLoggerVersions(Callback):
    """Give every logger the first logger's version, so CSV and TensorBoard files share one run directory."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        loggers = trainer.loggers
        if len(loggers) < 2:
            return
        version = trainer.strategy.broadcast(loggers[0].version)
        for logger in loggers[1:]:
            if hasattr(logger, "_version") and logger._version is None:
                logger._version = version


# ----------------------------------------------------------------------------------------------------------
# The meta-test table
# ----------------------------------------------------------------------------------------------------------
def format_meta_test_table(
    metrics: dict[str, Any], n_tasks: int | None = None, title: str = "Meta-test"
) -> str:
    """Format ``test/acc`` (or ``test/mse``) and its 95% CI as a small table. Accuracy is shown in percent."""

    def val(key: str) -> float | None:
        v = metrics.get(key)
        return None if v is None else float(v)

    rows: list[tuple[str, str]] = []
    acc, acc_ci = val("test/acc"), val("test/acc_ci95")
    if acc is not None:
        scale = 100.0 if acc <= 1.0 else 1.0  # torchmetrics accuracy is a fraction
        ci = f" +- {acc_ci * scale:.2f}%" if acc_ci is not None else ""
        rows.append(("accuracy", f"{acc * scale:.2f}%{ci}"))
    mse, mse_ci = val("test/mse"), val("test/mse_ci95")
    if mse is not None:
        ci = f" +- {mse_ci:.4f}" if mse_ci is not None else ""
        rows.append(("mse", f"{mse:.4f}{ci}"))
    loss = val("test/loss")
    if loss is not None and mse is None:  # for regression the loss is the MSE
        rows.append(("query loss", f"{loss:.4f}"))
    if not rows:
        return f"{title}: no test/acc or test/mse metric was logged"
    head = f"{title}" + (f" over {n_tasks} test tasks" if n_tasks else "") + " (mean +- 95% CI)"
    w0 = max(len("metric"), *(len(r[0]) for r in rows))
    w1 = max(len("value"), *(len(r[1]) for r in rows))
    line = f"+-{'-' * w0}-+-{'-' * w1}-+"
    body = [line, f"| {'metric':<{w0}} | {'value':<{w1}} |", line]
    body += [f"| {a:<{w0}} | {b:<{w1}} |" for a, b in rows]
    body.append(line)
    return "\n".join([head, *body])


def plot_regression_tasks(trained, untrained, datamodule, path: Path, n: int = 4) -> Path | None:
    """PNG of ``n`` fixed test tasks of a data module whose sampler knows its true functions (sinusoid):
    true curve, support points, the meta-trained network before (theta) and after adaptation (phi), and the
    untrained network after the same adaptation. None when the data or matplotlib cannot do it."""
    sampler = datamodule.sampler("test")
    if not hasattr(sampler, "sample_with_functions") or importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lightning_imaml.metagrad import task_forward

    fixed = datamodule.fixed_tasks("test")
    n = min(n, len(fixed))
    lo, hi = getattr(datamodule, "x_range", (-5.0, 5.0))
    grid = torch.linspace(lo, hi, 200)[:, None]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), dpi=110, sharey=True, squeeze=False)
    axes = axes[0]
    for i, ax in enumerate(axes):
        ep, amp, phase = sampler.sample_with_functions(fixed.generator(i), 1)
        sx, sy = ep.support_x[0], ep.support_y[0]
        ax.plot(grid, amp * torch.sin(grid - phase), "k", lw=1.2, label="true")
        ax.plot(sx, sy, "k^", label="support")
        for module, style, name in ((trained, "-", "meta-trained"), (untrained, "--", "untrained")):
            dev = module.device
            theta = {k: v.detach() for k, v in module.meta_parameters().items()}
            with torch.inference_mode(False), torch.enable_grad():
                phi = module.adapt_task(theta, sx.to(dev), sy.to(dev))
            with torch.no_grad():
                if module is trained:
                    before = task_forward(module.model, theta, grid.to(dev)).cpu()
                    ax.plot(grid, before, ":", color="tab:blue", label="meta-trained, before adaptation")
                after = task_forward(module.model, phi, grid.to(dev)).cpu()
            ax.plot(
                grid,
                after,
                style,
                color="tab:red" if module is trained else "tab:gray",
                label=f"{name}, adapted",
            )
        ax.set_title(f"test task {i}", fontsize=9)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _n_test_tasks(trainer: Trainer, datamodule: Any) -> int | None:
    if trainer.fast_dev_run or trainer.limit_test_batches not in (1.0, None):
        return None  # a truncated test: the count would be misleading
    return getattr(datamodule, "test_tasks", None)


# ----------------------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------------------
# The only place argv is read by hand. jsonargparse carries a default's init_args over to a class that the
# command line picks when the argument names match (the demo's k_shot 10 would reach `--data
# OmniglotDataModule`, its lam 2.0 `--model MAML`), and after parsing, carried-over values cannot be told from
# given ones. So the embedded experiment (a parser default, not a default config file, for the same reason)
# leaves out the parts whose class the command line picks; everything else is LightningCLI's own parsing.
def _picked(argv: list[str], key: str) -> str | None:
    """The value of ``--key X`` or ``--key=X`` in argv (``-c`` counts as ``--config``), else None."""
    names = (f"--{key}", "-c") if key == "config" else (f"--{key}",)
    for i, arg in enumerate(argv):
        if arg in names:
            return argv[i + 1] if i + 1 < len(argv) else ""
        if arg.startswith(tuple(f"{n}=" for n in names)):
            return arg.split("=", 1)[1]
    return None


def _embedded_defaults(argv: list[str]) -> dict[str, Any]:
    """The default experiment as parser defaults, minus the parts whose class the command line picks."""
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    learner = _picked(argv, "model")
    if learner is not None:
        # another learner on the same problem: keep the network and the task type, under the chosen class
        cls = (
            _import_class(learner)
            if "." in learner
            else getattr(importlib.import_module("lightning_imaml"), learner, None)
        )
        if isinstance(cls, type) and issubclass(cls, MetaLearner):
            init = cfg["model"]["init_args"]
            cfg["model"] = {
                "class_path": f"{cls.__module__}.{cls.__qualname__}",
                "init_args": {k: init[k] for k in ("model", "task_type")},
            }
        else:
            del cfg["model"]
    if "model" in cfg and (
        _picked(argv, "model.model") is not None or _picked(argv, "model.init_args.model")
    ):
        cfg["model"]["init_args"].pop("model")
    if _picked(argv, "data") is not None:
        del cfg["data"]
    return cfg


def _import_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class MetaLearningCLI(LightningCLI):
    """``LightningCLI`` for episodic meta-learning (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        argv = kwargs.get("args")
        argv = sys.argv[1:] if argv is None else argv
        if isinstance(argv, (list, tuple)) and "--traceback" in argv:  # ours, not a LightningCLI option
            argv = [a for a in argv if a != "--traceback"]
            kwargs["args"] = argv
            os.environ["IMAML_CLI_DEBUG"] = "1"
        self._argv = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else []
        self._use_embedded_default = isinstance(argv, (list, tuple)) and _picked(self._argv, "config") is None
        kwargs.setdefault("model_class", MetaLearner)
        kwargs.setdefault("datamodule_class", EpisodicDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        # the outer optimiser is the learner's own injectable `optimizer` / `lr_scheduler` arguments
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        trainer_defaults = {"logger": _default_loggers(), "log_every_n_steps": 10}
        trainer_defaults.update(kwargs.pop("trainer_defaults", None) or {})
        callbacks = list(trainer_defaults.get("callbacks", []) or [])
        trainer_defaults["callbacks"] = [*callbacks, _SyncLoggerVersions()]
        kwargs["trainer_defaults"] = trainer_defaults
        parser_kwargs = {"parser_mode": "omegaconf"} if _has_omegaconf() else {}
        for sub in ("fit", "validate", "test"):
            parser_kwargs[sub] = {"description": _SUBCOMMAND_HELP[sub] + _HELP_FOOTER}
        kwargs.setdefault("parser_kwargs", parser_kwargs)
        super().__init__(*args, **kwargs)

    # ---- parser ------------------------------------------------------------------------------------------
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MetaCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LRMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_argument(
            "--experiment",
            type=str | None,
            default=None,
            help="Run name for the default loggers (lightning_logs/<experiment>/version_N). "
            "Default: the stem of the last --config file, else '" + DEFAULT_EXPERIMENT + "'.",
        )
        if self._use_embedded_default:
            parser.set_defaults(_flatten_defaults(_embedded_defaults(self._argv)))

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument(
                "--test_after_fit",
                type=bool,
                default=True,
                help="After fit, meta-test the best checkpoint (the last weights under fast_dev_run) on the "
                "data module's test tasks and print accuracy (or MSE) mean +- 95%% CI.",
            )
        return parser

    # ---- config fix-ups before the classes exist ---------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        data = cfg.get("data")
        model = cfg.get("model")
        data_cls = _import_class(data.class_path) if data is not None and data.get("class_path") else None
        if model is not None and model.get("init_args") is not None:
            init = model.init_args
            # the learner's task type follows the data module's
            task = getattr(data_cls, "task_type", None)
            if task in ("classification", "regression") and "task_type" in init:
                init.task_type = task
            # the network's n_way follows the data module's (a link: --data.n_way 20 is enough)
            n_way = data.init_args.get("n_way") if data is not None and data.get("init_args") else None
            net = init.get("model")
            net_init = net.get("init_args") if net is not None and hasattr(net, "get") else None
            if n_way is not None and net_init is not None:
                if "n_way" in net_init and net_init.n_way != n_way:
                    rank_zero_info(f"model.model.init_args.n_way set to data.n_way = {n_way}")
                    net_init.n_way = n_way
        # name the default loggers after the experiment
        name = cfg.get("experiment") or _experiment_name(cfg, self._use_embedded_default)
        trainer_cfg = cfg.get("trainer")
        loggers = trainer_cfg.get("logger") if trainer_cfg is not None else None
        for spec in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(spec, "init_args", None)
            if init is not None and init.get("name") == _LOGGER_NAME_AUTO:
                init.name = name

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, KeyError, MisconfigurationException, FileNotFoundError) as err:
            if os.environ.get("IMAML_CLI_DEBUG"):
                raise
            self._parser(self.subcommand).error(f"invalid configuration: {_clean_error(err)}")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters here, before any hook: check the file first
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if path and str(path) not in ("best", "last", "hpc", "registry"):
            ckpt = _report_user_errors(read_checkpoint, path)
            _report_user_errors(_check_learner_and_network, ckpt, self.config[sub].get("model"), path)
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        """The subcommand, with the checkpoint checked first; the user's errors (a missing data root, sizes a
        split cannot serve, a bad checkpoint) end it with one line and exit status 2."""

        def run():
            ckpt_path = self.config[subcommand].get("ckpt_path")
            if ckpt_path and str(ckpt_path) not in ("best", "last", "hpc", "registry"):
                check_compatible(read_checkpoint(ckpt_path), self.model, ckpt_path)
            super(MetaLearningCLI, self)._run_subcommand(subcommand)

        _report_user_errors(run)

    # ---- subcommand hooks --------------------------------------------------------------------------------
    def before_fit(self) -> None:
        # the network before meta-training: after the meta-test it is adapted the same way, for comparison
        self._initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def after_fit(self) -> None:
        cfg = self.config[self.subcommand]
        if not cfg.get("test_after_fit", True) or self.trainer.interrupted:
            return
        ckpt = self.trainer.checkpoint_callback
        ckpt_path = "best" if ckpt is not None and getattr(ckpt, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
        self._print_table(title="Meta-test" + (" (best checkpoint)" if ckpt_path else " (final weights)"))
        if self.model.task_type == "regression" and self.trainer.is_global_zero:
            self._compare_with_untrained()

    def _compare_with_untrained(self) -> None:
        """Regression: the untrained network adapted the same way on the same test tasks, and a plot."""
        import copy

        trained = self.model
        untrained = copy.deepcopy(trained)
        untrained.load_state_dict(self._initial_state)
        for batch in self.datamodule.test_dataloader():
            untrained._eval_step(tuple(t.to(trained.device) for t in batch), "test")
        base = untrained.eval_metrics.summarise("test")
        got = self.trainer.callback_metrics
        print(
            f"Untrained network, adapted the same way: query MSE {base['test/mse']:.4f} +- "
            f"{base['test/mse_ci95']:.4f} (meta-trained: {float(got['test/mse']):.4f} +- "
            f"{float(got['test/mse_ci95']):.4f})",
            flush=True,
        )
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        path = plot_regression_tasks(
            trained, untrained, self.datamodule, Path(log_dir) / "meta_test_tasks.png"
        )
        if path is not None:
            print(f"Plot of test tasks (true curve, support points, before/after adaptation): {path}")

    def after_test(self) -> None:
        self._print_table(title="Meta-test")

    def _print_table(self, title: str) -> None:
        if not self.trainer.is_global_zero:
            return
        table = format_meta_test_table(
            dict(self.trainer.callback_metrics), _n_test_tasks(self.trainer, self.datamodule), title=title
        )
        print("\n" + table, flush=True)


_SUBCOMMAND_HELP = {
    "fit": "Meta-train (then meta-test the best checkpoint; --test_after_fit false skips that).",
    "validate": "Evaluate on the validation tasks (adaptation on each task's support set).",
    "test": "Meta-test: adapt on each test task's support set, print accuracy (or MSE) mean +- 95% CI.",
}
_HELP_FOOTER = (
    " Without --config: iMAML + SinusoidMLP on SinusoidDataModule (see configs/ for the paper's experiments)."
    " The model's and data module's own options: --model.help IMAML (MAML, FOMAML),"
    " --data.help OmniglotDataModule (MiniImageNetDataModule, SinusoidDataModule); every value in effect:"
    " --print_config."
)


def _class_name(spec: Any) -> str | None:
    path = spec.get("class_path") if hasattr(spec, "get") else None
    return str(path).rpartition(".")[2] if path else None


def _check_learner_and_network(ckpt: dict, model_cfg: Any, path: str) -> None:
    """A checkpoint of another learner class, or around another network, than the config's is the user's
    error (LightningCLI would otherwise rebuild the checkpoint's model silently beside the config's data)."""
    hp = ckpt.get("hyper_parameters") or {}
    saved, wanted = str(hp.get("_class_path") or "").rpartition(".")[2], _class_name(model_cfg)
    if saved and wanted and saved != wanted:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {saved} but the config's model is {wanted}; use the config "
            f"(or --model {saved}) the checkpoint was trained with"
        )
    init = model_cfg.get("init_args") if hasattr(model_cfg, "get") else None
    saved_net, wanted_net = _class_name(hp.get("model") or {}), _class_name((init or {}).get("model") or {})
    if saved_net and wanted_net and saved_net != wanted_net:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a network {saved_net} but the config's is {wanted_net}; use the "
            "config the checkpoint was trained with"
        )


def _report_user_errors(fn, *args: Any) -> Any:
    """``fn(*args)``; a :class:`~lightning_imaml.errors.UserInputError` ends the process with ``error:
    <message>`` on stderr and exit status 2 (re-raised with ``--traceback`` / ``IMAML_CLI_DEBUG=1``)."""
    try:
        return fn(*args)
    except UserInputError as err:
        if os.environ.get("IMAML_CLI_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def _clean_error(err: BaseException) -> str:
    """The class's own message, without jsonargparse's Optional[...]/Union wrapping around it."""
    text = str(err)
    lines = text.splitlines()
    if lines and "Union subtypes" in lines[0]:
        errors = [ln.strip()[2:] for ln in lines if ln.strip().startswith("- ") and "NoneType" not in ln]
        if errors:
            return "; ".join(errors)
    return f"{type(err).__name__}: {text}"


def _has_omegaconf() -> bool:
    return importlib.util.find_spec("omegaconf") is not None


def _flatten_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """``{"trainer": {"max_steps": 1}}`` -> ``{"trainer.max_steps": 1}`` (class specs stay whole)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and "class_path" not in value:
            out.update({f"{key}.{k}": v for k, v in _flatten_defaults(value).items()})
        else:
            out[key] = value
    return out


def _experiment_name(cfg: Any, embedded: bool) -> str:
    configs = cfg.get("config") or []
    paths = [p for p in configs if p is not None]
    for p in reversed(paths):
        text = str(getattr(p, "relative", None) or getattr(p, "absolute", None) or p)
        stem = Path(text).stem
        if stem:
            return stem
    if embedded:
        model = (cfg.get("model") or {}).get("class_path", "")
        data = (cfg.get("data") or {}).get("class_path", "")
        if model.endswith("IMAML") and data.endswith("SinusoidDataModule"):
            return DEFAULT_EXPERIMENT
    model = (cfg.get("model") or {}).get("class_path", "model").rpartition(".")[2]
    data = (cfg.get("data") or {}).get("class_path", "data").rpartition(".")[2].removesuffix("DataModule")
    return f"{data.lower()}_{model.lower()}"


def cli_main(args: Any = None, **kwargs: Any) -> MetaLearningCLI:
    """Entry point; ``args`` as for ``LightningCLI`` (command-line strings, or None for sys.argv)."""
    return MetaLearningCLI(args=args, **kwargs)


if __name__ == "__main__":
    cli_main()
