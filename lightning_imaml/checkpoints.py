"""Checks of a checkpoint file before Lightning restores it, so that a wrong path, a file that is not a
checkpoint, or a checkpoint of another learner or network ends in one message naming the file and the fix."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, CheckpointNotFoundError

__all__ = ["check_compatible", "read_checkpoint"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a Lightning checkpoint file (on the CPU). Raises
    :class:`~lightning_imaml.errors.CheckpointNotFoundError` for a missing path and
    :class:`~lightning_imaml.errors.CheckpointError` for a file torch cannot load or that holds no
    ``state_dict``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint {str(path)!r} does not exist; pass the path of a .ckpt file written by fit "
            "(lightning_logs/<experiment>/version_N/checkpoints/)"
        )
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a checkpoint of an older version holding Python objects: Lightning's way
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - whatever the reason, it is not a checkpoint
            raise CheckpointError(_not_a_checkpoint(path, err)) from err
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(_not_a_checkpoint(path, err)) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint (it holds no 'state_dict'); pass a .ckpt file "
            "written by fit"
        )
    return ckpt


def _not_a_checkpoint(path, err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    reason = f"{type(err).__name__}: {lines[0][:100]}" if lines else type(err).__name__
    return f"{str(path)!r} is not a checkpoint torch can read ({reason}); pass a .ckpt file written by fit"


def check_compatible(ckpt: dict[str, Any], module: nn.Module, path: str | Path) -> None:
    """Raise :class:`~lightning_imaml.errors.CheckpointError` unless ``ckpt`` was written by a module of
    ``module``'s class with a network of the same parameter names and shapes."""
    saved_class = (ckpt.get("hyper_parameters") or {}).get("_class_path")
    own = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(saved_class, str) and saved_class.rpartition(".")[2] != type(module).__qualname__:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {saved_class} but the model is {own}; use the config (or "
            "--model) the checkpoint was trained with"
        )
    saved, mine = ckpt["state_dict"], module.state_dict()
    missing, unexpected = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit the model {own}: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}; use the config (or --model.*) the checkpoint was trained with"
        )
    for key, value in mine.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {key} has shape {tuple(saved[key].shape)} but the model's has "
                f"{tuple(value.shape)} (another n_way or network?); use the config the checkpoint was "
                "trained with"
            )
