"""FLOPs and seconds of one meta-step, for every execution path and method, against this machine's sgemm rate
(issue 21).

One Omniglot 5-way 1-shot meta-batch (paper split, ``--k-query`` query images per class,
``--meta-batch-size`` tasks), the shipped learner settings (``configs/omniglot_5way1shot_*.yaml``),
``meta_gradient(batch)`` timed after a warm-up, all contenders interleaved round-robin in one process
(``--rounds``, the minimum kept), at every thread count of ``--threads``:

* ``imaml_loop``: one task at a time (``batched_tasks=False``), the CPU default before this benchmark;
* ``imaml``: the default path (chunk size chosen by timing on the first batch; recorded);
* ``imaml_chunk<c>``: ``c`` tasks at once (``batched_chunk_size=c``);
* iMAML with ``inner_tol=0.1`` (a task's inner solve stops at 10 % of its gradient norm at theta), MAML with
  1 step of lr 0.4 and with 16 steps of lr 0.1, and iMAML-HF, each looped and by default.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on each method's per-task loop: its count
of a grouped convolution's backward (how the batched path runs T tasks' convolutions) is not the work done, so
every path of a method is credited with its loop's FLOPs ("useful work"). The achieved rate is that count over
the path's time, and its share of the fp32 sgemm rate (2048^3, measured here at the same thread count). Each
path's meta-gradient is compared with its loop's (relative difference, float32). The profile of the default
path by operator (``torch.profiler``, 1 thread) is recorded too. Writes JSON and a plot:

  python benchmarks/flops.py --threads 1,2 --rounds 3                    # benchmarks/results/flops.json/png
  python benchmarks/flops.py --quick --out /tmp/flops.json               # seconds, for the tests
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

IMAML = dict(cls="IMAML", lam=2.0, inner_steps=16, inner_lr=0.1, inner_optimizer="gd_armijo", cg_steps=5)
METHODS = {
    "imaml": IMAML,
    "imaml_tol0.1": dict(IMAML, inner_tol=0.1),
    "maml1": dict(cls="MAML", inner_steps=1, inner_lr=0.4),
    "maml16": dict(cls="MAML", inner_steps=16, inner_lr=0.1),
    "imaml_hf": dict(cls="IMAML", lam=2.0, inner_optimizer="hf", inner_steps=5, hf_cg_steps=3, inner_lr=1.0),
}
# HF with the paper's 5 CG steps per direction (damped), and as it was before the iMAML-HF study: undamped
METHODS["imaml_hf_cg5"] = dict(METHODS["imaml_hf"], hf_cg_steps=5)
METHODS["imaml_hf_newton"] = dict(
    METHODS["imaml_hf_cg5"], inner_optimizer_kwargs={"damping": 0.0, "adapt_damping": False}
)
DEFAULT_METHODS = tuple(METHODS)  # the README's table
# the cheaper HF variants of the study (as in benchmarks/accuracy.py): 3 CG steps per direction (now the
# default, "imaml_hf"), 4 Newton iterations of 5 CG steps
METHODS["imaml_hf_cg3"] = dict(METHODS["imaml_hf_cg5"], hf_cg_steps=3)
METHODS["imaml_hf_steps4"] = dict(METHODS["imaml_hf_cg5"], inner_steps=4)
# iMAML with 8 L-BFGS iterations as the training inner solve (as in benchmarks/accuracy.py)
METHODS["imaml_lbfgs8"] = dict(IMAML, inner_optimizer="lbfgs", inner_steps=8, inner_lr=1.0)
METHODS["imaml_lbfgs4"] = dict(METHODS["imaml_lbfgs8"], inner_steps=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(common.default_out("flops")))
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--k-query", type=int, default=1)
    p.add_argument("--chunks", default="8,16,32", help="fixed chunk sizes timed beside the default")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"of {', '.join(METHODS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for the tests)")
    p.add_argument("--sgemm-n", type=int, default=2048, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.meta_batch_size, a.rounds, a.chunks, a.threads, a.methods = 4, 1, "2", "1", "imaml,maml1"
        a.sgemm_n = 512
    return a


def sgemm_gflops(device, n: int = 2048, reps: int = 5) -> float:
    """fp32 matrix-multiply rate, best of ``reps`` after a warm-up, GFLOP/s."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = min(common.timed(lambda: a @ b, device) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def make(settings: dict, n_way: int, device, **extra):
    import torch

    from lightning_imaml import meta
    from lightning_imaml.models import OmniglotConv4

    s = dict(settings)
    cls = getattr(meta, s.pop("cls"))
    torch.manual_seed(0)
    return cls(model=OmniglotConv4(n_way), **s, **extra).to(device)


def count_flops(module, batch) -> tuple[float, dict[str, float]]:
    """GFLOP of one meta-gradient and its split by operator (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        module.meta_gradient(batch)
    by_op = {str(op): n / 1e9 for op, n in fc.get_flop_counts().get("Global", {}).items()}
    return fc.get_total_flops() / 1e9, by_op


def profile_by_op(module, batch, top: int = 15) -> list[dict]:
    """Self CPU time of the default path's meta-step by operator (torch.profiler, its overhead included)."""
    import logging
    import warnings

    from torch.profiler import ProfilerActivity, profile

    logging.getLogger("torch.profiler").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module.meta_gradient(batch)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in rows[:top]
    ]


def main(argv=None):
    import torch

    a = parse_args(argv)
    device = common.pick_device(a.device)
    common.keep_freed_memory(device)  # as MetaLearner.setup does under a Trainer
    batch, source = common.episodes(a.meta_batch_size, 5, 1, a.k_query, seed=0, device=device)
    methods = a.methods.split(",")
    chunks = [int(c) for c in a.chunks.split(",") if c]

    # contenders: name -> (method, module); every method's loop first
    contenders = {}
    for m in methods:
        contenders[f"{m}_loop"] = (m, make(METHODS[m], 5, device, batched_tasks=False))
        contenders[m] = (m, make(METHODS[m], 5, device))
        if m == "imaml":
            for c in chunks:
                contenders[f"{m}_chunk{c}"] = (
                    m,
                    make(METHODS[m], 5, device, batched_tasks=True, batched_chunk_size=c),
                )
    flops, by_op, agreement, chosen = {}, {}, {}, {}
    torch.set_num_threads(1)
    for m in methods:
        flops[m], by_op[m] = count_flops(contenders[f"{m}_loop"][1], batch)
    runs = []
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        sgemm = sgemm_gflops(device, a.sgemm_n)
        ref = {}
        for name, (m, module) in contenders.items():  # warm-up; the default path chooses its chunk size here
            module.chunk_sizes.clear()
            grad, _ = module.meta_gradient(batch)
            g = common.flat(dict(sorted(grad.items())))
            if name == f"{m}_loop":
                ref[m] = g
            agreement.setdefault(name, {})[threads] = float((g - ref[m]).norm() / ref[m].norm())
            chosen.setdefault(name, {})[threads] = module.chunk_sizes.get("train")
        fns = {
            name: (lambda module=module: module.meta_gradient(batch))
            for name, (_, module) in contenders.items()
        }
        times, failures = common.interleaved(fns, a.rounds, device, report=None)
        if failures:
            raise RuntimeError(f"contenders failed: {failures}")
        rows = {}
        for name, (m, _) in contenders.items():
            best = min(times[name])
            rows[name] = {
                "method": m,
                "s_per_meta_step": best,
                "times": times[name],
                "gflop_counted_on_loop": flops[m],
                "gflops_achieved": flops[m] / best,
                "share_of_sgemm": flops[m] / best / sgemm,
                "vs_loop": best / min(times[f"{m}_loop"]),
                "chunk_size": chosen[name][threads],
                "rel_diff_vs_loop": agreement[name][threads],
            }
        runs.append({"threads": threads, "sgemm_gflops": sgemm, "contenders": rows})
        for name, r in rows.items():
            print(
                f"threads {threads} {name:22s} {r['s_per_meta_step']:.3f} s  {r['vs_loop']:.2f}x loop  "
                f"{r['gflops_achieved']:.1f} GFLOP/s ({100 * r['share_of_sgemm']:.0f} % of {sgemm:.0f})  "
                f"chunk {r['chunk_size']}  diff {r['rel_diff_vs_loop']:.1e}",
                flush=True,
            )
    torch.set_num_threads(1)
    profile = profile_by_op(contenders["imaml"][1], batch) if "imaml" in contenders else []
    result = {
        "benchmark": "flops",
        "created": common.now(),
        "machine": common.machine_info(device),
        "config": {
            "data": source,
            "n_way": 5,
            "k_shot": 1,
            "k_query": a.k_query,
            "meta_batch_size": a.meta_batch_size,
            "rounds": a.rounds,
            "methods": {m: METHODS[m] for m in methods},
            "timing": "min over rounds of meta_gradient(batch), contenders interleaved round-robin",
            "flops": "FlopCounterMode on each method's per-task loop (useful work), credited to every path",
        },
        "gflop_per_meta_step": flops,
        "gflop_by_operator": by_op,
        "runs": runs,
        "profile_default_1_thread": profile,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    common.write_json(a.out, result)
    plot(result, common.png_path(a.out))
    print("wrote", a.out)
    return result


def plot(result, path):
    """Seconds per meta-step of every contender at every thread count, with the share of sgemm."""
    plt = common.pyplot()
    runs = result["runs"]
    names = list(runs[0]["contenders"])
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(names) + 2), 4), dpi=110)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        xs = [j + i * width for j in range(len(names))]
        ys = [run["contenders"][n]["s_per_meta_step"] for n in names]
        bars = ax.bar(
            xs, ys, width, label=f"{run['threads']} thread(s), sgemm {run['sgemm_gflops']:.0f} GFLOP/s"
        )
        for b, n in zip(bars, names, strict=True):
            share = run["contenders"][n]["share_of_sgemm"]
            ax.text(
                b.get_x() + b.get_width() / 2,
                b.get_height(),
                f"{100 * share:.0f}%",
                ha="center",
                va="bottom",
                fontsize=6,
            )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))])
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("seconds per meta-step (label: share of sgemm rate)")
    ax.set_title(
        f"One meta-step, Omniglot 5-way 1-shot, meta-batch {result['config']['meta_batch_size']}", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"{time.time() - t0:.0f} s")
