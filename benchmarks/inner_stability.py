"""Inner-solve stability on real Omniglot tasks: support-Hessian curvature at theta and how well each inner
solver solves the proximal problem from there (issue 11).

For a few fixed meta-training tasks (Omniglot paper split, 5-way 1-shot) and a given theta (a fresh
``OmniglotConv4`` with the chosen head initialisation, or the weights of a checkpoint), it reports per task
- ``eig``: the top eigenvalue of the support-loss Hessian at theta (power iteration on Hessian-vector
  products); fixed-step GD on L_s(phi) + lam/2 ||phi - theta||^2 is stable only while eig < 2/lr - lam;
- for each inner solver: the proximal gradient norm at the returned phi (``residual``, the delta of the
  iMAML paper's Theorem 1), relative to ||grad L_s(theta)|| (``residual_rel``), whether G ever rose,
  accepted steps, and the objective G at the end;
- for fixed-step GD also G at every step (to see it rise).

  python benchmarks/inner_stability.py                       # shipped (zero) head vs the paper's Xavier head
  python benchmarks/inner_stability.py --ckpt path/to.ckpt   # a trained theta
Writes ``benchmarks/results/inner_stability.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def probe_tasks(n_tasks: int, n_way: int = 5, k_shot: int = 1, seed: int = 1234):
    """``n_tasks`` fixed meta-training tasks (support_x, support_y) of the paper split, seeded."""
    import torch

    from datamodules import OmniglotDataModule

    dm = OmniglotDataModule(n_way=n_way, k_shot=k_shot, k_query=1, meta_batch_size=n_tasks, seed=seed)
    dm.setup("fit")
    ep = dm.sampler("train").sample(torch.Generator().manual_seed(seed), n_tasks)
    return [(ep.support_x[i], ep.support_y[i]) for i in range(n_tasks)]


def probe(model, theta, tasks, lam=2.0, lr=0.1, steps=16, solvers=("gd", "gd_armijo"), eig_iters=20):
    """Per task: top support-Hessian eigenvalue at theta and each solver's InnerInfo (floats)."""
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
            _, info = proximal_adapt(loss, theta, lam, steps, optimizer=name, lr=lr, return_info=True)
            row[name] = {
                "residual": float(info.residual),
                "residual_rel": float(info.residual / info.residual0),
                "rose": bool(info.rose),
                "accepted": float(info.accepted),
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


def summary(rows):
    out = {"eig": [round(r["eig"], 2) for r in rows]}
    for name in ("gd", "gd_armijo", "hf"):
        if name in rows[0]:
            out[name] = {
                "residual_rel_max": max(r[name]["residual_rel"] for r in rows),
                "residual_max": max(r[name]["residual"] for r in rows),
                "rose_share": sum(r[name]["rose"] for r in rows) / len(rows),
                "accepted_mean": sum(r[name]["accepted"] for r in rows) / len(rows),
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
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(common.default_out("inner_stability")))
    a = p.parse_args(argv)
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
        rows = probe(model, dict(model.named_parameters()), tasks, a.lam, a.lr, a.steps, a.solvers.split(","))
        results[name] = {"summary": summary(rows), "tasks": rows}
        print(name, summary(rows))
    common.write_json(
        a.out,
        {
            "benchmark": "inner_stability",
            "created": common.now(),
            "machine": common.machine_info("cpu"),
            "config": vars(a),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
