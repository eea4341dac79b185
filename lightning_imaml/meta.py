"""Lightning glue: iMAML, MAML and first-order MAML as LightningModules sharing one base class.

The maths lives in pure torch (:mod:`lightning_imaml.metagrad`, :mod:`lightning_imaml.implicit`,
:mod:`lightning_imaml.inner`); this module only

* unpacks a meta-batch (an ``Episode``: ``support_x [B, N*K, ...]``, ``support_y [B, N*K]``,
  ``query_x [B, N*Q, ...]``, ``query_y [B, N*Q]``; regression ``[B, K, 1]``),
* averages the per-task meta-gradients ``g = 1/B sum_i g_i``,
* hands ``g`` to the outer optimiser with manual optimisation, and
* adapts on the support set at validation / test time and reports query metrics before and after.

Outer step. ``g`` is written into ``p.grad`` by ``manual_backward`` of the surrogate
``s(theta) = sum_p <p, g_p>`` (so ``ds/dp = g_p``): Lightning's precision plugin then applies the
16-mixed gradient scaler (and its unscale before the step) and, under DDP, the DDP reducer averages
``p.grad`` over ranks -- every rank ends with the mean over the union of all ranks' tasks and takes the
same step. A non-finite averaged gradient (checked after the all-reduce, so every rank agrees) skips
the step: gradients are dropped, parameters and optimiser state stay untouched, and
``train/skipped_steps`` counts it.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import CatMetric

from .batched import (
    BATCHED_INNER_OPTIMIZERS,
    BatchingUnsupported,
    probe_batching,
    summarise_tasks,
    vmap_tasks,
)
from .metagrad import (
    ForwardCast,
    TaskResult,
    adapt,
    fomaml_task_meta_gradient,
    imaml_task_meta_gradient,
    loss_for_task_type,
    maml_task_meta_gradient,
    task_forward,
)

__all__ = ["MetaLearner", "IMAML", "MAML", "FOMAML", "INNER_OPTIMIZERS", "unpack_episode"]

INNER_OPTIMIZERS = ("gd_armijo", "gd", "sgd", "adam", "lbfgs", "hf")
LEARN_LAM = (False, "layer", "parameter")
TASK_TYPES = ("classification", "regression")


def unpack_episode(batch: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(support_x, support_y, query_x, query_y)``, each with a leading task dimension B.

    Accepts an ``Episode`` (or anything with those attributes), a mapping with those keys, or a
    4-sequence in that order.
    """
    names = ("support_x", "support_y", "query_x", "query_y")
    if all(hasattr(batch, n) for n in names):
        parts = tuple(getattr(batch, n) for n in names)
    elif isinstance(batch, Mapping):
        missing = [n for n in names if n not in batch]
        if missing:
            raise ValueError(f"episode mapping lacks keys {missing}; got keys {sorted(batch)}")
        parts = tuple(batch[n] for n in names)
    elif isinstance(batch, (tuple, list)) and len(batch) == 4:
        parts = tuple(batch)
    else:
        raise ValueError(
            "a meta-batch must be an Episode (support_x, support_y, query_x, query_y); "
            f"got {type(batch).__name__}"
        )
    b = parts[0].shape[0] if parts[0].dim() > 0 else None
    shapes = [tuple(p.shape) for p in parts]
    if b is None or any(p.dim() < 1 or p.shape[0] != b for p in parts):
        raise ValueError(f"episode tensors need the same leading task dimension B, got shapes {shapes}")
    return parts  # type: ignore[return-value]


def _lam_key(name: str) -> str:
    """A parameter name as a ParameterDict key (no dots allowed there)."""
    return name.replace(".", "__")


def _stack(values: list) -> Any:
    """Per-task results (tensors or dicts of tensors) -> one with a leading task dimension."""
    if isinstance(values[0], Mapping):
        return {k: torch.stack([v[k] for v in values]) for k in values[0]}
    return torch.stack(values)


def callable_to_config(factory: Any) -> Any:
    """``torch.optim.Adam`` -> ``{"class_path": "torch.optim.Adam"}``; ``functools.partial(SGD, lr=0.1)``
    -> ``{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}``; configs pass through. Anything else
    (a lambda, a partial with positional arguments) is returned unchanged: it works, but a checkpoint
    holding it needs ``torch.load(weights_only=False)``."""
    if isinstance(factory, Mapping):
        return dict(factory)
    func, kwargs = factory, {}
    if isinstance(factory, functools.partial):
        if factory.args:
            return factory
        func, kwargs = factory.func, dict(factory.keywords)
    if not isinstance(func, type) or not all(isinstance(v, _PRIMITIVES) for v in kwargs.values()):
        return factory
    config: dict[str, Any] = {"class_path": f"{func.__module__}.{func.__qualname__}"}
    if kwargs:
        config["init_args"] = kwargs
    return config


_PRIMITIVES = (bool, int, float, str, type(None), tuple, list)


def config_to_callable(factory: Any, name: str) -> Any:
    """Inverse of :func:`callable_to_config`: a ``{"class_path", "init_args"}`` mapping becomes
    ``functools.partial(cls, **init_args)``; callables pass through."""
    if factory is None or callable(factory):
        return factory
    if isinstance(factory, Mapping) and isinstance(factory.get("class_path"), str):
        module_name, _, attr = factory["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"{name}: cannot import class_path {factory['class_path']!r}") from err
        return functools.partial(cls, **dict(factory.get("init_args") or {}))
    raise ValueError(f"{name} must be a callable or a {{'class_path', 'init_args'}} mapping, got {factory!r}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_int(name: str, value: Any, minimum: int) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"{name} must be an int >= {minimum}, got {value!r}",
    )


class MetaLearner(pl.LightningModule):
    """Base LightningModule of the meta-learners: episode handling, outer step, evaluation, metrics.

    Subclasses implement :meth:`task_meta_gradient` (one task ->
    :class:`~lightning_imaml.metagrad.TaskResult`);
    :meth:`meta_gradient` averages it over the meta-batch (replaceable by a batched implementation).

    Args:
        model: any ``nn.Module``; used only through ``torch.func.functional_call`` with its trainable
            parameters as a dict (the meta-parameters theta).
        inner_steps, inner_lr, lam, inner_optimizer: the training-time inner problem
            min_phi L_s(phi) + lam/2 ||phi - theta||^2.
        eval_inner_steps, eval_inner_lr, eval_lam, eval_inner_optimizer: adaptation at validation /
            test time (None: the training value). ``eval_lam = 0`` is plain fine-tuning.
        optimizer: outer optimiser factory ``params -> Optimizer`` (LightningCLI-injectable),
            default ``torch.optim.Adam`` (lr 1e-3).
        lr_scheduler: optional ``Optimizer -> scheduler`` factory, stepped after every training step
            (``ReduceLROnPlateau``: after every validation, on ``val/loss``).
        task_type: "classification" (cross-entropy, accuracy) or "regression" (MSE).
        inner_optimizer_kwargs: extra keyword arguments of the inner solver (e.g. ``{"momentum": 0.9}``).
        hf_cg_steps: CG steps per Newton iteration of the "hf" inner solver.
        eval_inner_optimizer_kwargs: extra keyword arguments of the evaluation solver. None: the training
            ones when evaluation uses the training solver, none otherwise (SGD's momentum means nothing
            to "gd").
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        lam: float = 0.0,
        inner_optimizer: str = "gd",
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
        eval_lam: float | None = None,
        eval_inner_optimizer: str | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        task_type: str = "classification",
        inner_optimizer_kwargs: dict[str, Any] | None = None,
        hf_cg_steps: int = 5,
        eval_inner_optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check(isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}")
        _check_int("inner_steps", inner_steps, 0)
        _check(inner_lr > 0, f"inner_lr must be > 0, got {inner_lr!r}")
        _check(lam >= 0, f"lam must be >= 0, got {lam!r}")
        _check(
            inner_optimizer in INNER_OPTIMIZERS,
            f"inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}",
        )
        if eval_inner_steps is not None:
            _check_int("eval_inner_steps", eval_inner_steps, 0)
        _check(
            eval_inner_lr is None or eval_inner_lr > 0, f"eval_inner_lr must be > 0, got {eval_inner_lr!r}"
        )
        _check(eval_lam is None or eval_lam >= 0, f"eval_lam must be >= 0, got {eval_lam!r}")
        _check(
            eval_inner_optimizer is None or eval_inner_optimizer in INNER_OPTIMIZERS,
            f"eval_inner_optimizer must be one of {INNER_OPTIMIZERS}, got {eval_inner_optimizer!r}",
        )
        _check(task_type in TASK_TYPES, f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        _check_int("hf_cg_steps", hf_cg_steps, 1)
        optimizer = config_to_callable(optimizer, "optimizer")
        lr_scheduler = config_to_callable(lr_scheduler, "lr_scheduler")
        _check(optimizer is not None, "optimizer must be a callable params -> Optimizer, got None")
        self._save_hparams()
        self.automatic_optimization = False

        self.model = model
        self.inner_steps = inner_steps
        self.inner_lr = float(inner_lr)
        self.lam = float(lam)
        self.inner_optimizer = inner_optimizer
        self.inner_optimizer_kwargs = dict(inner_optimizer_kwargs or {})
        self.hf_cg_steps = hf_cg_steps
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.eval_inner_lr = self.inner_lr if eval_inner_lr is None else float(eval_inner_lr)
        self.eval_lam = self.lam if eval_lam is None else float(eval_lam)
        self._eval_lam_given = None if eval_lam is None else float(eval_lam)
        self.log_lam: nn.ParameterDict | None = None  # IMAML(learn_lam=...) replaces it
        self.eval_inner_optimizer = inner_optimizer if eval_inner_optimizer is None else eval_inner_optimizer
        if eval_inner_optimizer_kwargs is None:
            same = self.eval_inner_optimizer == inner_optimizer
            eval_inner_optimizer_kwargs = self.inner_optimizer_kwargs if same else {}
        self.eval_inner_optimizer_kwargs = dict(eval_inner_optimizer_kwargs)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.task_type = task_type
        self.loss_fn = loss_for_task_type(task_type)
        self.skipped_steps = 0
        # per-task query metrics, gathered over ranks by torchmetrics at epoch end
        self.eval_metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": CatMetric(nan_strategy="disable")
                for stage in ("val", "test")
                for name in ("loss", "loss_pre", "acc", "acc_pre")
            }
        )

    def _save_hparams(self) -> None:
        """``save_hyperparameters`` without the module object. Under LightningCLI the hyperparameters
        are the parsed config, where ``model`` is a serialisable ``class_path`` dict: keep it there so
        ``load_from_checkpoint(path)`` can rebuild the network; otherwise pass ``model=`` to it."""
        ignore = ["model"]
        try:  # private in Lightning 2.x; absent -> always ignore the model
            from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters

            given = _given_hyperparameters.get()
            if isinstance(given, Mapping) and isinstance(given.get("model"), Mapping):
                ignore = []
        except ImportError:  # pragma: no cover
            pass
        self.save_hyperparameters(ignore=ignore)
        # keep only the concrete class's own arguments (MAML has no inner_optimizer, ...)
        own = {
            name
            for cls in type(self).__mro__
            if "__init__" in vars(cls) and issubclass(cls, MetaLearner)
            for name, par in inspect.signature(cls.__init__).parameters.items()
            if par.kind is not inspect.Parameter.VAR_KEYWORD
        }
        # LightningCLI's _class_path / _instantiator are what load_from_checkpoint(path) needs to rebuild a
        # model given as a class_path dict: keep them
        for key in [k for k in self.hparams if k not in own and k not in ("_class_path", "_instantiator")]:
            self.hparams.pop(key)
            getattr(self, "_hparams_initial", {}).pop(key, None)
        # store the optimiser / scheduler factories as {"class_path", "init_args"} configs (the CLI's own
        # format): checkpoints then hold only primitives and load under torch.load(weights_only=True)
        for key in ("optimizer", "lr_scheduler"):
            if key in self.hparams and self.hparams[key] is not None:
                self.hparams[key] = callable_to_config(self.hparams[key])
                if key in getattr(self, "_hparams_initial", {}):
                    self._hparams_initial[key] = self.hparams[key]

    # ------------------------------------------------------------------------------------------------
    # parameters and precision

    # ---- the proximal strength (IMAML can learn it; the others keep the number they were given) --------
    def current_lam(self) -> float | dict[str, Tensor]:
        """The training lam: the number, or (learned) a dict name -> exp(log lam), detached."""
        if self.log_lam is None:
            return self.lam
        return {name: self.log_lam[_lam_key(name)].detach().exp() for name in self.meta_parameters()}

    def current_eval_lam(self) -> float | dict[str, Tensor]:
        """lam at validation / test: ``eval_lam`` when given, else the training one (learned if learned)."""
        return self.current_lam() if self._eval_lam_given is None else self._eval_lam_given

    def outer_parameters(self) -> dict[str, Tensor]:
        """What the outer optimiser updates: theta (the model's names) and, when lam is learned, its
        log-values (``"log_lam.<name>"``)."""
        params = dict(self.meta_parameters())
        if self.log_lam is not None:
            params.update({f"log_lam.{k}": p for k, p in self.log_lam.items()})
        return params

    def meta_parameters(self) -> dict[str, Tensor]:
        """theta: the model's trainable parameters, name -> tensor (the live ``nn.Parameter`` objects)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _forward_cast(self) -> ForwardCast | None:
        """The autocast the Trainer's precision plugin opened around this step (if any), so that it can be
        re-applied to model forwards only while the rest runs in full precision."""
        for device_type in ("cuda", "cpu", self.device.type):
            try:
                enabled = torch.is_autocast_enabled(device_type)
            except (TypeError, RuntimeError):  # pragma: no cover - very old torch / unknown device
                continue
            if enabled:
                return ForwardCast(device_type, torch.get_autocast_dtype(device_type))
        return None

    def _full_precision(self):
        cast = self._forward_cast()
        device_type = cast.device_type if cast is not None else self.device.type
        return cast, torch.autocast(device_type=device_type, enabled=False)

    # ------------------------------------------------------------------------------------------------
    # meta-gradient

    def inner_settings(self) -> dict[str, Any]:
        """The training inner problem as keyword arguments of the per-task meta-gradient functions."""
        return dict(
            loss_fn=self.loss_fn,
            lam=self.current_lam(),
            inner_steps=self.inner_steps,
            inner_lr=self.inner_lr,
            inner_optimizer=self.inner_optimizer,
            hf_cg_steps=self.hf_cg_steps,
            inner_optimizer_kwargs=self.inner_optimizer_kwargs,
        )

    def task_meta_gradient(
        self,
        theta: Mapping[str, Tensor],
        task: tuple[Tensor, Tensor, Tensor, Tensor],
        cast: ForwardCast | None,
    ) -> TaskResult:
        """Meta-gradient of one task (no leading task dimension). Implemented by subclasses."""
        raise NotImplementedError

    def meta_gradient(
        self, batch: Any, cast: ForwardCast | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Mean meta-gradient over the meta-batch: g = 1/B sum_i g_i, computed task by task.

        Returns ``(grad, metrics)``: ``grad`` a dict like :meth:`meta_parameters` (detached);
        ``metrics`` per-task tensors of shape [B]: ``query_loss``, ``support_loss``, ``query_acc``
        (classification only) and any solver diagnostics (e.g. ``cg_steps``, ``cg_negative_curvature``,
        ``inner_residual``, ``inner_rose``).
        """
        sx, sy, qx, qy = unpack_episode(batch)
        theta = {k: v.detach() for k, v in self.meta_parameters().items()}
        classification = self.task_type == "classification"
        if self._use_batched(batch):
            try:
                return self.batched_meta_gradient(batch, cast)
            except BatchingUnsupported as err:
                rank_zero_warn(f"batched_tasks: using the per-task loop instead ({err})")
                self._batching_ok = False
        results = [self.task_meta_gradient(theta, task, cast) for task in zip(sx, sy, qx, qy, strict=True)]
        stacked = TaskResult(*(_stack([getattr(r, f) for r in results]) for f in TaskResult._fields))
        return summarise_tasks(stacked, qy, classification)

    # the per-task meta-gradient is a vmappable function for these learners (see IMAML.batched_tasks)
    _batchable = False
    batched_tasks: bool | None = None
    batched_chunk_size: int | None = None

    def _use_batched(self, batch: Any) -> bool:
        if not self._batchable:
            return False
        wanted = self.batched_tasks
        if wanted is None:
            wanted = unpack_episode(batch)[0].is_cuda
        if not wanted:
            return False
        if getattr(self, "_batching_ok", None) is None:
            ok = self.inner_optimizer.lower() in BATCHED_INNER_OPTIMIZERS
            why = f"inner_optimizer={self.inner_optimizer!r} has no batched solver"
            if ok:
                sx, sy, _, _ = unpack_episode(batch)
                theta = {k: v.detach() for k, v in self.meta_parameters().items()}
                ok, why = probe_batching(self.model, sx, sy, loss_fn=self.loss_fn, params=theta)
            if not ok and self.batched_tasks:
                rank_zero_warn(f"batched_tasks=True: using the per-task loop instead ({why})")
            self._batching_ok = ok
        return self._batching_ok

    def batched_meta_gradient(self, batch: Any, cast: ForwardCast | None = None):
        """The whole meta-batch at once: :meth:`task_meta_gradient` itself under ``torch.func.vmap``
        (``batched_chunk_size`` tasks per call); same return value as :meth:`meta_gradient`."""
        sx, sy, qx, qy = unpack_episode(batch)
        theta = {k: v.detach() for k, v in self.meta_parameters().items()}
        results = vmap_tasks(
            lambda *task: self.task_meta_gradient(theta, task, cast),
            (sx, sy, qx, qy),
            self.batched_chunk_size,
        )
        return summarise_tasks(results, qy, self.task_type == "classification")

    @staticmethod
    def _accuracy(out: Tensor, y: Tensor) -> Tensor:
        return (out.argmax(dim=-1) == y).float().mean()

    # ------------------------------------------------------------------------------------------------
    # training

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        cast, no_autocast = self._full_precision()
        with no_autocast:
            grad, metrics = self.meta_gradient(batch, cast)
            params = self.outer_parameters()
            if self.log_lam is not None:  # dF/dlog lam = lam dF/dlam
                lam = self.current_lam()
                for name in lam:
                    grad[f"log_lam.{_lam_key(name)}"] = lam[name] * grad.pop(f"lam:{name}")
            opt.zero_grad()
            # d/dp sum_p <p, g_p> = g_p: lets Lightning apply the AMP scaler and the DDP all-reduce.
            surrogate = sum((p * grad[k].to(p.dtype)).sum() for k, p in params.items())
            self.manual_backward(surrogate)
            finite = torch.stack(
                [torch.isfinite(p.grad).all() for p in params.values() if p.grad is not None]
            ).all()
            skip = not bool(finite)
            if skip:
                self.skipped_steps += 1
                if getattr(self.trainer.precision_plugin, "scaler", None) is None:
                    # no gradients -> torch optimisers leave parameters and state untouched; the call
                    # still counts as a step for Lightning's global_step / max_steps
                    for p in params.values():
                        p.grad = None
                # with a GradScaler the inf/NaN gradients make scaler.step skip the update itself
            opt.step()
            opt.zero_grad(set_to_none=True)
        self._step_schedulers_per_step()
        self._log_train(metrics)

    def _log_train(self, metrics: Mapping[str, Tensor]) -> None:
        bs = int(metrics["query_loss"].numel())
        self.log("train/loss", metrics["query_loss"].mean(), prog_bar=True, batch_size=bs)
        self.log("train/support_loss", metrics["support_loss"].mean(), batch_size=bs)
        if "query_acc" in metrics:
            self.log("train/acc", metrics["query_acc"].mean(), prog_bar=True, batch_size=bs)
        for key in ("cg_steps", "cg_negative_curvature", "cg_residual"):
            if key in metrics:
                self.log(f"train/{key}", metrics[key].float().mean(), batch_size=bs)
        # quality of the inner solves (the implicit gradient assumes inner_residual = 0)
        for key in ("inner_residual", "inner_residual_rel", "inner_rose", "inner_accepted"):
            if key in metrics:
                self.log(f"train/{key}", metrics[key].float().mean(), batch_size=bs)
        for key in ("inner_residual", "cg_residual"):
            if key in metrics:
                self.log(f"train/{key}_max", metrics[key].float().max(), batch_size=bs)
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=bs)
        if self.log_lam is not None:  # the learned proximal strength per parameter tensor (mean over entries)
            for name, value in self.current_lam().items():
                self.log(f"train/lam/{name}", value.float().mean(), batch_size=bs)
        self._watch_inner_solves(metrics)

    # a meta-step's inner solves "fail" when the majority of its tasks' proximal objective rose or their
    # residual ended above the starting gradient norm; warn after this many failing steps in a row
    inner_failure_patience = 20

    def _watch_inner_solves(self, metrics: Mapping[str, Tensor]) -> None:
        if "inner_rose" not in metrics:
            return
        failed = (metrics["inner_rose"] > 0) | (metrics["inner_residual_rel"] > 1)
        if float(failed.float().mean()) > 0.5:
            self._inner_failures = getattr(self, "_inner_failures", 0) + 1
        else:
            self._inner_failures = 0
        if self._inner_failures == self.inner_failure_patience:
            rose = float(metrics["inner_rose"].float().mean())
            rel = float(metrics["inner_residual_rel"].max())
            rank_zero_warn(
                f"inner solves keep failing: for {self.inner_failure_patience} meta-steps in a row most "
                f"tasks' proximal objective rose during {self.inner_optimizer!r} (train/inner_rose "
                f"{rose:.2f}) or ended with a larger gradient than it started with "
                f"(train/inner_residual_rel max {rel:.2f}). "
                "The implicit meta-gradient is then taken at a non-stationary point. Use "
                "inner_optimizer='gd_armijo' (safeguarded step), a smaller inner_lr, or a larger lam."
            )

    def configure_optimizers(self):
        params: list = list(self.meta_parameters().values())
        if self.log_lam is not None:  # a second parameter group, with its own lr when lam_lr is set
            group = {"params": list(self.log_lam.values())}
            if getattr(self, "lam_lr", None) is not None:
                group["lr"] = self.lam_lr
            params = [{"params": params}, group]
        opt = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return opt
        sched = self.lr_scheduler_factory(opt)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "step"},
        }

    def _schedulers(self) -> list:
        sch = self.lr_schedulers()
        if sch is None:
            return []
        return list(sch) if isinstance(sch, list) else [sch]

    def _step_schedulers_per_step(self) -> None:
        for sch in self._schedulers():
            if not isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sch.step()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["meta_learner"] = {"skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("meta_learner", {}).get("skipped_steps", 0))

    # ------------------------------------------------------------------------------------------------
    # evaluation

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def adapt_task(self, theta: Mapping[str, Tensor], support_x: Tensor, support_y: Tensor, cast=None):
        """Test-time adaptation: proximal_adapt with the eval_* settings (detached phi)."""
        return adapt(
            self.model,
            theta,
            support_x,
            support_y,
            loss_fn=self.loss_fn,
            lam=self.current_eval_lam(),
            steps=self.eval_inner_steps,
            lr=self.eval_inner_lr,
            optimizer=self.eval_inner_optimizer,
            hf_cg_steps=self.hf_cg_steps,
            optimizer_kwargs=self.eval_inner_optimizer_kwargs,
            cast=cast,
        )

    def _eval_step(self, batch: Any, stage: str) -> None:
        # Adaptation needs autograd, but the Trainer runs evaluation under torch.inference_mode() by
        # default: leave it, and clone the batch (inference tensors cannot be saved for backward).
        with torch.inference_mode(False), torch.enable_grad():
            sx, sy, qx, qy = (t.clone() for t in unpack_episode(batch))
            cast, no_autocast = self._full_precision()
            theta = {k: v.detach() for k, v in self.meta_parameters().items()}
            with no_autocast:
                for i in range(sx.shape[0]):
                    with torch.no_grad():
                        out_pre = task_forward(self.model, theta, qx[i], cast)
                    phi = self.adapt_task(theta, sx[i], sy[i], cast)
                    with torch.no_grad():
                        out = task_forward(self.model, phi, qx[i], cast)
                        self._update_eval(stage, out_pre, out, qy[i])

    def _update_eval(self, stage: str, out_pre: Tensor, out: Tensor, y: Tensor) -> None:
        m = self.eval_metrics
        m[f"{stage}_loss_pre"].update(self.loss_fn(out_pre, y).float().reshape(1))
        m[f"{stage}_loss"].update(self.loss_fn(out, y).float().reshape(1))
        if self.task_type == "classification":
            m[f"{stage}_acc_pre"].update(self._accuracy(out_pre, y).reshape(1))
            m[f"{stage}_acc"].update(self._accuracy(out, y).reshape(1))

    def _summarise(self, stage: str) -> dict[str, float]:
        """Mean over all tasks of the epoch (all ranks) and the 95% CI half-width 1.96 std / sqrt(n)."""
        out: dict[str, float] = {}
        names = ("loss", "loss_pre") + (("acc", "acc_pre") if self.task_type == "classification" else ())
        for name in names:
            metric = self.eval_metrics[f"{stage}_{name}"]
            if not metric.update_called:
                continue
            values = metric.compute().reshape(-1).double()
            metric.reset()
            n = values.numel()
            mean = float(values.mean())
            std = float(values.std(correction=1)) if n > 1 else 0.0
            out[f"{stage}/{name}"] = mean
            if self.task_type == "regression":  # the loss is the MSE: also report it under that name
                out[f"{stage}/{name.replace('loss', 'mse')}"] = mean
            if name == ("acc" if self.task_type == "classification" else "loss"):
                label = "acc" if self.task_type == "classification" else "mse"
                out[f"{stage}/{label}_ci95"] = 1.96 * std / math.sqrt(n)
                out[f"{stage}/n_tasks"] = float(n)
        return out

    def _log_eval(self, stage: str) -> None:
        for k, v in self._summarise(stage).items():
            # values are already gathered over ranks by torchmetrics
            self.log(k, v, prog_bar=k in (f"{stage}/acc", f"{stage}/mse"), rank_zero_only=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is not None and not self.trainer.sanity_checking:
            for sch in self._schedulers():
                if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    sch.step(val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")


class IMAML(MetaLearner):
    """iMAML (Rajeswaran et al., 2019): implicit meta-gradients through the proximal inner problem.

    Per task: phi ~ argmin_phi L_s(phi) + lam/2 ||phi - theta||^2 by ``inner_optimizer`` (``inner_steps``
    steps, no graph kept), then g = ((1 + cg_damping) I + H/lam)^{-1} grad L_q(phi) by ``cg_steps`` CG
    steps (H the support-loss Hessian at phi). Memory is independent of ``inner_steps``.

    The default inner solver is ``"gd_armijo"``: gradient descent whose per-task step is accepted only if
    it decreases the proximal objective enough, so it cannot diverge when meta-training sharpens the
    support loss past what a fixed step handles (``"gd"``, the textbook fixed step, stays available;
    see :func:`lightning_imaml.inner.gd_armijo_adapt`). ``inner_lr`` is then its largest step. Each
    training step logs the quality of the inner solves: ``train/inner_residual`` (mean and ``_max`` over
    the meta-batch) = ||grad L_s(phi) + lam (phi - theta)||, ``train/inner_residual_rel``,
    ``train/inner_rose`` (share of tasks whose objective rose) and ``train/inner_accepted``; a warning
    is raised when most solves fail for 20 meta-steps in a row.

    ``batched_tasks``: run the whole meta-batch at once: :meth:`task_meta_gradient` itself under
    ``torch.func.vmap`` (every inner solver, CG and the HVP are per-task functions that vmap batches),
    ``batched_chunk_size`` tasks per call (None: all). ``None`` (default) means "on when it pays":
    batched on CUDA, the per-task loop on CPU, where batching measured 0.65-0.71x the loop's time at 1
    query image per class but 1.01-1.35x at 15 (Hessian-free 1.15x / 1.35x), for 10-17x its memory
    (``benchmarks/batched_speed.py``, Omniglot Conv4, meta-batch 32, 2 cores): the convolutions, which
    batching does not make cheaper on a CPU, and the masked elementwise work on the stacked parameters
    take about as long as the per-task dispatch it saves. The default chunk of 8 tasks measured 0.71-0.78x
    / 0.81-0.95x the loop there with a third to a half of the whole batch's memory (4-16 MiB per task);
    on a GPU a larger chunk (or None) may pay. Models that vmap cannot run (BatchNorm with running
    statistics, data-dependent control flow) are detected on the first batch; the module then warns once
    and loops.

    Other arguments: :class:`MetaLearner`.
    """

    _batchable = True

    def __init__(
        self, model: nn.Module, lam: float = 2.0, inner_steps: int = 16, inner_lr: float = 0.1,
        inner_optimizer: str = "gd_armijo", cg_steps: int = 5, cg_damping: float = 0.0,
        batched_tasks: bool | None = None, batched_chunk_size: int | None = 8,
        learn_lam: bool | str = False, lam_lr: float | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        _check(lam > 0, f"IMAML needs lam > 0 (the proximal strength), got lam={lam!r}")
        _check_int("cg_steps", cg_steps, 1)
        _check(cg_damping >= 0, f"cg_damping must be >= 0, got {cg_damping!r}")
        if batched_chunk_size is not None:
            _check_int("batched_chunk_size", batched_chunk_size, 1)
        _check(
            learn_lam in LEARN_LAM,
            f"learn_lam must be one of {LEARN_LAM} (per parameter tensor / per scalar), got {learn_lam!r}",
        )
        _check(lam_lr is None or lam_lr > 0, f"lam_lr must be > 0 (or None: the outer lr), got {lam_lr!r}")
        _check(not learn_lam or lam > 0, f"learn_lam needs an initial lam > 0, got lam={lam!r}")
        super().__init__(
            model,
            lam=lam,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            inner_optimizer=inner_optimizer,
            **kwargs,
        )
        self.cg_steps = cg_steps
        self.cg_damping = float(cg_damping)
        self.batched_tasks = None if batched_tasks is None else bool(batched_tasks)
        self.batched_chunk_size = batched_chunk_size
        self._batching_ok: bool | None = None  # probed on the first batch
        if learn_lam:
            # one log-lam per parameter tensor ("layer") or per scalar ("parameter"), starting at log(lam)
            shape = {"layer": lambda p: (), "parameter": lambda p: p.shape}[learn_lam]
            self.log_lam = nn.ParameterDict(
                {
                    _lam_key(n): nn.Parameter(
                        torch.full(shape(p), math.log(lam), dtype=p.dtype, device=p.device)
                    )
                    for n, p in self.meta_parameters().items()
                }
            )
        self.learn_lam = learn_lam or False
        self.lam_lr = None if lam_lr is None else float(lam_lr)

    def task_meta_gradient(self, theta, task, cast=None) -> TaskResult:
        return imaml_task_meta_gradient(
            self.model, theta, task, cg_steps=self.cg_steps, cg_damping=self.cg_damping, cast=cast,
            lam_grad=self.log_lam is not None, **self.inner_settings(),
        )  # fmt: skip


class FOMAML(MetaLearner):
    """First-order MAML: meta-gradient grad L_q(phi) at the adapted phi (inner Jacobian taken as I).

    phi comes from the same proximal inner solver as iMAML (``inner_optimizer``, default "gd", lam default
    0), with no graph kept, so memory is flat in ``inner_steps``. Other arguments: :class:`MetaLearner`.
    """

    def __init__(
        self, model: nn.Module, lam: float = 0.0, inner_steps: int = 1, inner_lr: float = 0.4, **kwargs: Any
    ) -> None:
        super().__init__(model, lam=lam, inner_steps=inner_steps, inner_lr=inner_lr, **kwargs)

    def task_meta_gradient(self, theta, task, cast=None) -> TaskResult:
        return fomaml_task_meta_gradient(self.model, theta, task, cast=cast, **self.inner_settings())


class MAML(MetaLearner):
    """MAML (Finn et al., 2017), second order: differentiates through the unrolled inner loop.

    phi_{t+1} = phi_t - inner_lr (grad L_s(phi_t) + lam (phi_t - theta)), t < inner_steps, from phi_0 = theta;
    meta-gradient d L_q(phi_T)/d theta with ``create_graph=True`` (memory grows with ``inner_steps``).
    ``lam = 0`` (default) is plain MAML; with lam > 0 and a converging inner loop the meta-gradient
    tends to iMAML's implicit one. The inner loop is plain gradient descent ("gd"), so the training solver's
    options (``inner_optimizer``, ``inner_optimizer_kwargs``, ``hf_cg_steps``) are not taken; evaluation
    may use any ``eval_inner_optimizer``. Other arguments: :class:`MetaLearner`.
    """

    first_order = False

    def __init__(
        self, model: nn.Module, lam: float = 0.0, inner_steps: int = 1, inner_lr: float = 0.4, **kwargs: Any
    ) -> None:
        # LightningCLI fills every inherited argument with its default: reject only a real other solver
        fixed = kwargs.get("inner_optimizer", "gd") != "gd" or bool(kwargs.get("inner_optimizer_kwargs"))
        _check(
            not fixed,
            f"MAML differentiates through plain GD steps: inner_optimizer={kwargs.get('inner_optimizer')!r} "
            f"with options {kwargs.get('inner_optimizer_kwargs')} is not possible; use FOMAML or IMAML for "
            "another inner solver (eval_inner_optimizer sets the one used at validation / test)",
        )
        super().__init__(model, lam=lam, inner_steps=inner_steps, inner_lr=inner_lr, **kwargs)

    def task_meta_gradient(self, theta, task, cast=None) -> TaskResult:
        return maml_task_meta_gradient(
            self.model, theta, task, loss_fn=self.loss_fn, lam=self.lam, inner_steps=self.inner_steps,
            inner_lr=self.inner_lr, first_order=self.first_order, cast=cast,
        )  # fmt: skip
