"""Inner-solve stability on real Omniglot tasks: support-Hessian curvature at theta and how well each inner
solver solves the proximal problem from there (issue 11).

For a few fixed meta-training tasks (Omniglot paper split, 5-way 1-shot) and a given theta (a fresh
``OmniglotConv4`` with the chosen head initialisation, or the weights of a checkpoint), it reports per task
- ``eig``: the top eigenvalue of the support-loss Hessian at theta (power iteration on Hessian-vector
  products); fixed-step GD on L_s(phi) + lam/2 ||phi - theta||^2 is stable only while eig < 2/lr - lam;
- for each inner solver (``--solvers``, names of ``lightning_imaml.inner.SOLVERS``; ``--lr`` is the step of
  the gradient methods, L-BFGS and HF keep their own): the proximal gradient norm at the returned phi
  (``residual``, the delta of the iMAML paper's Theorem 1), relative to ||grad L_s(theta)||
  (``residual_rel``), whether G ever rose, accepted steps, iterations run, and the objective G at the end;
- for fixed-step GD also G at every step (to see it rise).

  python benchmarks/inner_stability.py                       # shipped (zero) head vs the paper's Xavier head
  python benchmarks/inner_stability.py --ckpt path/to.ckpt   # a trained theta
  python benchmarks/inner_stability.py --quick --out /tmp/inner_stability.json   # seconds, for the tests
Writes ``benchmarks/results/inner_stability.json`` (``--out``) and a plot beside it: each solver's relative
residual per task against the task's top eigenvalue.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

OWN_LR = ("lbfgs", "hf")  # solvers whose step is their own default (1.0), not --lr


def probe_tasks(n_tasks: int, n_way: int = 5, k_shot: int = 1, seed: int = 1234):
    """``n_tasks`` fixed meta-training tasks (support_x, support_y) of the paper split, seeded."""
    import torch

    from datamodules import OmniglotDataModule

    dm = OmniglotDataModule(n_way=n_way, k_shot=k_shot, k_query=1, meta_batch_size=n_tasks, seed=seed)
    dm.setup("fit")
    ep = dm.sampler("train").sample(torch.Generator().manual_seed(seed), n_tasks)
    return [(ep.support_x[i], ep.support_y[i]) for i in range(n_tasks)]


def probe(model, theta, tasks, lam=2.0, lr=0.1, steps=16, solvers=("gd", "gd_armijo"), eig_iters=20):
    """Per task: top support-Hessian eigenvalue at theta and each solver's InnerInfo (floats); ``lr`` is the
    step of the gradient methods (L-BFGS and HF use their own default)."""
    import torch
    import torch.nn.functional as F

    from lightning_imaml.diagnostics import hessian_top_eigenvalue
    from lightning_imaml.inner import proximal_adapt, proximal_objective
    from lightning_imaml.metagrad import make_task_loss

    theta = {k: v.detach() for k, v in theta.items()}
    rows = []
    for sx, sy in tasks:
        loss = make_task_loss(model, sx, sy, F.cross_entropy)
        row = {"eig": hessian_top_eigenvalue(loss, theta, iters=eig_iters)}
        for name in solvers:
            step = None if name in OWN_LR else lr
            _, info = proximal_adapt(loss, theta, lam, steps, optimizer=name, lr=step)
            row[name] = {
                "residual": float(info.residual),
                "residual_rel": float(info.residual / info.residual0),
                "rose": bool(info.rose),
                "accepted": float(info.accepted),
                "iterations": float(info.iterations),
                "objective": float(info.objective),
            }
        if "gd" in solvers:  # the objective along fixed-step GD
            phi, traj = dict(theta), []
            with torch.no_grad():
                traj.append(float(proximal_objective(loss, phi, theta, lam)))
            phi = dict(theta)
            for _ in range(steps):
                with torch.enable_grad():
                    p = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
                    G = proximal_objective(loss, p, theta, lam)
                    g = torch.autograd.grad(G, list(p.values()))
                phi = {k: (v - lr * gk).detach() for (k, v), gk in zip(phi.items(), g, strict=True)}
                with torch.no_grad():
                    traj.append(float(proximal_objective(loss, phi, theta, lam)))
            row["gd_objective_per_step"] = traj
        rows.append(row)
    return rows


def summary(rows, solvers):
    out = {"eig": [round(r["eig"], 2) for r in rows]}
    for name in solvers:
        out[name] = {
            "residual_rel_max": max(r[name]["residual_rel"] for r in rows),
            "residual_max": max(r[name]["residual"] for r in rows),
            "rose_share": sum(r[name]["rose"] for r in rows) / len(rows),
            "accepted_mean": sum(r[name]["accepted"] for r in rows) / len(rows),
            "iterations_mean": sum(r[name]["iterations"] for r in rows) / len(rows),
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--lam", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--ckpt", default=None, help="Lightning checkpoint of an OmniglotConv4 learner")
    p.add_argument("--heads", default="zero,paper")
    p.add_argument("--solvers", default="gd,gd_armijo")
    p.add_argument("--eig-iters", type=int, default=20, help="power iterations for the top eigenvalue")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(common.default_out("inner_stability")))
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for the tests)")
    a = p.parse_args(argv)
    if a.quick:
        a.tasks, a.steps, a.eig_iters, a.heads = 2, 2, 2, "zero"
    import torch

    from lightning_imaml.models import OmniglotConv4

    if a.threads:
        torch.set_num_threads(a.threads)
    tasks = probe_tasks(a.tasks)
    results = {}
    if a.ckpt:
        sd = torch.load(a.ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model = OmniglotConv4(5)
        model.load_state_dict({k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")})
        runs = {"ckpt": model}
    else:
        runs = {}
        for head in a.heads.split(","):
            torch.manual_seed(0)
            runs[f"{head}_head"] = OmniglotConv4(5, head_init=head)
    for name, model in runs.items():
        solvers = a.solvers.split(",")
        rows = probe(model, dict(model.named_parameters()), tasks, a.lam, a.lr, a.steps, solvers, a.eig_iters)
        results[name] = {"summary": summary(rows, solvers), "tasks": rows}
        print(name, results[name]["summary"], flush=True)
    result = {
        "benchmark": "inner_stability",
        "created": common.now(),
        "machine": common.machine_info("cpu"),
        "config": vars(a),
        "results": results,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    out = common.write_json(a.out, result)
    plot(result, common.png_path(out))
    print("wrote", out)
    return result


def plot(result, path):
    """Per run: each solver's residual relative to its value at theta against the task's top eigenvalue; the
    dashed line is where fixed-step GD stops being stable (eig = 2/lr - lam)."""
    plt = common.pyplot()
    cfg, runs = result["config"], result["results"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), dpi=110, squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items(), strict=True):
        eig = [r["eig"] for r in run["tasks"]]
        for i, solver in enumerate(cfg["solvers"].split(",")):
            rel = [max(r[solver]["residual_rel"], 1e-12) for r in run["tasks"]]
            style = dict(marker="o^sDv<>p"[i % 8], facecolors="none", edgecolors=f"C{i % 10}")
            ax.scatter(eig, rel, label=solver, **style)
        ax.axvline(2 / cfg["lr"] - cfg["lam"], color="k", ls="--", lw=0.8, label="GD stable below")
        ax.set_yscale("log")
        ax.set_xlabel("top eigenvalue of the support-loss Hessian at theta")
        ax.set_ylabel(f"residual after {cfg['steps']} steps / at theta")
        ax.set_title(f"{name}, lam {cfg['lam']}, lr {cfg['lr']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
