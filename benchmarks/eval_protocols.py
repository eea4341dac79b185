"""One meta-trained theta, several test-time protocols (issue 23): accuracy after adapting with each of
``--protocols`` on the same fixed tasks, mean +- 95 % CI, and how well each adaptation solved its problem.

A protocol is ``<solver name>:<lam>[:<steps>]`` with the solver's defaults otherwise (``hf:2:5`` =
HessianFree, lam 2, 5 Newton iterations; ``gd_armijo:0:16`` = 16 safeguarded GD steps at lam 0, plain
fine-tuning).

  python benchmarks/eval_protocols.py --ckpt benchmarks/results/hf_study_ckpt/imaml_hf/last.ckpt \\
      --protocols hf:2:5,hf:0:5,gd_armijo:0:16 --split val --tasks 600
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint of a learner (accuracy.py or train.py)")
    p.add_argument("--protocols", default="hf:2:5,hf:0:5,gd_armijo:0:16")
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--k-query", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=8, help="tasks adapted at once")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output (default: beside the checkpoint)")
    return p.parse_args(argv)


def load_theta(path: str):
    """(network, theta) from a learner checkpoint: the network rebuilt from the state dict's shapes as an
    OmniglotConv4 of its n_way (the accuracy benchmark's network)."""
    import torch

    from lightning_imaml.models import OmniglotConv4

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    net = OmniglotConv4(n_way=state["fc.weight"].shape[0])
    net.load_state_dict(state)
    return net, {k: v.detach() for k, v in net.named_parameters()}, int(ckpt.get("global_step", -1))


def protocol(spec: str):
    """``"hf:2:5"`` -> (solver object, lam)."""
    from lightning_imaml.inner import make_solver

    name, lam, *steps = spec.split(":")
    options = {"steps": int(steps[0])} if steps else {}
    return make_solver(name, **options), float(lam)


def main(argv=None):
    import torch
    import torch.nn.functional as F

    from datamodules import OmniglotDataModule
    from lightning_imaml.batched import run_chunked
    from lightning_imaml.functional import forward_tasks
    from lightning_imaml.metagrad import adapt_tasks

    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    common.keep_freed_memory(torch.device("cpu"))
    net, theta, step = load_theta(a.ckpt)
    dm = OmniglotDataModule(n_way=a.n_way, k_shot=a.k_shot, k_query=a.k_query, seed=a.seed, val_tasks=a.tasks,
                            test_tasks=a.tasks, eval_meta_batch_size=50)  # fmt: skip
    dm.setup("fit" if a.split == "val" else "test")
    loader = dm.val_dataloader() if a.split == "val" else dm.test_dataloader()
    rows = {}
    for spec in a.protocols.split(","):
        solver, lam = protocol(spec)
        accs, residuals = [], []
        for batch in loader:
            tasks = tuple(batch)

            def fn(chunk, mode, solver=solver, lam=lam):
                phi, info = adapt_tasks(net, theta, chunk[0], chunk[1], loss_fn=F.cross_entropy, lam=lam,
                                        solver=solver, mode=mode)  # fmt: skip
                with torch.no_grad():
                    out = forward_tasks(net, phi, chunk[2], None, mode)
                return out, info.residual / info.residual0

            out, rel = run_chunked(fn, tasks, a.chunk)
            accs.append((out.argmax(-1) == tasks[3]).float().mean(-1))
            residuals.append(rel)
        acc = torch.cat(accs).double()
        rel = torch.cat(residuals).double()
        ci = 1.96 * float(acc.std(correction=1)) / acc.numel() ** 0.5
        rows[spec] = {"acc": float(acc.mean()), "acc_ci95": ci, "residual_rel_median": float(rel.median())}
        print(f"{spec:18s} acc {100 * rows[spec]['acc']:.2f} +- {100 * ci:.2f} %  residual/residual0 "
              f"{rows[spec]['residual_rel_median']:.3f} (median)", flush=True)  # fmt: skip
    out = a.out or os.path.splitext(a.ckpt)[0] + "_protocols.json"
    result = {"benchmark": "eval_protocols", "ckpt": a.ckpt, "step": step, "split": a.split, "tasks": a.tasks}
    common.write_json(out, {**result, "protocols": rows, "machine": common.machine_info("cpu")})
    print("wrote", out)


if __name__ == "__main__":
    main()
