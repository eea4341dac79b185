"""Batched (vmap) vs looped iMAML meta-gradient: time per meta-gradient and peak memory (issue 7).

Omniglot Conv4, 5-way 1-shot, 15 query/class, meta-batch 32, 16 inner GD steps (lr 0.1), 5 CG steps, lam 2,
float32, random images (the work per step does not depend on the pixels; CG steps are reported).
Contenders are timed interleaved in ONE process (round robin, median of ``--reps``) so that load from other
users cancels. Peak memory: each contender in a fresh subprocess, peak RSS (VmHWM, reset after setup) during
the first meta-gradient minus the RSS before it.

    .venv/bin/python benchmarks/batched_speed.py --reps 5 [--contenders looped,batched,batched_jvp,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lightning_imaml.batched import batched_implicit_meta_gradient  # noqa: E402
from lightning_imaml.implicit import implicit_meta_gradient  # noqa: E402
from lightning_imaml.models import OmniglotConv4  # noqa: E402

CFG = dict(n_way=5, k_shot=1, k_query=15, meta_batch=32, inner_steps=16, inner_lr=0.1, cg_steps=5, lam=2.0)


def make_batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, n, k, q = cfg["meta_batch"], cfg["n_way"], cfg["k_shot"], cfg["k_query"]
    sx = torch.rand(T, n * k, 1, 28, 28, generator=g)
    qx = torch.rand(T, n * q, 1, 28, 28, generator=g)
    return (
        sx,
        torch.arange(n).repeat_interleave(k).repeat(T, 1),
        qx,
        torch.arange(n).repeat_interleave(q).repeat(T, 1),
    )


def looped(model, theta, batch, cfg):
    """The per-task path meta.py uses without batching: metagrad.imaml_task_meta_gradient when inner.py
    exists, otherwise the same computation written out (GD inner loop + implicit_meta_gradient)."""
    sx, sy, qx, qy = batch
    try:
        from lightning_imaml.metagrad import imaml_task_meta_gradient
    except ImportError:
        imaml_task_meta_gradient = None
    grads, steps = [], []
    for t in range(sx.shape[0]):
        if imaml_task_meta_gradient is not None:
            r = imaml_task_meta_gradient(
                model,
                theta,
                (sx[t], sy[t], qx[t], qy[t]),
                loss_fn=F.cross_entropy,
                lam=cfg["lam"],
                inner_steps=cfg["inner_steps"],
                inner_lr=cfg["inner_lr"],
                cg_steps=cfg["cg_steps"],
            )
            grads.append(r.grad)
            steps.append(r.info["cg_steps"])
            continue

        def support_loss(p, t=t):
            return F.cross_entropy(functional_call(model, p, (sx[t],)), sy[t])

        phi = {k: v.detach().clone() for k, v in theta.items()}
        for _ in range(cfg["inner_steps"]):
            p = {k: v.requires_grad_(True) for k, v in phi.items()}
            g = dict(zip(p, torch.autograd.grad(support_loss(p), list(p.values())), strict=False))
            phi = {k: (p[k] - cfg["inner_lr"] * (g[k] + cfg["lam"] * (p[k] - theta[k]))).detach() for k in p}
        p = {k: v.requires_grad_(True) for k, v in phi.items()}
        gq = dict(
            zip(
                p,
                torch.autograd.grad(
                    F.cross_entropy(functional_call(model, p, (qx[t],)), qy[t]), list(p.values())
                ),
                strict=False,
            )
        )
        x, info = implicit_meta_gradient(support_loss, phi, gq, cfg["lam"], cfg["cg_steps"], return_info=True)
        grads.append(x)
        steps.append(info.steps)
    return {k: torch.stack([g[k] for g in grads]).mean(0) for k in theta}, steps


def batched(model, theta, batch, cfg, hvp="jvp"):
    r = batched_implicit_meta_gradient(
        model,
        theta,
        *batch,
        lam=cfg["lam"],
        inner_steps=cfg["inner_steps"],
        inner_lr=cfg["inner_lr"],
        cg_steps=cfg["cg_steps"],
        hvp=hvp,
    )
    return r.grad, r.cg_info.steps.tolist()


CONTENDERS = {
    "looped": looped,
    "batched": batched,
    "batched_double_backward": lambda m, th, b, c: batched(m, th, b, c, hvp="double_backward"),
}


def setup(cfg):
    torch.manual_seed(0)
    model = OmniglotConv4(cfg["n_way"])
    theta = {k: v.detach() for k, v in model.named_parameters()}
    return model, theta, make_batch(cfg)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    # "5" resets the peak-RSS high-water mark VmHWM (Linux >= 4.0). ru_maxrss is unusable here: after
    # fork + exec it still carries the parent's peak.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def memory_child(name, cfg):
    model, theta, batch = setup(cfg)
    reset_peak_rss()  # no warm-up call: freed heap pages it left would hide this call's peak
    base = _status_kib("VmRSS")
    CONTENDERS[name](model, theta, batch, cfg)
    peak = _status_kib("VmHWM")
    print(json.dumps({"name": name, "peak_minus_base_mib": (peak - base) / 1024, "base_mib": base / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contenders", default="looped,batched,batched_double_backward")
    ap.add_argument("--meta-batch", type=int, default=CFG["meta_batch"])
    ap.add_argument("--memory-child", default=None)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dict(CFG, meta_batch=args.meta_batch)
    if args.memory_child:
        memory_child(args.memory_child, cfg)
        return
    names = args.contenders.split(",")
    model, theta, batch = setup(cfg)
    times = {n: [] for n in names}
    results = {}
    for n in names:  # warm-up (also gives the results to compare)
        results[n] = CONTENDERS[n](model, theta, batch, cfg)
    ref = results[names[0]][0]
    for n in names:
        g = results[n][0]
        err = sum(float((g[k] - ref[k]).double().pow(2).sum()) for k in g) ** 0.5
        err /= sum(float(ref[k].double().pow(2).sum()) for k in ref) ** 0.5
        print(f"{n:18s} rel diff to {names[0]}: {err:.2e}  cg steps: {results[n][1]}")
    for _ in range(args.reps):
        for n in names:
            t0 = time.perf_counter()
            CONTENDERS[n](model, theta, batch, cfg)
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    out = {"config": cfg, "threads": args.threads, "reps": args.reps, "median_s": {}, "ratio_to_first": {}}
    for n in names:
        med = statistics.median(times[n])
        out["median_s"][n] = med
        out["ratio_to_first"][n] = med / base
        print(f"{n:18s} median {med:7.3f} s  ratio {med / base:.3f}  all {[round(t, 3) for t in times[n]]}")
    if not args.no_memory:
        out["peak_mib"] = {}
        for n in names:
            cmd = [
                sys.executable,
                __file__,
                "--memory-child",
                n,
                "--threads",
                str(args.threads),
                "--meta-batch",
                str(args.meta_batch),
            ]
            res = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            out["peak_mib"][n] = res["peak_minus_base_mib"]
            print(f"{n:18s} peak memory above baseline {res['peak_minus_base_mib']:.1f} MiB")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
