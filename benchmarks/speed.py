"""Median time per meta-step of iMAML and its peers, interleaved in one process (issues 6 and 7).

Setting (defaults): Omniglot 5-way 1-shot, k_query 15, meta-batch 32, the paper's Conv4, 16 inner GD steps
(lr 0.1) on the proximal objective L_support(phi) + lam/2 ||phi - theta||^2, lam 2, 5 CG steps.

Contenders (each computes the meta-gradient of one meta-batch into gradients for theta; the outer optimiser
step, identical for all and ~1 ms, is not timed):
  imaml               this project's IMAML, per-task loop
  imaml_batched       this project's IMAML, its per-task meta-gradient vmapped over the tasks (issues 7, 14)
  torchopt_cg         TorchOpt ImplicitMetaGradientModule, linear_solve=solve_cg(maxiter=5): the same
                      5-step CG approximation of the same linear system as ours (checked first: "agreement")
  torchopt_normal_cg  TorchOpt with solve_normal_cg(maxiter=5), as TorchOpt's own iMAML example: CG on the
                      normal equations A^T A x = A^T b, a different and slower-converging approximation
                      (two HVPs per step), so its time is not a like-for-like comparison
  maml, fomaml        this project's MAML (second order, unrolled, lam 0) and FOMAML, same steps and lr
  l2l_maml            learn2learn's l2l.algorithms.MAML wrapper (second order), same network, steps, lr
  floor               per task: one support gradient x inner steps + one standalone Hessian-vector product
                      (double backward) x CG steps + one query gradient, in a plain loop, x meta-batch

All contenders run round-robin in one process (a warm-up call of each on 2 tasks, then ``--rounds`` rounds,
the order rotated every round) and the median per contender is reported, so that machine noise (2 shared
cores) hits all alike.

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
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    ce_loss_fn,
    episodes,
    machine_info,
    make_conv4,
    median,
    mib,
    peak_memory_bytes,
    rel_err_and_cosine,
    task,
    timed,
    write_json,
)
from torch.func import functional_call  # noqa: E402

NOTES = {
    "imaml": "this project's IMAML, per-task loop (reference for all ratios)",
    "imaml_batched": "this project's IMAML, all tasks batched with torch.func.vmap (issues 7, 14)",
    "imaml_learned_lam": "this project's IMAML with one learned lam per parameter tensor (issue 13)",
    "torchopt_cg": "TorchOpt ImplicitMetaGradientModule + linear_solve.solve_cg(maxiter=5): same 5-step CG "
    "on the same system as ours (see agreement)",
    "torchopt_normal_cg": "TorchOpt + linear_solve.solve_normal_cg(maxiter=5), as TorchOpt's iMAML example: "
    "CG on the normal equations, a DIFFERENT, slower-converging approximation (2 HVPs per step) - not "
    "like-for-like",
    "maml": "this project's MAML (second order through the unrolled inner loop, lam 0)",
    "fomaml": "this project's FOMAML (first order, lam 0)",
    "l2l_maml": "learn2learn l2l.algorithms.MAML(first_order=False) on the same network",
    "floor": "measured floor: per task, support gradient x inner_steps + standalone HVP (double backward) x "
    "cg_steps + query gradient, in a plain loop, x meta-batch",
    "imaml_core": "this project's pure-torch core in a loop (inner.proximal_adapt + "
    "implicit.implicit_meta_gradient)",
}


# ------------------------------------------------------------------------------------------ project pieces
def _import_or_none(modname: str, attr: str):
    try:
        mod = __import__(modname, fromlist=[attr])
        return getattr(mod, attr)
    except Exception:  # noqa: BLE001
        return None


def gd_adapt(support_loss, theta, lam, steps, lr):
    """Proximal GD inner loop (the contract's "gd"): the project's proximal_adapt if present, else this
    copy."""
    proximal_adapt = _import_or_none("lightning_imaml.inner", "proximal_adapt")
    if proximal_adapt is not None:
        return proximal_adapt(support_loss, theta, lam, steps, optimizer="gd", lr=lr)
    phi = {k: v.detach().clone() for k, v in theta.items()}
    for _ in range(steps):
        p = {k: v.requires_grad_(True) for k, v in phi.items()}
        g = torch.autograd.grad(support_loss(p), list(p.values()))
        with torch.no_grad():
            phi = {k: p[k] - lr * (gk + lam * (p[k] - theta[k])) for k, gk in zip(p, g, strict=True)}
    return {k: v.detach() for k, v in phi.items()}


def query_grad(model, phi, qx, qy):
    p = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    loss = F.cross_entropy(functional_call(model, p, (qx,)), qy)
    return dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True)), loss.detach()


def core_imaml_task(model, theta, t, lam, steps, lr, cg_steps, return_info=False):
    from lightning_imaml.implicit import implicit_meta_gradient

    sx, sy, qx, qy = t
    sl = ce_loss_fn(model, sx, sy)
    phi = gd_adapt(sl, theta, lam, steps, lr)
    g, _ = query_grad(model, phi, qx, qy)
    return implicit_meta_gradient(sl, phi, g, lam, cg_steps, return_info=return_info), phi


def make_core_imaml(model, batch, a):
    theta = {k: v.detach() for k, v in model.named_parameters()}
    B = batch[0].shape[0]

    def run():
        acc = None
        for i in range(B):
            x, _ = core_imaml_task(model, theta, task(batch, i), a.lam, a.inner_steps, a.inner_lr, a.cg_steps)
            acc = x if acc is None else {k: acc[k] + x[k] for k in acc}
        return {k: v / B for k, v in acc.items()}

    return run


META_GRAD_METHODS = ("meta_gradient", "compute_meta_gradient", "meta_grad", "outer_gradient")


def find_meta_grad_method(module):
    for name in META_GRAD_METHODS:
        fn = getattr(module, name, None)
        if callable(fn):
            return name, fn
    return None, None


def make_module(kind: str, model, a, **extra):
    cls = _import_or_none("lightning_imaml.meta", kind)
    if cls is None:
        raise RuntimeError(f"lightning_imaml.meta.{kind} is not importable")
    kw = dict(inner_steps=a.inner_steps, inner_lr=a.inner_lr)
    if kind == "IMAML":
        kw.update(lam=a.lam, cg_steps=a.cg_steps, inner_optimizer="gd")
    kw.update(extra)
    return cls(model=model, **kw)


def make_module_contender(kind, model, batch, a, **extra):
    module = make_module(kind, model, a, **extra)
    name, fn = find_meta_grad_method(module)
    if fn is None:
        raise RuntimeError(f"{kind} has none of the methods {META_GRAD_METHODS}")

    def run():
        return fn(batch)

    return run, module, name


def make_batched_contender(model, batch, a):
    """IMAML(batched_tasks=True).meta_gradient: the same per-task meta-gradient under torch.func.vmap."""
    return make_module_contender("IMAML", model, batch, a, batched_tasks=True)


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

    ls = getattr(torchopt.linear_solve, solver)(maxiter=a.cg_steps)
    InnerNet = torchopt_inner_class(ls)
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
    from lightning_imaml.implicit import hessian_vector_product

    theta = {k: v.detach() for k, v in model.named_parameters()}
    B = batch[0].shape[0]

    def grad_at(x, y):
        p = {k: v.requires_grad_(True) for k, v in ((k, v.detach()) for k, v in theta.items())}
        loss = F.cross_entropy(functional_call(model, p, (x,)), y)
        return dict(zip(p, torch.autograd.grad(loss, list(p.values())), strict=True))

    def run():
        out = None
        for i in range(B):
            sx, sy, qx, qy = task(batch, i)
            for _ in range(a.inner_steps):
                grad_at(sx, sy)
            g = grad_at(qx, qy)
            sl = ce_loss_fn(model, sx, sy)
            for _ in range(a.cg_steps):
                hessian_vector_product(sl, theta, g)
            out = g
        return out

    return run


# ------------------------------------------------------------------------------------------------ agreement
def agreement(model, batch, a, n_tasks: int, dtype: torch.dtype) -> dict:
    """TorchOpt solve_cg vs ours on identical inputs.

    same_phi: both given the same adapted phi (our proximal GD), so only the implicit solve differs;
    end_to_end: each runs its own 16-step proximal GD from the same theta, then its own implicit solve.
    TorchOpt solves (d^2 obj/dphi^2) u = (H + lam I) u = g and multiplies by -d(grad obj)/dtheta = lam; ours
    solves (I + H/lam) x = g. x = lam u exactly, and CG's iterates scale the same way, so 5-step CG agrees
    too.
    The scaling check solves both systems with the same CG code and compares lam * u with x.
    """
    import torchopt

    from lightning_imaml.implicit import conjugate_gradient, hessian_vector_product

    m = copy.deepcopy(model).to(dtype)
    b = tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)
    InnerNet = torchopt_inner_class(torchopt.linear_solve.solve_cg(maxiter=a.cg_steps))
    theta = {k: v.detach() for k, v in m.named_parameters()}
    out: dict = {"dtype": str(dtype).replace("torch.", ""), "tasks": n_tasks}
    ours_same, ours_e2e, to_same, to_e2e = [], [], [], []
    neg_curv, cg_steps_taken, scale_errs = 0, [], []
    for i in range(n_tasks):
        t = task(b, i)
        (x, info), phi = core_imaml_task(m, theta, t, a.lam, a.inner_steps, a.inner_lr, a.cg_steps, True)
        neg_curv += int(info.negative_curvature)
        cg_steps_taken.append(info.steps)
        ours_e2e.append(x)
        # ours at the given phi = the same computation (phi is ours); keep for symmetry
        ours_same.append(x)
        m.zero_grad(set_to_none=True)
        torchopt_task_grad(InnerNet, m, t, a, phi0=tuple(phi[k] for k in theta))
        to_same.append({k: p.grad.detach().clone() for k, p in m.named_parameters()})
        m.zero_grad(set_to_none=True)
        torchopt_task_grad(InnerNet, m, t, a)
        to_e2e.append({k: p.grad.detach().clone() for k, p in m.named_parameters()})
        # scaling: CG on (H + lam I) u = g vs CG on (I + H/lam) x = g, same CG code, same number of steps
        sl = ce_loss_fn(m, t[0], t[1])
        g, _ = query_grad(m, phi, t[2], t[3])

        def mv_h_lam(v, sl=sl, phi=phi):
            h = hessian_vector_product(sl, phi, v)
            return {k: h[k] + a.lam * v[k] for k in v}

        def mv_i_hlam(v, sl=sl, phi=phi):
            h = hessian_vector_product(sl, phi, v)
            return {k: v[k] + h[k] / a.lam for k in v}

        u, _ = conjugate_gradient(mv_h_lam, g, a.cg_steps, curvature_eps=-math.inf)
        xs, _ = conjugate_gradient(mv_i_hlam, g, a.cg_steps, curvature_eps=-math.inf)
        scale_errs.append(rel_err_and_cosine({k: a.lam * u[k] for k in u}, xs)[0])

    def mean_tree(ts):
        return {k: sum(t[k] for t in ts) / len(ts) for k in ts[0]}

    for label, ours, theirs in (("same_phi", ours_same, to_same), ("end_to_end", ours_e2e, to_e2e)):
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
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="timed rounds (after a warm-up call of each contender on 2 tasks)",
    )
    p.add_argument("--agreement-tasks", type=int, default=4)
    p.add_argument("--data", default="auto", choices=["auto", "omniglot", "random"])
    p.add_argument("--contenders", default="all", help="comma-separated subset of: " + ",".join(NOTES))
    p.add_argument(
        "--memory",
        default="imaml,imaml_batched",
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
    """name -> (callable, info dict). Unavailable contenders are returned in the skipped dict with a
    reason."""
    built, skipped, info = {}, {}, {}

    def add(name, factory):
        if name not in wanted:
            return
        try:
            res = factory()
            if isinstance(res, tuple):
                fn, module, method = res
                info[name] = {"via": f"{type(module).__name__}.{method}(batch)"}
            else:
                fn = res
            built[name] = fn
        except Exception as e:  # noqa: BLE001
            skipped[name] = f"{type(e).__name__}: {e}"

    # every contender gets its own deep copy of the same initial network
    def fresh():
        return copy.deepcopy(model)

    add("imaml", lambda: make_module_contender("IMAML", fresh(), batch, a, batched_tasks=False))
    add("imaml_batched", lambda: make_batched_contender(fresh(), batch, a))
    add(
        "imaml_learned_lam",
        lambda: make_module_contender("IMAML", fresh(), batch, a, batched_tasks=False, learn_lam="layer"),
    )
    add("torchopt_cg", lambda: make_torchopt(fresh(), batch, a, "solve_cg"))
    add("torchopt_normal_cg", lambda: make_torchopt(fresh(), batch, a, "solve_normal_cg"))
    add("maml", lambda: make_module_contender("MAML", fresh(), batch, a))
    add("fomaml", lambda: make_module_contender("FOMAML", fresh(), batch, a))
    add("l2l_maml", lambda: make_l2l(fresh(), batch, a))
    add("floor", lambda: make_floor(fresh(), batch, a))
    if "imaml" not in built and "imaml_core" not in wanted and wanted.issuperset({"imaml"}):
        wanted = wanted | {"imaml_core"}  # fall back to the pure-torch core as the reference
    add("imaml_core", lambda: make_core_imaml(fresh(), batch, a))
    return built, skipped, info


def main(argv=None):
    a = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="torchopt")  # functorch deprecations
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = common.pick_device(a.device)
    wanted = set(NOTES) - {"imaml_core"} if a.contenders == "all" else set(a.contenders.split(","))
    t_start = time.time()

    model, model_src = make_conv4(a.n_way)
    model = model.to(device)
    batch, data_src = episodes(a.meta_batch_size, a.n_way, a.k_shot, a.k_query, a.seed, device, a.data)

    result: dict = {
        "benchmark": "speed",
        "created": common.now(),
        "machine": machine_info(device),
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
            "warmup": "each contender once on a 2-task slice",
            "data": data_src,
            "model": model_src,
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
        except Exception as e:  # noqa: BLE001
            result["agreement"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print("agreement:", {k: v for k, v in result["agreement"].items()}, flush=True)

    # 2. interleaved timing
    built, skipped, info = build_contenders(model, batch, a, wanted)
    names = list(built)
    print(f"contenders: {names}; skipped: {skipped}", flush=True)
    times: dict[str, list[float]] = {n: [] for n in names}
    failed: dict[str, str] = {}
    # warm-up: every contender once on a 2-task slice of the batch (one-time initialisation, kernel
    # selection),
    # cheaper than a full warm-up round
    small = type(batch)(*(t[:2] for t in batch)) if hasattr(batch, "_fields") else tuple(t[:2] for t in batch)
    warm, _, _ = build_contenders(model, small, a, set(names))
    for n in names:
        try:
            print(f"warm-up {n}: {timed(warm[n], device):.3f} s (2 tasks)", flush=True)
        except Exception as e:  # noqa: BLE001
            failed[n] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    del warm
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for n in order:
            if n in failed:
                continue
            try:
                dt = timed(built[n], device)
            except Exception as e:  # noqa: BLE001
                failed[n] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                continue
            times[n].append(dt)
            print(f"round {r} {n}: {dt:.3f} s", flush=True)
    for n, why in failed.items():
        skipped[n] = why
        times.pop(n, None)

    # 3. peak memory of one meta-step, per contender (one extra call each)
    peaks: dict[str, float] = {}
    mem_method = None
    mem_names = list(times) if a.memory == "all" else [] if a.memory == "none" else a.memory.split(",")
    if mem_names:
        for n in [n for n in times if n in mem_names]:
            try:
                nbytes, mem_method = peak_memory_bytes(built[n], device)
                peaks[n] = mib(nbytes)
            except Exception as e:  # noqa: BLE001
                peaks[n] = math.nan
                print(f"memory {n} failed: {e}", flush=True)

    ref = "imaml" if "imaml" in times else ("imaml_core" if "imaml_core" in times else None)
    ref_med = median(times[ref]) if ref else math.nan
    contenders = {}
    for n, ts in times.items():
        med = median(ts)
        contenders[n] = {
            "median_s": med,
            "times_s": ts,
            "min_s": min(ts) if ts else math.nan,
            "ratio_to_imaml": med / ref_med if ref else math.nan,
            "peak_memory_mib": peaks.get(n),
            "note": NOTES[n],
            **info.get(n, {}),
        }
    result["contenders"] = contenders
    result["skipped"] = skipped
    result["reference"] = ref
    result["memory_method"] = mem_method

    def ratio(x, y):
        return (
            contenders[x]["median_s"] / contenders[y]["median_s"]
            if x in contenders and y in contenders
            else None
        )

    summary = {
        "imaml_over_torchopt_cg": ratio(ref, "torchopt_cg") if ref else None,
        "imaml_over_torchopt_normal_cg": ratio(ref, "torchopt_normal_cg") if ref else None,
        "imaml_over_l2l_maml": ratio(ref, "l2l_maml") if ref else None,
        "imaml_over_maml": ratio(ref, "maml") if ref else None,
        "imaml_over_fomaml": ratio(ref, "fomaml") if ref else None,
        "imaml_over_floor": ratio(ref, "floor") if ref else None,
        "batched_over_looped": ratio("imaml_batched", ref) if ref else None,
        "goal_imaml_over_torchopt_cg_max": 0.35,
        "goal_batched_over_looped_max": 0.5 if device.type == "cpu" else 0.2,
    }
    if "imaml_batched" in peaks and ref in peaks and peaks[ref]:
        summary["batched_over_looped_peak_memory"] = peaks["imaml_batched"] / peaks[ref]
    result["summary"] = summary
    result["wall_s"] = time.time() - t_start
    out = write_json(a.out, result)
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
    meds = [c[n]["median_s"] for n in names]
    colors = [
        "tab:red" if n.startswith("imaml") else ("tab:gray" if n == "floor" else "tab:blue") for n in names
    ]
    labels = [n + " *" if n == "torchopt_normal_cg" else n for n in names]
    ax.barh(labels, meds, color=colors)
    for y, n in enumerate(names):
        ts = c[n]["times_s"]
        ax.plot(ts, [y] * len(ts), "k.", ms=3)
        r = c[n]["ratio_to_imaml"]
        ax.text(
            max(ts + [c[n]["median_s"]]),
            y,
            f"  {c[n]['median_s']:.2f}s ({r:.2f}x)" if r == r else "",
            va="center",
            fontsize=8,
        )
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
    ax.set_xlim(0, max(max(c[n]["times_s"] or [0]) for n in names) * 1.35 if names else 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
