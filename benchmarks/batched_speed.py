"""Batched (vmap) vs per-task loop: time per meta-step and peak memory, for every inner solver (issue 14).

The same ``IMAML`` module runs one meta-gradient of an Omniglot-shaped meta-batch (Conv4, 5-way 1-shot,
meta-batch 32, lam 2, 5 CG steps; random images: the work does not depend on the pixels) either task by
task (``batched_tasks=False``) or with its per-task meta-gradient under ``torch.func.vmap``
(``batched_tasks=True``, ``batched_chunk_size`` tasks per vmap call). Two settings: the speed benchmark's
(15 query images per class) and the accuracy benchmark's (1 query image per class). Every contender of a
setting is timed interleaved in one process (round robin, ``--reps`` rounds, median), so load from other
processes hits all alike; the ratio batched / looped is the figure to quote. Peak memory: the peak resident
set size during one meta-gradient above the resident size before it (VmHWM after a reset), also per task.
(Not ``torch.profiler``'s allocation events as memory.py for one task: a run recording them for vmapped
meta-batches of 32 was killed for memory at 22.7 GB resident.) ``--profile`` adds the top operators by self
CPU time for the looped and the batched gd_armijo step.

    python benchmarks/batched_speed.py --reps 3            # -> benchmarks/results/batched_speed.json + .png
    python benchmarks/batched_speed.py --quick --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SOLVERS = {  # inner steps and largest / fixed step per solver
    "gd_armijo": (16, 0.1),
    "gd": (16, 0.1),
    "sgd": (16, 0.1),
    "adam": (16, 0.01),
    "lbfgs": (8, 1.0),
    "hf": (5, 1.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(common.default_out("batched_speed")))
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--k-query", default="15,1", help="query images per class, one setting each")
    p.add_argument("--chunks", default="0,8", help="batched chunk sizes to time (0 = whole meta-batch)")
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.meta_batch_size, a.reps, a.solvers, a.k_query, a.chunks = 2, 1, "gd_armijo,hf", "1", "0,1"
    return a


def _module(solver, batched, chunk, quick):
    import torch

    from lightning_imaml import IMAML
    from lightning_imaml.models import OmniglotConv4

    steps, lr = SOLVERS[solver]
    torch.manual_seed(0)
    return IMAML(
        OmniglotConv4(5, hidden=8 if quick else 64),
        lam=2.0,
        cg_steps=2 if quick else 5,
        inner_steps=2 if quick else steps,
        inner_lr=lr,
        inner_optimizer=solver,
        batched_tasks=batched,
        batched_chunk_size=chunk or None,
    )


def measure(a, k_query, solvers, chunks, partial=lambda rows: None):
    import torch

    batch = common.random_episodes(a.meta_batch_size, 5, 1, k_query, 0, torch.device("cpu"))
    contenders = {}
    for s in solvers:
        contenders[f"{s}/loop"] = _module(s, False, None, a.quick)
        for c in chunks:
            contenders[f"{s}/vmap{c or ''}"] = _module(s, True, c, a.quick)
    for m in contenders.values():  # warm-up (and the batching probe) on two tasks
        m.meta_gradient(tuple(t[:2] for t in batch))
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(a.reps):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            contenders[k].meta_gradient(batch)
            times[k].append(time.perf_counter() - t0)
    rows = {
        k: {
            "median_s": common.median(times[k]),
            "times_s": times[k],
            "batched": bool(getattr(m, "_batching_ok", False)),
        }
        for k, m in contenders.items()
    }
    partial(rows)  # the timings are kept even if a memory measurement fails
    for k, m in contenders.items():
        peak = common.rss_peak_mib(lambda m=m: m.meta_gradient(batch))
        rows[k].update(peak_mib=peak, peak_mib_per_task=None if peak is None else peak / a.meta_batch_size)
    for k, row in rows.items():
        loop = rows[k.split("/")[0] + "/loop"]
        row["time_over_loop"] = row["median_s"] / loop["median_s"]
        row["memory_over_loop"] = (
            row["peak_mib"] / loop["peak_mib"] if row["peak_mib"] and loop["peak_mib"] else None
        )
    return rows


def profile(a, k_query):
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    batch = common.random_episodes(a.meta_batch_size, 5, 1, k_query, 0, torch.device("cpu"))
    out = {}
    for name, batched in (("loop", False), ("vmap", True)):
        m = _module("gd_armijo", batched, None, a.quick)
        m.meta_gradient(tuple(t[:2] for t in batch))
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            m.meta_gradient(batch)
        ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        out[name] = {
            "total_self_cpu_s": total / 1e6,
            "top_ops": [
                {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ev
            ],
        }
    return out


def main(argv=None):
    a = parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    solvers = a.solvers.split(",")
    chunks = [int(c) for c in a.chunks.split(",")]
    result = {
        "benchmark": "batched_speed",
        "created": common.now(),
        "machine": common.machine_info("cpu"),
        "git": common.git_state(),
        "config": {
            "meta_batch_size": a.meta_batch_size,
            "reps": a.reps,
            "solvers": {s: SOLVERS[s] for s in solvers},
            "chunks": chunks,
            "quick": a.quick,
            "threads": torch.get_num_threads(),
        },
        "settings": {},
    }
    for kq in (int(k) for k in a.k_query.split(",")):

        def partial(rows, kq=kq):
            result["settings"][f"k_query={kq}"] = rows
            common.write_json(a.out, result)

        rows = measure(a, kq, solvers, chunks, partial)
        result["settings"][f"k_query={kq}"] = rows
        for k, r in rows.items():
            mem = (
                "n/a"
                if r["peak_mib"] is None
                else f"{r['peak_mib']:.0f} MiB ({r['peak_mib_per_task']:.1f}/task)"
            )
            print(f"k_query {kq:2d} {k:18s} {r['median_s']:7.2f} s  x{r['time_over_loop']:.2f}  peak {mem}")
        common.write_json(a.out, result)  # keep what is done
    if a.profile:
        result["profile_k_query_1"] = profile(a, 1)
    common.write_json(a.out, result)
    plot(result, common.png_path(a.out))
    return result


def plot(result, path):
    plt = common.pyplot()
    settings = result["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), dpi=120, squeeze=False)
    for ax, (name, rows) in zip(axes[0], settings.items(), strict=True):
        keys = list(rows)
        ax.barh(range(len(keys)), [rows[k]["time_over_loop"] for k in keys], color="tab:blue")
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.axvline(0.6, color="tab:red", lw=0.8, ls="--")
        ax.set_xlabel("time per meta-step / per-task loop (same solver)")
        ax.set_title(name, fontsize=9)
    dev = result["machine"]["gpu_name"] or f"CPU, {result['config']['threads']} thread(s)"
    fig.suptitle(
        f"batched (vmap) vs loop, meta-batch {result['config']['meta_batch_size']} ({dev})", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
