"""Peak memory of one meta-gradient vs the number of inner steps: IMAML vs MAML vs FOMAML (issue 6).

Setting: the paper's Omniglot Conv4, 5-way 1-shot and 20-way 1-shot, k_query 15 (15 query images per
class), inner steps 1, 5, 10, 25, 50, 100, meta-batch 1 task (``--meta-batch-size``), inner fixed-step GD
lr 0.1, IMAML lam 2 and 5 CG steps, MAML and FOMAML lam 0; random tensors of the Omniglot shapes (memory does
not depend on pixel values). The learners compute their tasks one at a time (``batched_tasks=False``), so no
chunk-size timing or batching probe runs inside the measurement. On CPU the process first calls
``lightning_imaml.cpu.keep_freed_memory()``, as ``IMAML.setup`` does under a Trainer.

Each (method, setting, steps) case runs in its own subprocess (fresh allocator, no state from other cases),
which builds the data, runs one warm-up meta-gradient of a 1-step learner (one-time allocations: kernels,
autograd engine), then builds the measured learner and measures one meta-gradient
(``module.meta_gradient(batch)``, the project's public per-meta-batch method) two ways:

* primary, ``peak_mib``: on CPU the allocator-level peak from ``torch.profiler`` memory events
  (``profile_memory=True``): running sum of the bytes of every allocation and free by torch's CPU allocator
  during the call, maximised over time - byte-exact for tensors and independent of glibc caching, so this is
  the figure the ratios use; on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
* secondary, ``rss_peak_mib`` (CPU only): peak resident set size above a baseline, the baseline being VmRSS
  after imports, model, data and the warm-up (``malloc_trim``, then ``/proc/self/clear_refs`` resets VmHWM),
  the peak VmHWM after the call. Coarser (allocator caching, page granularity, memory outside torch).

Usage:
  python benchmarks/memory.py                 # -> benchmarks/results/memory.json + memory.png
  python benchmarks/memory.py --quick --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

METHODS = ("IMAML", "MAML", "FOMAML")


# ------------------------------------------------------------------------------------------- one case (child)
def learner(method: str, n_way: int, steps: int, a):
    """The learner of one case (its own network, seeded), computing its tasks one at a time."""
    import torch

    from lightning_imaml import meta
    from lightning_imaml.models import OmniglotConv4

    torch.manual_seed(a.seed)
    kw = dict(inner_steps=steps, inner_lr=a.inner_lr, batched_tasks=False)
    if method == "IMAML":
        kw.update(lam=a.lam, cg_steps=a.cg_steps, inner_optimizer="gd")
    return getattr(meta, method)(model=OmniglotConv4(n_way), **kw).to(common.pick_device(a.device))


def run_case(method: str, n_way: int, steps: int, a) -> dict:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    device = common.pick_device(a.device)
    common.keep_freed_memory(device)
    batch = common.random_episodes(a.meta_batch_size, n_way, a.k_shot, a.k_query, a.seed, device)
    learner(method, n_way, 1, a).meta_gradient(batch)  # warm-up: the process's one-time allocations
    module = learner(method, n_way, steps, a)

    out = {"method": method, "n_way": n_way, "inner_steps": steps}
    if device.type == "cpu":
        out["rss_peak_mib"] = common.rss_peak_mib(lambda: module.meta_gradient(batch))
    nbytes, how = common.peak_memory_bytes(lambda: module.meta_gradient(batch), device)
    out["peak_mib"] = common.mib(nbytes)
    out["peak_mib_per_task"] = common.mib(nbytes) / a.meta_batch_size
    out["method_of_measurement"] = how
    return out


# ---------------------------------------------------------------------------------------------------- parent
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for the tests)")
    p.add_argument("--out", default=str(common.default_out("memory")))
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--n-ways", default="5,20", help="comma-separated settings (1-shot each)")
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--k-query", type=int, default=15)
    p.add_argument("--steps", default="1,5,10,25,50,100")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--meta-batch-size", type=int, default=1, help="tasks, computed one at a time")
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=2.0)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each case (0: leave)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the cases in this process instead of one subprocess each (less isolated; --quick)",
    )
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: METHOD:N_WAY:STEPS
    a = p.parse_args(argv)
    if a.quick:
        a.n_ways, a.steps, a.k_query, a.cg_steps = "5", "1,3", 2, 2
        a.in_process = True
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.case:
        method, n_way, steps = a.case.split(":")
        print("CASE_RESULT " + json.dumps(run_case(method, int(n_way), int(steps), a)), flush=True)
        return None

    import torch

    device = common.pick_device(a.device)
    n_ways = [int(x) for x in a.n_ways.split(",")]
    steps = [int(x) for x in a.steps.split(",")]
    methods = a.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    kept = common.keep_freed_memory(device)  # recorded; every case (subprocess or not) calls it
    t0 = time.time()
    cases, failures = [], []
    forward = [x for x in (argv if argv is not None else sys.argv[1:]) if not x.startswith("--case")]
    for n_way in n_ways:
        for s in steps:
            for m in methods:
                if a.in_process:
                    try:
                        res = run_case(m, n_way, s, a)
                    except Exception as e:  # noqa: BLE001
                        failures.append(
                            {"case": f"{m}:{n_way}:{s}", "stderr_tail": f"{type(e).__name__}: {e}"}
                        )
                        continue
                    cases.append(res)
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), *forward, "--case", f"{m}:{n_way}:{s}"]
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = [ln for ln in r.stdout.splitlines() if ln.startswith("CASE_RESULT ")]
                if r.returncode != 0 or not line:
                    failures.append({"case": f"{m}:{n_way}:{s}", "stderr_tail": r.stderr[-2000:]})
                    print(f"FAILED {m} {n_way}-way {s} steps:\n{r.stderr[-2000:]}", flush=True)
                    continue
                res = json.loads(line[0][len("CASE_RESULT ") :])
                cases.append(res)
                print(
                    f"{m:7s} {n_way:2d}-way {s:3d} steps: peak {res['peak_mib']:8.2f} MiB "
                    f"(rss {res.get('rss_peak_mib')})",
                    flush=True,
                )

    ratios = {}
    for n_way in n_ways:
        for m in methods:
            by = {c["inner_steps"]: c["peak_mib"] for c in cases if c["method"] == m and c["n_way"] == n_way}
            if by and min(steps) in by and max(steps) in by and by[min(steps)] > 0:
                ratios[f"{m}_{n_way}way"] = by[max(steps)] / by[min(steps)]
    result = {
        "benchmark": "memory",
        "created": common.now(),
        "machine": common.machine_info(device),
        "config": {
            "n_ways": n_ways,
            "k_shot": a.k_shot,
            "k_query": a.k_query,
            "inner_steps": steps,
            "methods": methods,
            "meta_batch_size": a.meta_batch_size,
            "batched_tasks": False,
            "inner_lr": a.inner_lr,
            "inner_optimizer": "gd",
            "lam_imaml": a.lam,
            "lam_maml_fomaml": 0.0,
            "cg_steps": a.cg_steps,
            "threads": a.threads or torch.get_num_threads(),
            "data": "random tensors of Omniglot shape",
            "model": "lightning_imaml.models.OmniglotConv4",
            "keep_freed_memory": kept,
            "quick": a.quick,
            "seed": a.seed,
        },
        "measurement": {
            "primary": "peak_mib: "
            + (
                "torch.cuda.max_memory_allocated"
                if device.type == "cuda"
                else "torch.profiler CPU allocator events (profile_memory=True), running sum maximised over "
                "the call"
            ),
            "secondary": "rss_peak_mib: VmHWM after the call minus VmRSS before it (clear_refs reset), "
            "CPU only",
            "isolation": (
                "all cases in one process (--in-process)"
                if a.in_process
                else "each case in its own subprocess"
            )
            + ", after a 1-step warm-up meta-gradient",
        },
        "cases": cases,
        "ratio_max_over_min_steps": ratios,
        "ratio_steps": [min(steps), max(steps)],
        "goal_imaml_ratio_max": 1.10,
        "failures": failures,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "wall_s": time.time() - t0,
    }
    out = common.write_json(a.out, result)
    plot(result, common.png_path(out))
    print(f"wrote {out}; ratios {ratios}", flush=True)
    return result


def plot(result, path):
    plt = common.pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter

    cfg = result["config"]
    n_ways = cfg["n_ways"]
    fig, axes = plt.subplots(1, len(n_ways), figsize=(5.2 * len(n_ways), 4), dpi=120, squeeze=False)
    styles = {
        "IMAML": ("tab:red", "o"),
        "MAML": ("tab:blue", "s"),
        "FOMAML": ("tab:green", "^"),
    }
    m = result["machine"]
    dev = m["gpu_name"] or f"CPU, {cfg['threads']} thread(s)"
    for ax, n_way in zip(axes[0], n_ways, strict=False):
        for meth in cfg["methods"]:
            pts = sorted(
                (c["inner_steps"], c["peak_mib"])
                for c in result["cases"]
                if c["method"] == meth and c["n_way"] == n_way
            )
            if not pts:
                continue
            color, marker = styles.get(meth, (None, "."))
            r = result["ratio_max_over_min_steps"].get(f"{meth}_{n_way}way")
            label = f"{meth} ({r:.2f}x at {cfg['inner_steps'][-1]} vs {cfg['inner_steps'][0]})" if r else meth
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(cfg["inner_steps"])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("inner steps")
        ax.set_ylabel("peak memory of one meta-gradient (MiB)")
        ax.set_title(
            f"Omniglot Conv4, {n_way}-way {cfg['k_shot']}-shot, "
            f"{cfg['k_query']} query/class, {cfg['meta_batch_size']} task(s)\n({dev})",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
