"""Sinusoid regression (MAML, Finn et al. 2017): y = A sin(x - phi).

A ~ U[0.1, 5], phi ~ U[0, pi], x ~ U[-5, 5].

Needs no files; it is the default data of ``train.py``.
"""

from __future__ import annotations

import math

import torch

from datamodules.episodic import Episode, EpisodicDataModule


class SinusoidTaskSampler:
    """K-shot (support) + Q (query) points of random sinusoids: Episode of float32 [B, K, 1] / [B, Q, 1]."""

    def __init__(
        self,
        k_shot: int,
        k_query: int,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ) -> None:
        self.k_shot, self.k_query = k_shot, k_query
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def sample(self, generator: torch.Generator, batch_size: int) -> Episode:
        return self.sample_with_functions(generator, batch_size)[0]

    def sample_with_functions(self, generator: torch.Generator, batch_size: int):
        """``(episode, amplitude [B], phase [B])``: the tasks of :meth:`sample` and their true curves."""

        def uniform(lo_hi: tuple[float, float], *shape: int) -> torch.Tensor:
            lo, hi = lo_hi
            return torch.rand(*shape, generator=generator) * (hi - lo) + lo

        b, k, q = batch_size, self.k_shot, self.k_query
        amp, phase = uniform(self.amplitude, b, 1, 1), uniform(self.phase, b, 1, 1)
        x = uniform(self.x_range, b, k + q, 1)
        y = amp * torch.sin(x - phase)
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:]), amp.flatten(), phase.flatten()


class SinusoidDataModule(EpisodicDataModule):
    """Episodic sinusoid regression; ``task_type = "regression"``, ``n_way = None``.

    Args:
        k_shot: support points per task (K).
        k_query: query points per task (Q).
        meta_batch_size: tasks per training batch (25 as MAML).
        amplitude_min, amplitude_max, phase_min, phase_max, x_min, x_max: task distribution.
        Remaining arguments: see :class:`EpisodicDataModule`.
    """

    task_type = "regression"

    def __init__(
        self,
        k_shot: int = 10,
        k_query: int = 10,
        meta_batch_size: int = 25,
        num_workers: int = 0,
        seed: int = 0,
        val_tasks: int = 600,
        test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        amplitude_min: float = 0.1,
        amplitude_max: float = 5.0,
        phase_min: float = 0.0,
        phase_max: float = math.pi,
        x_min: float = -5.0,
        x_max: float = 5.0,
    ) -> None:
        super().__init__(
            None,
            k_shot,
            k_query,
            meta_batch_size,
            num_workers,
            seed,
            val_tasks,
            test_tasks,
            eval_meta_batch_size,
        )
        for name, lo, hi in (
            ("amplitude", amplitude_min, amplitude_max),
            ("phase", phase_min, phase_max),
            ("x", x_min, x_max),
        ):
            if not lo <= hi:
                raise ValueError(f"{name}_min must be <= {name}_max, got {lo} > {hi}")
        self.amplitude = (amplitude_min, amplitude_max)
        self.phase = (phase_min, phase_max)
        self.x_range = (x_min, x_max)

    @property
    def input_shape(self) -> tuple[int]:
        return (1,)

    def build_sampler(self, split: str) -> SinusoidTaskSampler:
        return SinusoidTaskSampler(self.k_shot, self.k_query, self.amplitude, self.phase, self.x_range)
