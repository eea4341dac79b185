"""The proximal strength lam meta-learned per parameter tensor or per scalar (IMAML(learn_lam=...)).

Stored as log-values, so lam stays positive under any outer optimiser; the gradient of the meta-loss with
respect to lam comes from the same CG solve as the meta-gradient (see
:func:`lightning_imaml.implicit.implicit_solve`), dF/dlog lam = lam dF/dlam.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .params import ParamSpec

__all__ = ["LEARN_LAM", "LearnedLam"]

LEARN_LAM = (False, "layer", "parameter")


def _key(name: str) -> str:
    """A parameter name as a ParameterDict key (no dots allowed there)."""
    return name.replace(".", "__")


class LearnedLam(nn.ParameterDict):
    """log lam per parameter tensor (``mode="layer"``: 0-d) or per scalar (``"parameter"``: the parameter's
    shape), started at log(``lam``); keys are the parameter names with dots as ``__``."""

    def __init__(self, params: Mapping[str, Tensor], lam: float, mode: str):
        if mode not in LEARN_LAM[1:]:
            raise ValueError(
                f"learn_lam must be one of {LEARN_LAM} (per parameter tensor / per scalar), got {mode!r}"
            )
        if not lam > 0:
            raise ValueError(f"learn_lam needs an initial lam > 0, got lam={lam!r}")
        shape = {"layer": lambda p: (), "parameter": lambda p: p.shape}[mode]
        super().__init__(
            {
                _key(n): nn.Parameter(torch.full(shape(p), math.log(lam), dtype=p.dtype, device=p.device))
                for n, p in params.items()
            }
        )
        self.names = tuple(params)
        self.mode = mode

    def param_group(self, lr: float | None) -> dict:
        """The outer optimiser's parameter group of the log-values, with its own ``lr`` when given."""
        return {"params": list(self.values())} if lr is None else {"params": list(self.values()), "lr": lr}

    def values_by_name(self) -> dict[str, Tensor]:
        """lam = exp(log lam) per parameter name, detached."""
        return {n: self[_key(n)].detach().exp() for n in self.names}

    def log_gradients(self, lam_grad: Tensor, spec: ParamSpec) -> dict[str, Tensor]:
        """dF/dlog lam per key from dF/dlam per scalar entry (``[P]``, the mean over tasks)."""
        per_entry = spec.unflatten(lam_grad)
        out = {}
        for n in self.names:
            log_lam = self[_key(n)]
            g = per_entry[n].sum() if log_lam.dim() == 0 else per_entry[n]
            out[_key(n)] = log_lam.detach().exp() * g
        return out
