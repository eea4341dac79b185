"""A warning when a learner's inner solves keep failing: the implicit meta-gradient is then taken at a
non-stationary point and meta-training drifts (README, "Inner-solve stability")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

__all__ = ["SolveWatchdog"]


@dataclass
class SolveWatchdog:
    """A meta-step's inner solves "fail" when most of its tasks' proximal objective rose or their residual
    ended above the gradient norm they started from; :meth:`update` returns a message (once) after
    ``patience`` failing meta-steps in a row, else None."""

    patience: int = 20
    failures: int = 0

    def update(self, metrics: Mapping[str, Tensor], solver_name: str) -> str | None:
        if "inner_rose" not in metrics:
            return None
        failed = (metrics["inner_rose"] > 0) | (metrics["inner_residual_rel"] > 1)
        self.failures = self.failures + 1 if float(failed.float().mean()) > 0.5 else 0
        if self.failures != self.patience:
            return None
        rose = float(metrics["inner_rose"].float().mean())
        rel = float(metrics["inner_residual_rel"].max())
        return (
            f"inner solves keep failing: for {self.patience} meta-steps in a row most tasks' proximal "
            f"objective rose during {solver_name!r} (train/inner_rose {rose:.2f}) or ended with a larger "
            f"gradient than it started with (train/inner_residual_rel max {rel:.2f}). The implicit "
            "meta-gradient is then taken at a non-stationary point. Use inner_optimizer='gd_armijo' "
            "(safeguarded step), a smaller inner_lr, or a larger lam."
        )
