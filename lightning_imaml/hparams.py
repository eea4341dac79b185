"""Hyperparameters of the learners: factories and solvers as ``{"class_path", "init_args"}`` configs (the
LightningCLI format), so that checkpoints hold only primitives and load under
``torch.load(weights_only=True)``, and the flat inner-solver arguments of the configs (``inner_optimizer``,
``inner_steps``, ...) as solver objects.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from .inner import SOLVERS, InnerSolver, make_solver

__all__ = [
    "callable_to_config",
    "config_to_callable",
    "save_hparams",
    "solver_from_config",
    "solver_to_config",
    "solvers",
]

_PRIMITIVES = (bool, int, float, str, type(None), tuple, list)


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


def _import(path: str, name: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{name}: cannot import class_path {path!r}") from err


def config_to_callable(factory: Any, name: str) -> Any:
    """Inverse of :func:`callable_to_config`: a ``{"class_path", "init_args"}`` mapping becomes
    ``functools.partial(cls, **init_args)``; callables pass through."""
    if factory is None or callable(factory):
        return factory
    if isinstance(factory, Mapping) and isinstance(factory.get("class_path"), str):
        return functools.partial(_import(factory["class_path"], name), **dict(factory.get("init_args") or {}))
    raise ValueError(f"{name} must be a callable or a {{'class_path', 'init_args'}} mapping, got {factory!r}")


def solver_to_config(solver: InnerSolver | None) -> dict | None:
    """``GDArmijo(steps=8)`` -> ``{"class_path": "lightning_imaml.inner.GDArmijo", "init_args": {...}}``."""
    if solver is None:
        return None
    args = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)}
    args = {k: f"{v.__module__}.{v.__qualname__}" if isinstance(v, type) else v for k, v in args.items()}
    args = {k: dict(v) if isinstance(v, Mapping) else v for k, v in args.items()}
    return {"class_path": f"{type(solver).__module__}.{type(solver).__qualname__}", "init_args": args}


def solver_from_config(solver: Any, name: str) -> InnerSolver | None:
    """A solver object, or one built from a ``{"class_path", "init_args"}`` mapping or a registered name."""
    if solver is None or isinstance(solver, InnerSolver):
        return solver
    if isinstance(solver, str):
        return make_solver(solver)
    if isinstance(solver, Mapping) and isinstance(solver.get("class_path"), str):
        cls = _import(solver["class_path"], name)
        if not (isinstance(cls, type) and issubclass(cls, InnerSolver)):
            raise ValueError(f"{name}: {solver['class_path']!r} is not an InnerSolver")
        return cls(**dict(solver.get("init_args") or {}))
    raise ValueError(f"{name} must be an InnerSolver, a solver name or a class_path mapping, got {solver!r}")


TASK_TYPES = ("classification", "regression")


def check_learner_args(model, lam: float, eval_lam: float | None, task_type: str, batched_chunk_size) -> None:
    """The learners' own arguments (the solvers check theirs), each error naming the value."""
    from torch import nn

    checks = [
        (isinstance(model, nn.Module), f"model must be an nn.Module, got {type(model).__name__}"),
        (lam >= 0, f"lam must be >= 0, got lam={lam!r}"),
        (eval_lam is None or eval_lam >= 0, f"eval_lam must be >= 0, got eval_lam={eval_lam!r}"),
        (task_type in TASK_TYPES, f"task_type must be one of {TASK_TYPES}, got {task_type!r}"),
        (
            batched_chunk_size is None or (type(batched_chunk_size) is int and batched_chunk_size >= 1),
            f"batched_chunk_size must be None or an int >= 1, got {batched_chunk_size!r}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def solvers(
    inner_solver: Any,
    eval_solver: Any,
    *,
    inner_optimizer: str,
    inner_steps: int | None,
    inner_lr: float | None,
    inner_optimizer_kwargs: Mapping[str, Any] | None,
    hf_cg_steps: int | None,
    inner_tol: float,
    inner_atol: float,
    eval_inner_optimizer: str | None,
    eval_inner_steps: int | None,
    eval_inner_lr: float | None,
    eval_inner_optimizer_kwargs: Mapping[str, Any] | None,
) -> tuple[InnerSolver, InnerSolver]:
    """The training and evaluation solvers. A solver object (or config) wins; otherwise the flat arguments
    build it: ``make_solver(inner_optimizer, steps=inner_steps, lr=inner_lr, tol=inner_tol, atol=inner_atol,
    **inner_optimizer_kwargs)`` (``hf_cg_steps`` -> ``cg_steps`` of "hf"; a None: the solver's default).
    The evaluation solver takes the training one's settings where its ``eval_*`` argument is None, except the
    early-stopping tolerances (an evaluation solve runs all its steps) and the options, which it keeps only
    with the same solver (SGD's momentum means nothing to "gd")."""
    for name, value in (("inner_optimizer", inner_optimizer), ("eval_inner_optimizer", eval_inner_optimizer)):
        if value is not None and value not in SOLVERS:
            raise ValueError(f"{name} must be one of {tuple(SOLVERS)}, got {name}={value!r}")
    train = solver_from_config(inner_solver, "inner_solver")
    if train is None:
        options = dict(inner_optimizer_kwargs or {})
        if inner_optimizer == "hf" and hf_cg_steps is not None:
            options.setdefault("cg_steps", hf_cg_steps)
        options.update({k: v for k, v in (("steps", inner_steps), ("lr", inner_lr)) if v is not None})
        train = make_solver(inner_optimizer, tol=inner_tol, atol=inner_atol, **options)
    evaluation = solver_from_config(eval_solver, "eval_solver")
    if evaluation is None:
        same = eval_inner_optimizer is None or eval_inner_optimizer == train.name
        if same and eval_inner_optimizer_kwargs is None:
            base = dataclasses.replace(train, tol=0.0, atol=0.0)
            changes = {"steps": eval_inner_steps, "lr": eval_inner_lr}
            evaluation = dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})
        else:
            options = dict(eval_inner_optimizer_kwargs or {})
            name = eval_inner_optimizer or train.name
            if name == "hf" and hf_cg_steps is not None:
                options.setdefault("cg_steps", hf_cg_steps)
            options["steps"] = train.steps if eval_inner_steps is None else eval_inner_steps
            options["lr"] = train.lr if eval_inner_lr is None else eval_inner_lr
            evaluation = make_solver(name, **options)
    return train, evaluation


def save_hparams(module, frame, base: type) -> None:
    """``module.save_hyperparameters`` from its ``__init__`` ``frame``: the network only as a LightningCLI
    ``class_path`` config (then ``load_from_checkpoint(path)`` rebuilds it; else pass ``model=``), only the
    arguments of ``module``'s classes down to ``base`` (MAML has no cg_steps), and factories and solvers as
    configs: checkpoints then hold primitives and load under ``torch.load(weights_only=True)``."""
    from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters

    given = _given_hyperparameters.get()
    module.save_hyperparameters(
        ignore=[] if isinstance((given or {}).get("model"), Mapping) else ["model"], frame=frame
    )
    own = {
        name
        for cls in type(module).__mro__
        if "__init__" in vars(cls) and issubclass(cls, base)
        for name, par in inspect.signature(cls.__init__).parameters.items()
        if par.kind is not inspect.Parameter.VAR_KEYWORD
    }
    hp, initial = module.hparams, getattr(module, "_hparams_initial", {})
    for key in list(hp):
        if key not in own and key not in ("_class_path", "_instantiator"):  # the CLI's, for reloading
            hp.pop(key)
            initial.pop(key, None)
        elif key in ("optimizer", "lr_scheduler") and hp[key] is not None:
            hp[key] = initial[key] = (
                dict(hp[key]) if isinstance(hp[key], Mapping) else callable_to_config(hp[key])
            )
        elif key in ("inner_solver", "eval_solver") and hp[key] is not None:
            hp[key] = initial[key] = solver_to_config(getattr(module, key))
