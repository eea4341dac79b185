"""The benchmark scripts' one harness (issue 25): machine information, episodes, timing (one call, or many
contenders interleaved round-robin), peak memory, results as JSON stamped with the commit they ran on, and the
plotting setup. Every script in ``benchmarks/`` imports it as ``common`` (``sys.path`` holds this folder).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

if str(REPO_ROOT) not in sys.path:  # so that `python benchmarks/x.py` finds the package without install
    sys.path.insert(0, str(REPO_ROOT))


# ----------------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU count, torch version, device and GPU name, recorded with every result."""
    device = torch.device(device)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        affinity = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_avg_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for name in ("torchopt", "learn2learn", "pytorch_lightning"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional packages (learn2learn's C extension may fail to load)
            info[name] = None
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def import_object(path: str) -> Any:
    """``"package.module.Name"`` -> the object."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------- episodes
def random_episodes(
    meta_batch: int, n_way: int, k_shot: int, k_query: int, seed: int = 0, device: torch.device | str = "cpu"
):
    """A batch of random tasks with the shapes of collated Omniglot episodes (an ``Episode``)."""
    from datamodules.episodic import Episode

    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(meta_batch, n_way * k_shot, 1, 28, 28, generator=g)
    qx = torch.rand(meta_batch, n_way * k_query, 1, 28, 28, generator=g)
    sy = torch.arange(n_way).repeat_interleave(k_shot).expand(meta_batch, -1).contiguous()
    qy = torch.arange(n_way).repeat_interleave(k_query).expand(meta_batch, -1).contiguous()
    return Episode(sx.to(device), sy.to(device), qx.to(device), qy.to(device))


def omniglot_episodes(meta_batch: int, n_way: int, k_shot: int, k_query: int, seed: int = 0, device="cpu"):
    """One batch of real Omniglot training episodes, or None when the Omniglot data is not found."""
    from datamodules import OmniglotDataModule
    from lightning_imaml.errors import DataNotFoundError

    dm = OmniglotDataModule(
        n_way=n_way, k_shot=k_shot, k_query=k_query, meta_batch_size=meta_batch, seed=seed, num_workers=0
    )
    try:
        dm.setup("fit")
    except DataNotFoundError:
        return None
    batch = next(iter(dm.train_dataloader()))
    return type(batch)(*(t.to(device) for t in batch))


def episodes(meta_batch, n_way, k_shot, k_query, seed=0, device="cpu", source="auto"):
    """(batch, source) with source in {"omniglot", "random"}; "auto" tries Omniglot first."""
    if source in ("auto", "omniglot"):
        b = omniglot_episodes(meta_batch, n_way, k_shot, k_query, seed, device)
        if b is not None:
            return b, "omniglot"
        if source == "omniglot":
            raise RuntimeError("the Omniglot data is not found (IMAML_OMNIGLOT_ROOT)")
    return random_episodes(meta_batch, n_way, k_shot, k_query, seed, device), "random"


def task(batch, i: int):
    """Task ``i`` of a meta-batch: ``(support_x, support_y, query_x, query_y)`` without the task dimension."""
    sx, sy, qx, qy = batch
    return sx[i], sy[i], qx[i], qy[i]


# ----------------------------------------------------------------------------------------------- numbers
def flat(d) -> torch.Tensor:
    """A dict (in its order) or sequence of tensors as one vector."""
    if isinstance(d, Mapping):
        d = list(d.values())
    return torch.cat([t.reshape(-1) for t in d])


def rel_err_and_cosine(a, b) -> tuple[float, float]:
    """Global relative error ||a-b|| / ||b|| and cosine, over all parameters, in float64."""
    fa, fb = flat(a).double(), flat(b).double()
    rel = float((fa - fb).norm() / fb.norm().clamp_min(1e-300))
    cos = float(fa @ fb / (fa.norm() * fb.norm()).clamp_min(1e-300))
    return rel, cos


def median(xs):
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return math.nan
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# ------------------------------------------------------------------------------------------------ timing
def keep_freed_memory(device: torch.device) -> bool:
    """On CPU, :func:`lightning_imaml.cpu.keep_freed_memory` (as ``MetaLearner.setup`` does under a
    Trainer): glibc then reuses freed MB-sized blocks instead of page-faulting fresh ones. Process-wide, so it
    applies to every contender alike; call it once at the start. Returns whether it applied."""
    from lightning_imaml.cpu import keep_freed_memory as keep

    return torch.device(device).type == "cpu" and keep()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn()`` (the device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    device: torch.device,
    *,
    rotate: bool = True,
    label: str = "round",
    report: Callable[[str], Any] | None = print,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time every callable once per round, round-robin, for ``rounds`` rounds, so that load from other
    processes hits all alike. ``rotate``: the order starts one later every round. A callable that raises is
    dropped from the later rounds. Returns ``(times, failures)``: name -> seconds of each round it ran, and
    name -> ``"ExceptionType: message"``; ``report`` (None: silent) gets one line per call."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    failures: dict[str, str] = {}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if rotate and names else names
        for n in order:
            if n in failures:
                continue
            try:
                dt = timed(fns[n], device)
            except Exception as e:  # noqa: BLE001 - recorded, the other contenders go on
                failures[n] = f"{type(e).__name__}: {e}"
                if report:
                    report(f"{label} {r} {n}: failed\n{traceback.format_exc()}")
                continue
            times[n].append(dt)
            if report:
                report(f"{label} {r} {n}: {dt:.3f} s")
    return times, failures


# --------------------------------------------------------------------------------------------------- I/O
def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def write_json(path: str | Path, obj: dict) -> Path:
    """Write ``obj`` as JSON (atomically), stamped with the commit the process started from (``"git"``).

    Refuses (SystemExit) to overwrite a result that git tracks when the process started from a tree with
    uncommitted changes, so that committed figures always come from committed code; set
    ``IMAML_ALLOW_DIRTY=1`` to write anyway (the JSON then says ``"dirty": true``).
    """
    path = Path(path)
    if START_GIT.get("dirty") and _tracked(path) and not os.environ.get("IMAML_ALLOW_DIRTY"):
        raise SystemExit(
            f"refusing to overwrite the committed result {path} from a tree with uncommitted changes "
            f"(started at {START_GIT.get('commit')}); commit first, write elsewhere with --out, or set "
            "IMAML_ALLOW_DIRTY=1"
        )
    obj = dict(obj)
    obj.setdefault("git", START_GIT)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _tracked(path: Path) -> bool:
    import subprocess

    try:
        r = subprocess.run(
            ["git", "ls-files", "--error-unmatch", str(path.resolve())],
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.device):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def png_path(json_path: str | Path) -> Path:
    """The plot beside a JSON result: the same name with ``.png``."""
    return Path(json_path).with_suffix(".png")


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (scripts write PNG files, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran on and whether the tree had uncommitted changes (tracked files)."""
    import subprocess

    def git(*args):
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


# the code a benchmark process runs is the tree it started from: later commits do not change it
START_GIT = git_state()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ------------------------------------------------------------------------------------------------ memory
def peak_memory_bytes(fn, device: torch.device) -> tuple[int, str]:
    """Peak memory allocated by ``fn()`` above what was allocated before it, and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocation before.
    CPU: the allocator-level peak from ``torch.profiler`` memory events (``profile_memory=True``): the running
    sum of the bytes of every allocation and free made by torch's CPU allocator while ``fn`` runs, maximised
    over time. Byte-exact for tensors; it does not see memory that libraries allocate outside torch's
    allocator (oneDNN scratch buffers, Python objects), and frees of blocks allocated before ``fn`` are not
    subtracted.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before), "torch.cuda.max_memory_allocated"
    import logging
    import warnings

    from torch.profiler import ProfilerActivity, profile

    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    mem = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    mem.sort(key=lambda e: e.start_ns())
    cum = peak = 0
    for e in mem:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cum += e.nbytes()
            peak = max(peak, cum)
    return int(peak), "torch.profiler CPU allocator events (profile_memory=True), running sum maximised"


def rss_peak_mib(fn) -> float | None:
    """Peak resident memory (MiB) above the current one while ``fn()`` runs: VmHWM after a reset
    (``malloc_trim``, then ``/proc/self/clear_refs``) minus VmRSS before; None where Linux's reset is missing.
    Coarser than :func:`peak_memory_bytes` (allocator caching, pages, memory outside torch), but it records
    nothing per allocation, so it works on runs too large to profile."""
    import ctypes

    def kib(field):
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith(field + ":"))

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    base = kib("VmRSS")
    fn()
    return (kib("VmHWM") - base) / 1024


def mib(nbytes: float) -> float:
    return float(nbytes) / 2**20
