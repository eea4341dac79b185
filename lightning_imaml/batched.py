"""A meta-batch in chunks of tasks, and the choice of the chunk size by measurement (pure torch).

The engine computes a chunk of tasks at once (:mod:`lightning_imaml.metagrad`): chunk size 1 is the per-task
loop (``functional_call``, any module), larger chunks batch the tasks' forward (one grouped convolution for T
tasks, see :mod:`lightning_imaml.functional`). Which is fastest depends on the network, the task sizes, the
device and the number of threads, so :class:`ChunkTuner` times the candidates on the first meta-batch and
keeps the fastest; every chunk size gives the same numbers up to float rounding.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .functional import ForwardCast, TaskLoss
from .implicit import RetainedHVP
from .metagrad import TaskResults, Tasks
from .params import ParamSpec, detached

__all__ = [
    "ChunkTuner",
    "cat_results",
    "choose_chunk_size",
    "probe_batching",
    "run_chunked",
    "summarise_tasks",
]


def run_chunked(fn: Callable[[Tasks, str], Any], tasks: Tasks, chunk_size: int) -> Any:
    """``fn(chunk, mode)`` on consecutive chunks of ``chunk_size`` tasks (mode "loop" for chunks of one task,
    "auto" otherwise); the results (tensors, or NamedTuples / tuples / dicts of them, None left as it is)
    concatenated along the task dimension."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    n = tasks[0].shape[0]
    mode = "loop" if chunk_size == 1 else "auto"
    return cat_results(
        [fn(tuple(t[i : i + chunk_size] for t in tasks), mode) for i in range(0, n, chunk_size)]
    )


def cat_results(parts: Sequence[Any]) -> Any:
    """Results of consecutive chunks -> one, concatenated along the task dimension."""
    first = parts[0]
    if len(parts) == 1 or first is None:
        return first
    if isinstance(first, Tensor):
        return torch.cat(list(parts))
    if isinstance(first, Mapping):
        return {k: cat_results([p[k] for p in parts]) for k in first}
    items = [cat_results([p[i] for p in parts]) for i in range(len(first))]
    return type(first)(*items) if hasattr(first, "_fields") else tuple(items)


def summarise_tasks(
    results: TaskResults, spec: ParamSpec, query_y: Tensor, classification: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-task results -> ``(mean meta-gradient as a dict like theta, per-task metrics [T])``:
    ``query_loss``,
    ``support_loss``, ``query_acc`` (classification) and every solver diagnostic."""
    grad = spec.unflatten(results.grad.mean(0))
    metrics = {"query_loss": results.query_loss.float(), "support_loss": results.support_loss.float()}
    if classification:
        metrics["query_acc"] = (results.query_out.argmax(-1) == query_y).float().mean(-1)
    metrics.update({k: v.float() for k, v in results.info.items()})
    return grad, metrics


def probe_batching(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable,
    params: dict[str, Tensor] | None = None,
    cast: ForwardCast | None = None,
) -> tuple[bool, str]:
    """Try a batched forward, gradient and Hessian-vector product once on the first (up to) two tasks of
    ``x [T, n, ...]``; ``(ok, reason)``. Checks the batched losses against one-task ones (1e-4 relative; 4 eps
    of the autocast dtype under ``cast``). Reports what fails (BatchNorm updating running statistics, in-place
    buffer updates, data-dependent control flow under vmap, ...) instead of raising."""
    params = detached(dict(model.named_parameters()) if params is None else params)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats and mod.training:
            return (
                False,
                f"{name or type(mod).__name__}: BatchNorm with running statistics updates them in place",
            )
    spec = ParamSpec.of(params)
    t = min(2, x.shape[0])
    rows = spec.flatten(params).expand(t, spec.numel)
    has_random = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
    # an autocast forward rounds to its low precision: batched and one-task kernels then differ by a few of
    # its eps (measured 1e-4 to 7e-4 relative on a CPU bfloat16 loss), which is not a batching error
    rtol = 1e-4 if cast is None else max(1e-4, 4 * torch.finfo(cast.dtype).eps)
    try:
        with torch.inference_mode(False):
            hvp = RetainedHVP(TaskLoss(model, spec, x[:t], y[:t], loss_fn, cast), rows)
            hvp(hvp.grad)
            with torch.no_grad():
                for i in range(t):
                    ref = TaskLoss(model, spec, x[i : i + 1], y[i : i + 1], loss_fn, cast, "loop")(rows[:1])[
                        0
                    ]
                    if not has_random and not torch.allclose(hvp.value[i], ref, rtol=rtol, atol=1e-6):
                        return False, f"batched loss {hvp.value[i].item()} != one-task loss {ref.item()}"
    except Exception as e:  # noqa: BLE001 - any failure means "use the loop"
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return True, "ok"


@dataclass
class ChunkTuner:
    """Picks the chunk size (tasks computed at once; 1 = the per-task loop) by timing.

    ``choose(fn, tasks)`` runs ``fn`` (a chunk -> TaskResults function, see :func:`run_chunked`) over the
    first ``sample`` tasks with each candidate chunk size: one untimed chunk to warm up, then the timed pass;
    it keeps the one with the least time per task. Candidates above the number of sampled tasks are
    replaced by that number.
    ``times`` records seconds per task of every candidate.
    """

    candidates: tuple[int, ...] = (1, 4, 8, 16, 32)
    sample: int = 16
    times: dict[int, float] = field(default_factory=dict)

    def choose(self, fn: Callable[[Tasks, str], Any], tasks: Tasks) -> int:
        n = tasks[0].shape[0]
        sample = tuple(t[: min(n, max(self.sample, 1))] for t in tasks)
        m = sample[0].shape[0]
        self.times = {}
        for c in sorted({min(c, m) for c in self.candidates}):
            run_chunked(fn, tuple(t[:c] for t in sample), c)  # warm-up: allocator, kernel choices
            start = time.perf_counter()
            run_chunked(fn, sample, c)
            self.times[c] = (time.perf_counter() - start) / m
        return min(self.times, key=self.times.get)


def choose_chunk_size(
    batched_tasks: bool | None,
    chunk_size: int | None,
    fn: Callable[[Tasks, str], Any],
    tasks: Tasks,
    model: nn.Module,
    loss_fn: Callable,
    cast: ForwardCast | None = None,
) -> tuple[int, str]:
    """The learners' rule: ``batched_tasks`` False -> 1 (the loop); otherwise, if :func:`probe_batching`
    accepts the model, ``chunk_size`` when given, else :class:`ChunkTuner`'s choice (among sizes above 1 when
    ``batched_tasks`` is True); a model that cannot batch loops, with a warning when True asked for batching.
    Returns ``(size, why)``."""
    if batched_tasks is False:
        return 1, "batched_tasks=False"
    ok, why = probe_batching(model, tasks[0], tasks[1], loss_fn, dict(model.named_parameters()), cast)
    if not ok:
        if batched_tasks:
            warnings.warn(f"batched_tasks=True: using the per-task loop instead ({why})", stacklevel=3)
        return 1, why
    if chunk_size is not None:
        return chunk_size, "batched_chunk_size"
    tuner = ChunkTuner(candidates=(4, 8, 16, 32) if batched_tasks else (1, 4, 8, 16, 32))
    size = tuner.choose(fn, tasks)
    return size, "timed (s per task): " + ", ".join(f"{c}: {t:.4f}" for c, t in tuner.times.items())
