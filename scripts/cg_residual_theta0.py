"""How well 5 CG steps solve the implicit system at theta_0, undamped (I + H/lam) and damped (2 I + H/lam).

The benchmark batch of benchmarks/flops.py (32 Omniglot 5-way 1-shot tasks, seed 0, the shipped settings), one
task at a time, float32, 1 thread: per method and cg_damping, the median and max over tasks of the CG residual
||b - A x|| after the solve, the share of tasks whose CG met negative curvature, the norm of the mean
meta-gradient and the median inner residual (README, "CG damping"):

  python scripts/cg_residual_theta0.py > benchmarks/results/cg_damping_theta0.txt
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import common  # noqa: E402
import flops  # noqa: E402
import torch  # noqa: E402


def main():
    torch.set_num_threads(1)
    batch, source = common.episodes(32, 5, 1, 1, seed=0, device="cpu")
    print(f"# {source} batch, 32 tasks; cg_residual = ||b - A x|| after 5 CG steps, A = (1 + d) I + H/lam")
    for m in ("imaml", "imaml_hf", "imaml_lbfgs8"):
        for d in (0.0, 1.0):
            mod = flops.make(flops.METHODS[m], 5, "cpu", batched_tasks=False, cg_damping=d)
            g, met = mod.meta_gradient(batch)
            r = met["cg_residual"]
            print(
                f"{m} cg_damping {d}: cg_residual median {r.median():.2f} max {r.max():.1f}, "
                f"negative curvature {met['cg_negative_curvature'].float().mean():.2f}, "
                f"|mean meta-gradient| {float(common.flat(g).norm()):.1f}, "
                f"inner residual median {met['inner_residual'].median():.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
