"""Median time per meta-step of iMAML and its peers, interleaved in one process (issues 6 and 7).

Setting (defaults): Omniglot 5-way 1-shot, k_query 15, meta-batch 32, the paper's Conv4, 16 inner steps of
fixed-step proximal GD (lr 0.1) on L_support(phi) + lam/2 ||phi - theta||^2, lam 2, 5 CG steps.

Contenders (each computes the meta-gradient of one meta-batch; the outer optimiser step, identical for all
and ~1 ms, is not timed):
  imaml               this project's IMAML, per-task loop (``batched_tasks=False``): the reference of all
                      ratios
  imaml_default       this project's IMAML as shipped (``batched_tasks=None``): the chunk size (tasks
                      computed at once; 1 = the loop) is chosen by timing on the first meta-batch and recorded
  imaml_learned_lam   IMAML with one learned lam per parameter tensor (``learn_lam="layer"``), per-task loop
  torchopt_cg         TorchOpt ImplicitMetaGradientModule, linear_solve=solve_cg(maxiter=5): the same
                      5-step CG approximation of the same linear system as ours (checked first: "agreement")
  torchopt_normal_cg  TorchOpt with solve_normal_cg(maxiter=5), as TorchOpt's own iMAML example: CG on the
                      normal equations A^T A x = A^T b, a different and slower-converging approximation
                      (two HVPs per step), so its time is not a like-for-like comparison
  maml, fomaml        this project's MAML (second order, unrolled, lam 0) and FOMAML as shipped
                      (``batched_tasks=None``), same steps and lr
  l2l_maml            learn2learn's l2l.algorithms.MAML wrapper (second order), same network, steps, lr
  floor               per task: one support gradient x inner steps + one standalone Hessian-vector product
                      (double backward) x CG steps + one query gradient, in a plain loop, x meta-batch
(This project's fixed-step solvers evaluate one support gradient more than they take steps: the last one
reports the solve's residual.)

On CPU, ``lightning_imaml.cpu.keep_freed_memory()`` is called once at the start, as ``IMAML.setup`` does
under a Trainer: glibc then reuses freed blocks instead of page-faulting fresh ones. It is process-wide, so it
applies to every contender alike (TorchOpt's, learn2learn's and the floor too).

Every contender runs once untimed on the meta-batch (one-time initialisation; the default paths choose their
chunk size there), then all run round-robin in one process for ``--rounds`` rounds, the order rotated every
round, and the median per contender is reported, so that machine noise (2 shared cores) hits all alike.

Usage:
  python benchmarks/speed.py                 # full run -> benchmarks/results/speed.json + speed.png
  python benchmarks/speed.py --quick --out /tmp/speed.json
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import median, mib, rel_err_and_cosine, task  # noqa: E402

from lightning_imaml import meta  # noqa: E402
from lightning_imaml.cg import conjugate_gradient  # noqa: E402
from lightning_imaml.implicit import hessian_vector_product, implicit_meta_gradient  # noqa: E402
from lightning_imaml.inner import proximal_adapt  # noqa: E402
from lightning_imaml.metagrad import make_task_loss  # noqa: E402
from lightning_imaml.models import OmniglotConv4  # noqa: E402
from lightning_imaml.params import detached  # noqa: E402

NOTES = {
    "imaml": "this project's IMAML, per-task loop (batched_tasks=False; reference for all ratios)",
    "imaml_default": "this project's IMAML as shipped (batched_tasks=None: chunk size chosen by timing on "
    "the first meta-batch, see chunk_size)",
    "imaml_learned_lam": "this project's IMAML with one learned lam per parameter tensor (issue 13), "
    "per-task loop",
    "torchopt_cg": "TorchOpt ImplicitMetaGradientModule + linear_solve.solve_cg(maxiter=5): same 5-step CG "
    "on the same system as ours (see agreement)",
    "torchopt_normal_cg": "TorchOpt + linear_solve.solve_normal_cg(maxiter=5), as TorchOpt's iMAML example: "
    "CG on the normal equations, a DIFFERENT, slower-converging approximation (2 HVPs per step) - not "
    "like-for-like",
    "maml": "this project's MAML (second order through the unrolled inner loop, lam 0), as shipped",
    "fomaml": "this project's FOMAML (first order, lam 0), as shipped",
    "l2l_maml": "learn2learn l2l.algorithms.MAML(first_order=False) on the same network",
    "floor": "measured floor: per task, support gradient x inner_steps + standalone HVP (double backward) x "
    "cg_steps + query gradient, in a plain loop, x meta-batch",
}
# this project's learners: name -> (class, extra arguments)
LEARNERS = {
    "imaml": ("IMAML", dict(batched_tasks=False)),
    "imaml_default": ("IMAML", {}),
    "imaml_learned_lam": ("IMAML", dict(batched_tasks=False, learn_lam="layer")),
    "maml": ("MAML", {}),
    "fomaml": ("FOMAML", {}),
}


# ------------------------------------------------------------------------------------------ project pieces
def query_grad(model, phi, qx, qy):
    p = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    loss = make_task_loss(model, qx, qy, F.cross_entropy)(p)
    return dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True)), loss.detach()


def core_imaml_task(model, theta, t, a):
    """One task through the pure-torch core: proximal GD (``proximal_adapt``), then the implicit solve.
    Returns the :class:`~lightning_imaml.implicit.ImplicitGradient` and phi."""
    sx, sy, qx, qy = t
    support = make_task_loss(model, sx, sy, F.cross_entropy)
    phi, _ = proximal_adapt(support, theta, a.lam, a.inner_steps, optimizer="gd", lr=a.inner_lr)
    g, _ = query_grad(model, phi, qx, qy)
    return implicit_meta_gradient(support, phi, g, a.lam, a.cg_steps), phi


def make_learner(name, model, a):
    cls, extra = LEARNERS[name]
    kw = dict(inner_steps=a.inner_steps, inner_lr=a.inner_lr, **extra)
    if cls == "IMAML":
        kw.update(lam=a.lam, cg_steps=a.cg_steps, inner_optimizer="gd")
    return getattr(meta, cls)(model=model, **kw)


# ------------------------------------------------------------------------------------------------- TorchOpt
def torchopt_inner_class(linear_solve):
    import torchopt

    class InnerNet(torchopt.nn.ImplicitMetaGradientModule, linear_solve=linear_solve):
        """iMAML task learner, written as in TorchOpt's iMAML examples/tests: the meta-network is the
        meta-module, a deep copy is the inner parameter set, the objective is the proximal support loss."""

        def __init__(self, meta_net, n_inner_iter, reg_param, inner_lr, phi0=None):
            super().__init__()
            self.meta_net = meta_net
            self.net = torchopt.module_clone(meta_net, by="deepcopy", detach_buffers=True)
            self.n_inner_iter = n_inner_iter
            self.reg_param = reg_param
            self.inner_lr = inner_lr
            self.phi0 = phi0  # when given, solve() just installs it (agreement check at identical phi)

        def forward(self, x):
            return self.net(x)

        def objective(self, x, y):
            loss = F.cross_entropy(self(x), y)
            reg = 0.0
            for p1, p2 in zip(self.parameters(), self.meta_parameters(), strict=True):
                reg = reg + 0.5 * self.reg_param * torch.sum(torch.square(p1 - p2))
            return loss + reg

        def solve(self, x, y):
            params = tuple(self.parameters())
            if self.phi0 is not None:
                with torch.no_grad():
                    for p, v in zip(params, self.phi0, strict=True):
                        p.copy_(v)
                return self
            with torch.enable_grad():
                for _ in range(self.n_inner_iter):
                    grads = torch.autograd.grad(self.objective(x, y), params)
                    with torch.no_grad():
                        for p, g in zip(params, grads, strict=True):
                            p.sub_(g, alpha=self.inner_lr)
            return self

    return InnerNet


def torchopt_task_grad(InnerNet, meta_net, t, a, scale=1.0, phi0=None):
    sx, sy, qx, qy = t
    inner = InnerNet(meta_net, a.inner_steps, a.lam, a.inner_lr, phi0=phi0)
    inner.solve(sx, sy)
    loss = F.cross_entropy(inner(qx), qy) * scale
    loss.backward()
    return loss.detach()


def make_torchopt(model, batch, a, solver: str):
    import torchopt

    InnerNet = torchopt_inner_class(getattr(torchopt.linear_solve, solver)(maxiter=a.cg_steps))
    B = batch[0].shape[0]

    def run():
        model.zero_grad(set_to_none=True)
        for i in range(B):
            torchopt_task_grad(InnerNet, model, task(batch, i), a, scale=1.0 / B)
        return {k: p.grad for k, p in model.named_parameters()}

    return run


# ----------------------------------------------------------------------------------------------- learn2learn
def make_l2l(model, batch, a):
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=a.inner_lr, first_order=False)
    B = batch[0].shape[0]

    def run():
        maml.zero_grad(set_to_none=True)
        for i in range(B):
            sx, sy, qx, qy = task(batch, i)
            learner = maml.clone()
            for _ in range(a.inner_steps):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            (F.cross_entropy(learner(qx), qy) / B).backward()
        return {k: p.grad for k, p in model.named_parameters()}

    return run


# ---------------------------------------------------------------------------------------------------- floor
def make_floor(model, batch, a):
    theta = detached(dict(model.named_parameters()))
    B = batch[0].shape[0]

    def grad_at(x, y):
        p = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        loss = make_task_loss(model, x, y, F.cross_entropy)(p)
        return dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))

    def run():
        out = None
        for i in range(B):
            sx, sy, qx, qy = task(batch, i)
            for _ in range(a.inner_steps):
                grad_at(sx, sy)
            g = grad_at(qx, qy)
            support = make_task_loss(model, sx, sy, F.cross_entropy)
            for _ in range(a.cg_steps):
                hessian_vector_product(support, theta, g)
            out = g
        return out

    return run


# ------------------------------------------------------------------------------------------------ agreement
def agreement(model, batch, a, n_tasks: int, dtype: torch.dtype) -> dict:
    """TorchOpt solve_cg vs ours on identical inputs.

    same_phi: both given the same adapted phi (our proximal GD), so only the implicit solve differs;
    end_to_end: each runs its own proximal GD from the same theta, then its own implicit solve.
    TorchOpt solves (d^2 obj/dphi^2) u = (H + lam I) u = g and multiplies by -d(grad obj)/dtheta = lam; ours
    solves (I + H/lam) x = g. x = lam u exactly, and CG's iterates scale the same way, so 5-step CG agrees
    too. The scaling check solves both systems with the same CG code and compares lam * u with x.
    """
    import torchopt

    m = copy.deepcopy(model).to(dtype)
    b = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
    InnerNet = torchopt_inner_class(torchopt.linear_solve.solve_cg(maxiter=a.cg_steps))
    theta = detached(dict(m.named_parameters()))
    out: dict = {"dtype": str(dtype).replace("torch.", ""), "tasks": n_tasks}
    ours, to_same, to_e2e = [], [], []
    neg_curv, cg_steps_taken, scale_errs = 0, [], []
    for i in range(n_tasks):
        t = task(b, i)
        res, phi = core_imaml_task(m, theta, t, a)
        neg_curv += int(res.info.negative_curvature)
        cg_steps_taken.append(int(res.info.steps))
        ours.append(res.grad)
        m.zero_grad(set_to_none=True)
        torchopt_task_grad(InnerNet, m, t, a, phi0=tuple(phi[k] for k in theta))
        to_same.append({k: p.grad.detach().clone() for k, p in m.named_parameters()})
        m.zero_grad(set_to_none=True)
        torchopt_task_grad(InnerNet, m, t, a)
        to_e2e.append({k: p.grad.detach().clone() for k, p in m.named_parameters()})
        # scaling: CG on (H + lam I) u = g vs CG on (I + H/lam) x = g, same CG code, same number of steps
        support = make_task_loss(m, t[0], t[1], F.cross_entropy)
        g, _ = query_grad(m, phi, t[2], t[3])

        def mv_h_lam(v, support=support, phi=phi):
            h = hessian_vector_product(support, phi, v)
            return {k: h[k] + a.lam * v[k] for k in v}

        def mv_i_hlam(v, support=support, phi=phi):
            h = hessian_vector_product(support, phi, v)
            return {k: v[k] + h[k] / a.lam for k in v}

        u, _ = conjugate_gradient(mv_h_lam, g, a.cg_steps, curvature_eps=-math.inf)
        xs, _ = conjugate_gradient(mv_i_hlam, g, a.cg_steps, curvature_eps=-math.inf)
        scale_errs.append(rel_err_and_cosine({k: a.lam * u[k] for k in u}, xs)[0])

    def mean_tree(ts):
        return {k: sum(t[k] for t in ts) / len(ts) for k in ts[0]}

    # "same_phi" and "end_to_end" share our side: it is the same computation (phi is ours)
    for label, theirs in (("same_phi", to_same), ("end_to_end", to_e2e)):
        rel, cos = rel_err_and_cosine(mean_tree(theirs), mean_tree(ours))
        per = [rel_err_and_cosine(th, o) for th, o in zip(theirs, ours, strict=True)]
        out[label] = {
            "rel_err": rel,
            "cosine": cos,
            "max_task_rel_err": max(r for r, _ in per),
            "min_task_cosine": min(c for _, c in per),
        }
    out["ours_negative_curvature_tasks"] = neg_curv
    out["ours_cg_steps_taken"] = cg_steps_taken
    out["scaling_rel_err_lam_u_vs_x"] = max(scale_errs)
    out["note"] = (
        "global relative error ||g_torchopt - g_ours|| / ||g_ours|| and cosine of the meta-gradient averaged "
        "over the tasks; TorchOpt solves (H + lam I) u = g then multiplies by lam (cross term), ours "
        "(I + H/lam) x = g"
    )
    return out


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (for the tests)")
    p.add_argument("--out", default=str(common.default_out("speed")))
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--k-query", type=int, default=15)
    p.add_argument("--meta-batch-size", type=int, default=32)
    p.add_argument("--inner-steps", type=int, default=16)
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--lam", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one untimed call of each)")
    p.add_argument("--agreement-tasks", type=int, default=4)
    p.add_argument("--data", default="auto", choices=["auto", "omniglot", "random"])
    p.add_argument("--contenders", default="all", help="comma-separated subset of: " + ",".join(NOTES))
    p.add_argument(
        "--memory",
        default="imaml,imaml_default",
        help="contenders whose peak memory of one meta-step is measured after the timing ('all', 'none' "
        "or a comma-separated list; one extra call each)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.quick:
        a.meta_batch_size, a.inner_steps, a.cg_steps, a.k_query = 2, 2, 2, 2
        a.rounds, a.agreement_tasks = 1, 1
        a.threads = a.threads or 1
        if a.data == "auto":
            a.data = "random"
    return a


def build_contenders(model, batch, a, wanted):
    """``(built, skipped, learners)``: name -> callable of one meta-step, name -> why it could not be built,
    name -> this project's learner module (whose chosen chunk size is recorded)."""
    built, skipped, learners = {}, {}, {}
    for name in NOTES:
        if name not in wanted:
            continue
        fresh = copy.deepcopy(model)  # every contender gets its own copy of the same initial network
        try:
            if name in LEARNERS:
                module = learners[name] = make_learner(name, fresh, a)
                built[name] = lambda module=module: module.meta_gradient(batch)
            elif name.startswith("torchopt"):
                built[name] = make_torchopt(fresh, batch, a, name.replace("torchopt_", "solve_"))
            elif name == "l2l_maml":
                built[name] = make_l2l(fresh, batch, a)
            else:
                built[name] = make_floor(fresh, batch, a)
        except ImportError as e:  # a peer that is not installed here
            skipped[name] = f"{type(e).__name__}: {e}"
    return built, skipped, learners


def main(argv=None):
    a = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")  # functorch deprecations
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = common.pick_device(a.device)
    kept = common.keep_freed_memory(device)
    wanted = set(NOTES) if a.contenders == "all" else set(a.contenders.split(","))
    unknown = wanted - set(NOTES)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; valid: {', '.join(NOTES)}")
    t_start = time.time()

    model = OmniglotConv4(a.n_way).to(device)
    batch, data_src = common.episodes(a.meta_batch_size, a.n_way, a.k_shot, a.k_query, a.seed, device, a.data)

    result: dict = {
        "benchmark": "speed",
        "created": common.now(),
        "machine": common.machine_info(device),
        "config": {
            "n_way": a.n_way,
            "k_shot": a.k_shot,
            "k_query": a.k_query,
            "meta_batch_size": a.meta_batch_size,
            "inner_steps": a.inner_steps,
            "inner_lr": a.inner_lr,
            "inner_optimizer": "gd",
            "cg_steps": a.cg_steps,
            "lam": a.lam,
            "rounds": a.rounds,
            "threads": torch.get_num_threads(),
            "warmup": "each contender once on the meta-batch (the default paths choose their chunk size)",
            "keep_freed_memory": kept,
            "data": data_src,
            "model": "lightning_imaml.models.OmniglotConv4",
            "dtype": "float32",
            "quick": a.quick,
            "seed": a.seed,
        },
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }

    # 1. agreement with TorchOpt (before any timing: otherwise the timings compare different things)
    if "torchopt_cg" in wanted:
        try:
            result["agreement"] = {
                "float32": agreement(model, batch, a, a.agreement_tasks, torch.float32),
                "float64": agreement(model, batch, a, a.agreement_tasks, torch.float64),
            }
        except ImportError as e:
            result["agreement"] = {"error": f"{type(e).__name__}: {e}"}
        print("agreement:", result["agreement"], flush=True)

    # 2. one untimed call each, then the interleaved timing
    built, skipped, learners = build_contenders(model, batch, a, wanted)
    print(f"contenders: {list(built)}; skipped: {skipped}", flush=True)
    _, failed = common.interleaved(built, 1, device, label="warm-up")
    ready = {n: f for n, f in built.items() if n not in failed}
    times, failed_later = common.interleaved(ready, a.rounds, device)
    for n, why in {**failed, **failed_later}.items():
        skipped[n] = why
        times.pop(n, None)

    # 3. peak memory of one meta-step, per contender (one extra call each)
    peaks: dict[str, float] = {}
    mem_method = None
    mem_names = list(times) if a.memory == "all" else [] if a.memory == "none" else a.memory.split(",")
    for n in [n for n in times if n in mem_names]:
        try:
            nbytes, mem_method = common.peak_memory_bytes(built[n], device)
            peaks[n] = mib(nbytes)
        except Exception as e:  # noqa: BLE001 - the timings are kept
            peaks[n] = math.nan
            print(f"memory {n} failed: {e}", flush=True)

    ref = "imaml" if "imaml" in times else None
    ref_med = median(times[ref]) if ref else math.nan
    contenders = {}
    for n, ts in times.items():
        med = median(ts)
        contenders[n] = {
            "median_s": med,
            "times_s": ts,
            "min_s": min(ts),
            "ratio_to_imaml": med / ref_med,
            "peak_memory_mib": peaks.get(n),
            "chunk_size": learners[n].chunk_sizes.get("train") if n in learners else None,
            "note": NOTES[n],
        }
    result["contenders"] = contenders
    result["skipped"] = skipped
    result["reference"] = ref
    result["memory_method"] = mem_method

    def ratio(x, y):
        if x not in contenders or y not in contenders:
            return None
        return contenders[x]["median_s"] / contenders[y]["median_s"]

    summary = {
        "imaml_over_torchopt_cg": ratio("imaml", "torchopt_cg"),
        "imaml_over_torchopt_normal_cg": ratio("imaml", "torchopt_normal_cg"),
        "imaml_over_l2l_maml": ratio("imaml", "l2l_maml"),
        "imaml_over_maml": ratio("imaml", "maml"),
        "imaml_over_fomaml": ratio("imaml", "fomaml"),
        "imaml_over_floor": ratio("imaml", "floor"),
        "default_over_looped": ratio("imaml_default", "imaml"),
        "default_chunk_size": contenders.get("imaml_default", {}).get("chunk_size"),
        "goal_imaml_over_torchopt_cg_max": 0.35,
        "goal_default_over_looped_max": 0.5 if device.type == "cpu" else 0.2,
    }
    if peaks.get("imaml_default") and peaks.get("imaml"):
        summary["default_over_looped_peak_memory"] = peaks["imaml_default"] / peaks["imaml"]
    result["summary"] = summary
    result["wall_s"] = time.time() - t_start
    out = common.write_json(a.out, result)
    plot(result, common.png_path(out))
    print(f"wrote {out}", flush=True)
    for k, v in summary.items():
        print(f"  {k}: {v}")
    return result


def plot(result, path):
    plt = common.pyplot()
    c = result["contenders"]
    names = sorted(c, key=lambda n: c[n]["median_s"])
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.6), dpi=120)
    colors = [
        "tab:red" if n.startswith("imaml") else ("tab:gray" if n == "floor" else "tab:blue") for n in names
    ]

    # * marks the different approximation; this project's learners show their chunk size (1 = per-task loop)
    def label(n):
        if n == "torchopt_normal_cg":
            return n + " *"
        return f"{n} (chunk {c[n]['chunk_size']})" if c[n]["chunk_size"] else n

    labels = [label(n) for n in names]
    ax.barh(labels, [c[n]["median_s"] for n in names], color=colors)
    for y, n in enumerate(names):
        ts = c[n]["times_s"]
        ax.plot(ts, [y] * len(ts), "k.", ms=3)
        r = c[n]["ratio_to_imaml"]
        text = f"  {c[n]['median_s']:.2f}s ({r:.2f}x)" if r == r else ""
        ax.text(max([*ts, c[n]["median_s"]]), y, text, va="center", fontsize=8)
    cfg, m = result["config"], result["machine"]
    dev = m["gpu_name"] or f"CPU, {m['torch_num_threads']} thread(s) of {m['cpu_count']} shared cores"
    xlabel = "median seconds per meta-step (dots: rounds); ratios to " + str(result["reference"])
    if "torchopt_normal_cg" in c:
        xlabel += (
            "\n* solve_normal_cg: CG on the normal equations, a different, slower-converging approximation"
        )
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(
        f"Omniglot {cfg['n_way']}-way {cfg['k_shot']}-shot, meta-batch {cfg['meta_batch_size']}, "
        f"{cfg['inner_steps']} inner steps, {cfg['cg_steps']} CG, lam {cfg['lam']}\n({dev})",
        fontsize=9,
    )
    ax.set_xlim(0, max(max(c[n]["times_s"]) for n in names) * 1.35 if names else 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
