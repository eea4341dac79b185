"""Lightning glue: iMAML, MAML and first-order MAML as LightningModules sharing one base class.

The maths lives in pure torch (:mod:`lightning_imaml.metagrad` and below); this module only

* unpacks a meta-batch (an ``Episode``: ``support_x [B, N*K, ...]``, ``support_y [B, N*K]``,
  ``query_x [B, N*Q, ...]``, ``query_y [B, N*Q]``; regression ``[B, K, 1]``),
* computes it in chunks of tasks (:mod:`lightning_imaml.batched`; the chunk size chosen by timing),
* averages the per-task meta-gradients ``g = 1/B sum_i g_i`` and hands ``g`` to the outer optimiser with
  manual optimisation, and
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

import inspect
import os
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from . import hparams
from .batched import choose_chunk_size, run_chunked, summarise_tasks
from .cg import CG
from .checkpoints import read_checkpoint
from .cpu import keep_freed_memory
from .evaluation import EvalMetrics, adapt_and_predict, autograd_in_evaluation, training_log
from .functional import ForwardCast, active_cast
from .inner import SOLVERS, InnerSolver
from .lam import LEARN_LAM, LearnedLam
from .metagrad import (
    TaskResults,
    Tasks,
    adapt,
    fomaml_meta_gradient,
    imaml_meta_gradient,
    loss_for_task_type,
    maml_meta_gradient,
)
from .params import ParamSpec, detached
from .precision import ieee_fp32
from .watchdog import SolveWatchdog

__all__ = ["FOMAML", "IMAML", "INNER_OPTIMIZERS", "MAML", "MetaLearner", "unpack_episode"]

# LightningCLI: inner_solver / eval_solver by class_path (jsonargparse parses dataclasses field by field)
try:
    from jsonargparse import set_parsing_settings

    set_parsing_settings(subclasses_enabled=[InnerSolver])
except (ImportError, TypeError):  # pragma: no cover - older jsonargparse: solvers by the flat arguments only
    pass

INNER_OPTIMIZERS = tuple(SOLVERS)


def unpack_episode(batch: Any) -> Tasks:
    """``(support_x, support_y, query_x, query_y)``, each with a leading task dimension B: from an ``Episode``
    (or anything with those attributes), a mapping with those keys, or a 4-sequence in that order."""
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
            f"a meta-batch must be an Episode (support_x, support_y, query_x, query_y); got "
            f"{type(batch).__name__}"
        )
    shapes = [tuple(p.shape) for p in parts]
    if any(p.dim() < 1 or p.shape[0] != parts[0].shape[0] for p in parts):
        raise ValueError(f"episode tensors need the same leading task dimension B, got shapes {shapes}")
    return parts  # type: ignore[return-value]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class MetaLearner(pl.LightningModule):
    """Base LightningModule of the meta-learners: the outer step, evaluation and logging. Subclasses implement
    :meth:`task_meta_gradients` (a chunk of tasks -> :class:`TaskResults`).

    Args:
        model: any ``nn.Module``; used only functionally, with its trainable parameters as theta.
        inner_solver, eval_solver: the inner solvers of training and of validation / test: objects
            (``GDArmijo(steps=16)``), registered names or ``class_path`` configs; else built from the flat
            arguments ``inner_optimizer`` (a name in :data:`INNER_OPTIMIZERS`), ``inner_steps``, ``inner_lr``,
            ``inner_optimizer_kwargs``, ``hf_cg_steps``, ``inner_tol`` / ``inner_atol`` (stop a task's solve
            once its proximal gradient norm is <= ``max(inner_atol, inner_tol * its norm at theta)``) and
            ``eval_inner_*`` (None: the training value): :func:`lightning_imaml.hparams.solvers`.
        lam, eval_lam: the proximal strength of training and of evaluation (None: the training one).
        optimizer, lr_scheduler: outer optimiser factory ``params -> Optimizer`` (default Adam, lr 1e-3) and
            ``Optimizer -> scheduler``, stepped every step (``ReduceLROnPlateau``: on ``val/loss``).
        task_type: "classification" (cross-entropy, accuracy) or "regression" (MSE).
        batched_tasks: False computes one task at a time, True several at once (``batched_chunk_size``, or
            chosen by timing when None), None (default) times both on the first meta-batch and keeps the
            faster (:func:`~lightning_imaml.batched.choose_chunk_size`; the choice and the times are logged).
        allow_tf32: False (default) runs the meta-gradient and the evaluation's adaptation with float32
            convolutions and matmuls in full precision on CUDA (:func:`~lightning_imaml.precision.ieee_fp32`),
            whatever the global TF32 settings; True leaves those settings in force.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int | None = 5,
        inner_lr: float | None = 0.1,
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
        hf_cg_steps: int | None = None,
        eval_inner_optimizer_kwargs: dict[str, Any] | None = None,
        inner_solver: InnerSolver | None = None,
        eval_solver: InnerSolver | None = None,
        inner_tol: float = 0.0,
        inner_atol: float = 0.0,
        batched_tasks: bool | None = None,
        batched_chunk_size: int | None = None,
        allow_tf32: bool = False,
    ) -> None:
        super().__init__()
        hparams.check_learner_args(model, lam, eval_lam, task_type, batched_chunk_size)
        self.inner_solver, self.eval_solver = hparams.solvers(
            inner_solver, eval_solver, inner_optimizer=inner_optimizer, inner_steps=inner_steps,
            inner_lr=inner_lr, inner_optimizer_kwargs=inner_optimizer_kwargs, hf_cg_steps=hf_cg_steps,
            inner_tol=inner_tol, inner_atol=inner_atol, eval_inner_optimizer=eval_inner_optimizer,
            eval_inner_steps=eval_inner_steps, eval_inner_lr=eval_inner_lr,
            eval_inner_optimizer_kwargs=eval_inner_optimizer_kwargs,
        )  # fmt: skip
        self.optimizer_factory = hparams.config_to_callable(optimizer, "optimizer")
        self.lr_scheduler_factory = hparams.config_to_callable(lr_scheduler, "lr_scheduler")
        _check(
            self.optimizer_factory is not None, "optimizer must be a callable params -> Optimizer, got None"
        )
        hparams.save_hparams(self, inspect.currentframe(), MetaLearner)
        self.automatic_optimization = False
        self.model = model
        self.lam = float(lam)
        self.eval_lam = None if eval_lam is None else float(eval_lam)
        self.task_type = task_type
        self.loss_fn = loss_for_task_type(task_type)
        self.batched_tasks = None if batched_tasks is None else bool(batched_tasks)
        self.batched_chunk_size = batched_chunk_size
        self.allow_tf32 = bool(allow_tf32)
        self.chunk_sizes: dict[str, int] = {}  # per stage, chosen on its first batch
        self.log_lam: LearnedLam | None = None  # IMAML(learn_lam=...) sets it
        self.skipped_steps = 0
        self.eval_metrics = EvalMetrics(task_type == "classification")
        self.watchdog = SolveWatchdog()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args: Any, **kwargs: Any):
        """``LightningModule.load_from_checkpoint`` after
        :func:`~lightning_imaml.checkpoints.read_checkpoint`:
        a missing path or a file that is not a checkpoint raises a message naming it."""
        if isinstance(checkpoint_path, (str, os.PathLike)):
            read_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        if self.device.type == "cpu":
            keep_freed_memory()  # the engine's MB-sized temporaries then reuse memory: no page faults

    # ---------------------------------------------------------------------------------------- parameters
    def meta_parameters(self) -> dict[str, Tensor]:
        """theta: the model's trainable parameters, name -> tensor (the live ``nn.Parameter`` objects)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def current_lam(self) -> float | dict[str, Tensor]:
        """The training lam: the number, or (learned) a dict name -> lam, detached."""
        return self.lam if self.log_lam is None else self.log_lam.values_by_name()

    def current_eval_lam(self) -> float | dict[str, Tensor]:
        """lam at validation / test: ``eval_lam`` when given, else the training one (learned if learned)."""
        return self.current_lam() if self.eval_lam is None else self.eval_lam

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _forward_cast(self) -> ForwardCast | None:
        """The autocast the precision plugin opened around this step, re-applied to model forwards only."""
        return active_cast(self.device.type)

    # ------------------------------------------------------------------------------------- meta-gradient
    def task_meta_gradients(self, theta: dict[str, Tensor], tasks: Tasks, cast, mode: str) -> TaskResults:
        """Meta-gradients of a chunk of tasks (leading dimension T). Implemented by subclasses."""
        raise NotImplementedError

    def chunk_size(self, stage: str, fn, tasks: Tasks, cast) -> int:
        """Tasks computed at once for ``stage`` (and autocast dtype): decided on its first batch by
        :func:`~lightning_imaml.batched.choose_chunk_size`, kept in checkpoints (a resumed run computes as the
        interrupted one)."""
        stage = stage if cast is None else f"{stage}/{str(cast.dtype).removeprefix('torch.')}"
        if stage not in self.chunk_sizes:
            size, why = choose_chunk_size(
                self.batched_tasks, self.batched_chunk_size, fn, tasks, self.model, self.loss_fn, cast
            )
            self.chunk_sizes[stage] = size
            rank_zero_info(f"{type(self).__name__} {stage}: {size} task(s) at once ({why})")
        return self.chunk_sizes[stage]

    def meta_gradient(self, batch: Any, cast: ForwardCast | None = None) -> tuple[dict[str, Tensor], dict]:
        """Mean meta-gradient over the meta-batch, g = 1/B sum_i g_i: ``(grad, metrics)``, grad a dict like
        :meth:`meta_parameters` (detached; ``"log_lam.<key>"``: dF/dlog lam when lam is learned), metrics
        per-task ``[B]`` tensors (``query_loss``, ``support_loss``, ``query_acc``, solver diagnostics)."""
        tasks = unpack_episode(batch)
        theta = detached(self.meta_parameters())

        def fn(chunk, mode):
            return self.task_meta_gradients(theta, chunk, cast, mode)

        with torch.inference_mode(False), ieee_fp32(not self.allow_tf32):
            results = run_chunked(fn, tasks, self.chunk_size("train", fn, tasks, cast))
        spec = ParamSpec.of(theta)
        grad, metrics = summarise_tasks(results, spec, tasks[3], self.task_type == "classification")
        if self.log_lam is not None:
            logs = self.log_lam.log_gradients(results.lam_grad.mean(0), spec)
            grad.update({f"log_lam.{k}": v for k, v in logs.items()})
        return grad, metrics

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        cast = self._forward_cast()
        with torch.autocast(cast.device_type if cast else self.device.type, enabled=False):
            grad, metrics = self.meta_gradient(batch, cast)
            params = dict(self.meta_parameters())
            if self.log_lam is not None:
                params.update({f"log_lam.{k}": p for k, p in self.log_lam.items()})
            opt.zero_grad()
            # d/dp sum_p <p, g_p> = g_p: lets Lightning apply the AMP scaler and the DDP all-reduce.
            self.manual_backward(sum((p * grad[k].to(p.dtype)).sum() for k, p in params.items()))
            if not all(bool(torch.isfinite(p.grad).all()) for p in params.values() if p.grad is not None):
                self.skipped_steps += 1
                if getattr(self.trainer.precision_plugin, "scaler", None) is None:
                    # no gradients -> torch optimisers leave parameters and state untouched; the call still
                    # counts as a step for Lightning's global_step / max_steps (a GradScaler skips by itself)
                    for p in params.values():
                        p.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
        for sch in self._schedulers():
            if not isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sch.step()
        self._log_train(metrics)

    def _log_train(self, metrics: Mapping[str, Tensor]) -> None:
        bs = int(metrics["query_loss"].numel())
        lam = self.current_lam() if self.log_lam is not None else None
        for name, value, prog_bar in training_log(metrics, self.skipped_steps, lam):
            self.log(name, value, prog_bar=prog_bar, batch_size=bs)
        message = self.watchdog.update(metrics, self.inner_solver.name)
        if message:
            rank_zero_warn(message)

    def configure_optimizers(self):
        params: list = list(self.meta_parameters().values())
        if self.log_lam is not None:  # a second parameter group, with its own lr when lam_lr is set
            params = [{"params": params}, self.log_lam.param_group(getattr(self, "lam_lr", None))]
        opt = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"},
        }

    def _schedulers(self) -> list:
        sch = self.lr_schedulers()
        return [] if sch is None else list(sch) if isinstance(sch, list) else [sch]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["meta_learner"] = {
            "skipped_steps": self.skipped_steps,
            "chunk_sizes": dict(self.chunk_sizes),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("meta_learner", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.chunk_sizes.update(state.get("chunk_sizes", {}))

    # ---------------------------------------------------------------------------------------- evaluation
    def adapt_task(self, theta: Mapping[str, Tensor], support_x: Tensor, support_y: Tensor, cast=None):
        """Test-time adaptation of one task with the evaluation solver and lam: phi (a dict, detached)."""
        return adapt(
            self.model, theta, support_x, support_y, loss_fn=self.loss_fn, lam=self.current_eval_lam(),
            solver=self.eval_solver, cast=cast,
        )[0]  # fmt: skip

    def _eval_step(self, batch: Any, stage: str) -> None:
        # Adaptation needs autograd, but the Trainer runs evaluation under torch.inference_mode() by default
        cast = self._forward_cast()
        theta, lam = detached(self.meta_parameters()), self.current_eval_lam()

        def fn(chunk, mode):  # the query outputs of a chunk of tasks before and after adaptation
            return adapt_and_predict(
                self.model, theta, chunk, self.loss_fn, lam, self.eval_solver, cast, mode
            )

        with autograd_in_evaluation(self.device.type), ieee_fp32(not self.allow_tf32):
            tasks = tuple(t.clone() if t.is_inference() else t for t in unpack_episode(batch))
            out_pre, out = run_chunked(fn, tasks, self.chunk_size("eval", fn, tasks, cast))
        self.eval_metrics.update(stage, self.loss_fn, out_pre, out, tasks[3])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_eval(self, stage: str) -> None:
        for k, v in self.eval_metrics.summarise(stage).items():  # already gathered over ranks by torchmetrics
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

    Per task: phi ~ argmin_phi L_s(phi) + lam/2 ||phi - theta||^2 by the inner solver (no graph kept), then
    g = ((1 + cg_damping) I + H/lam)^{-1} grad L_q(phi) by ``cg_steps`` CG steps (H the support-loss Hessian
    at phi). Memory is independent of the inner solver's steps. ``cg_damping`` defaults to 1.0, the official
    code's: early in meta-training I + H/lam at phi is near-singular in some tasks, and undamped (0.0, the
    paper's Eq. 7) those tasks' meta-gradients dominate the batch (README, "CG damping").

    The default inner solver is ``"lbfgs"`` (:class:`lightning_imaml.inner.LBFGS`: 8 iterations from the
    unit step): quasi-Newton steps with Armijo backtracking, so it cannot diverge when meta-training sharpens
    the support loss, and in 8 gradients it reaches the residual of 16 ``"gd_armijo"`` steps (the safeguarded
    GD of :class:`lightning_imaml.inner.GDArmijo`, the default before: ``inner_optimizer="gd_armijo"``).
    ``inner_steps`` / ``inner_lr`` None mean the chosen solver's own defaults. Validation and test adapt with
    the same solver unless ``eval_*`` says otherwise. Each training step logs
    the quality of the inner solves: ``train/inner_residual`` (mean and ``_max`` over the meta-batch) =
    ||grad L_s(phi) + lam (phi - theta)||, ``train/inner_residual_rel``, ``train/inner_rose`` (share of tasks
    whose objective rose), ``train/inner_accepted`` and ``train/inner_iterations``; a warning is raised
    when most solves fail for 20 meta-steps in a row.

    ``learn_lam``: "layer" (one lam per parameter tensor) or "parameter" (one per scalar), meta-learned from
    ``lam`` by the outer optimiser (its own learning rate ``lam_lr`` when given). Other arguments:
    :class:`MetaLearner`.
    """

    def __init__(
        self, model: nn.Module, lam: float = 2.0, inner_steps: int | None = None,
        inner_lr: float | None = None, inner_optimizer: str = "lbfgs", cg_steps: int = 5,
        cg_damping: float = 1.0, learn_lam: bool | str = False, lam_lr: float | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        _check(lam > 0, f"IMAML needs lam > 0 (the proximal strength), got lam={lam!r}")
        _check(
            type(cg_steps) is int and cg_steps >= 1,
            f"cg_steps must be an int >= 1, got cg_steps={cg_steps!r}",
        )
        _check(cg_damping >= 0, f"cg_damping must be >= 0, got cg_damping={cg_damping!r}")
        _check(
            learn_lam in LEARN_LAM,
            f"learn_lam must be one of {LEARN_LAM} (per parameter tensor / per scalar), got {learn_lam!r}",
        )
        _check(
            lam_lr is None or lam_lr > 0, f"lam_lr must be > 0 (or None: the outer lr), got lam_lr={lam_lr!r}"
        )
        super().__init__(
            model,
            lam=lam,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            inner_optimizer=inner_optimizer,
            **kwargs,
        )
        self.cg = CG(cg_steps)
        self.cg_damping = float(cg_damping)
        self.learn_lam = learn_lam or False
        self.lam_lr = None if lam_lr is None else float(lam_lr)
        if learn_lam:
            self.log_lam = LearnedLam(self.meta_parameters(), lam, learn_lam)

    def task_meta_gradients(self, theta, tasks, cast, mode) -> TaskResults:
        return imaml_meta_gradient(
            self.model, theta, tasks, loss_fn=self.loss_fn, lam=self.current_lam(), solver=self.inner_solver,
            cg=self.cg, cg_damping=self.cg_damping, cast=cast, lam_grad=self.log_lam is not None, mode=mode,
        )  # fmt: skip


class FOMAML(MetaLearner):
    """First-order MAML: meta-gradient grad L_q(phi) at the adapted phi (inner Jacobian taken as I).

    phi comes from the inner solver (default "gd", 1 step of lr 0.4, lam 0), with no graph kept, so memory
    is flat in its steps. Other arguments: :class:`MetaLearner`.
    """

    def __init__(
        self, model: nn.Module, lam: float = 0.0, inner_steps: int = 1, inner_lr: float = 0.4, **kwargs: Any
    ) -> None:
        super().__init__(model, lam=lam, inner_steps=inner_steps, inner_lr=inner_lr, **kwargs)

    def task_meta_gradients(self, theta, tasks, cast, mode) -> TaskResults:
        return fomaml_meta_gradient(
            self.model, theta, tasks, loss_fn=self.loss_fn, lam=self.lam, solver=self.inner_solver, cast=cast,
            mode=mode,
        )  # fmt: skip


class MAML(MetaLearner):
    """MAML (Finn et al., 2017), second order: differentiates through the unrolled inner loop.

    phi_{k+1} = phi_k - inner_lr (grad L_s(phi_k) + lam (phi_k - theta)), k < inner_steps, from phi_0 = theta;
    meta-gradient d L_q(phi_K)/d theta with ``create_graph=True`` (memory grows with ``inner_steps``).
    ``lam = 0`` (default) is plain MAML; with lam > 0 and a converging inner loop the meta-gradient tends to
    iMAML's implicit one. The inner loop is plain gradient descent, so another training solver is refused;
    evaluation may use any (``eval_inner_optimizer`` / ``eval_solver``). Other arguments:
    :class:`MetaLearner`.
    """

    first_order = False

    def __init__(
        self, model: nn.Module, lam: float = 0.0, inner_steps: int = 1, inner_lr: float = 0.4, **kwargs: Any
    ) -> None:
        # LightningCLI fills every inherited argument with its default: refuse only a real other solver
        other = (
            kwargs.get("inner_optimizer", "gd") != "gd"
            or bool(kwargs.get("inner_optimizer_kwargs"))
            or kwargs.get("inner_solver") is not None
        )
        _check(
            not other,
            "MAML differentiates through plain GD steps: inner_optimizer="
            f"{kwargs.get('inner_optimizer', kwargs.get('inner_solver'))!r} with options "
            f"{kwargs.get('inner_optimizer_kwargs')} is not possible; use FOMAML or IMAML for another inner "
            "solver (eval_inner_optimizer sets the one used at validation / test)",
        )
        _check(
            type(inner_steps) is int and inner_steps >= 0,
            f"inner_steps must be an int >= 0, got {inner_steps!r}",
        )
        super().__init__(model, lam=lam, inner_steps=inner_steps, inner_lr=inner_lr, **kwargs)
        self.inner_steps, self.inner_lr = inner_steps, float(inner_lr)

    def task_meta_gradients(self, theta, tasks, cast, mode) -> TaskResults:
        return maml_meta_gradient(
            self.model, theta, tasks, loss_fn=self.loss_fn, lam=self.lam, inner_steps=self.inner_steps,
            inner_lr=self.inner_lr, first_order=self.first_order, cast=cast, mode=mode,
        )  # fmt: skip
