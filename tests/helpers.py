"""Functions the test files share (fixtures built on them are in conftest.py)."""

from __future__ import annotations

import torch
from torch import nn


def rel(a, b) -> float:
    """Relative difference ||a - b|| / ||b|| over tensors or dicts of tensors (same keys), in float64."""
    if isinstance(a, dict):
        a = torch.cat([a[k].reshape(-1) for k in sorted(a)])
        b = torch.cat([b[k].reshape(-1) for k in sorted(b)])
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def ridge_task(seed: int, d: int = 4, n: int = 15, m: int = 12):
    """Linear regression with a bias: (theta, support_loss, query_loss, phi_star(theta, lam)), float64 dicts.
    phi_star is the closed-form minimiser of L_s(phi) + lam/2 ||phi - theta||^2 (torch.linalg.solve)."""
    g = torch.Generator().manual_seed(seed)
    Xs, Xq = (torch.randn(k, d, generator=g, dtype=torch.float64) for k in (n, m))
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    ys = Xs @ w0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64) + 0.5
    yq = Xq @ w0 + 0.1 * torch.randn(m, generator=g, dtype=torch.float64) + 0.5
    theta = {"w": torch.randn(d, generator=g, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}

    def lin_loss(X, y):
        return lambda p: 0.5 * ((X @ p["w"] + p["b"] - y) ** 2).mean()

    def phi_star(th, lam):
        Xa = torch.cat([Xs, torch.ones(n, 1, dtype=torch.float64)], 1)
        A = Xa.T @ Xa / n + lam * torch.eye(d + 1, dtype=torch.float64)
        sol = torch.linalg.solve(A, Xa.T @ ys / n + lam * torch.cat([th["w"], th["b"]]))
        return {"w": sol[:d], "b": sol[d:]}

    return theta, lin_loss(Xs, ys), lin_loss(Xq, yq), phi_star


def ridge_batch(n_tasks=3, k=10, q=12, d=4, dtype=torch.float64, seed=0):
    """Regression episodes x [B, K, d], y [B, K, 1] (a per-task linear map + noise) for nn.Linear(d, 1)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_tasks, d, 1, generator=g, dtype=dtype)
    sx = torch.randn(n_tasks, k, d, generator=g, dtype=dtype)
    qx = torch.randn(n_tasks, q, d, generator=g, dtype=dtype)
    sy = sx @ w + 0.1 * torch.randn(n_tasks, k, 1, generator=g, dtype=dtype)
    qy = qx @ w + 0.1 * torch.randn(n_tasks, q, 1, generator=g, dtype=dtype)
    return sx, sy, qx, qy


def ridge_closed_form(theta: torch.Tensor, batch, lam: float, cg_damping: float = 0.0) -> torch.Tensor:
    """Exact iMAML meta-gradient of ``ridge_batch`` for nn.Linear(d, 1, bias=False) with weight theta [d] and
    the MSE loss: the mean over tasks of ((1 + d) I + H/lam)^{-1} grad L_q(phi*)
    = lam (H + (1 + d) lam I)^{-1} grad L_q(phi*), H = 2/K X'X, phi* = (H + lam I)^{-1} (2/K X'y + lam theta),
    d = cg_damping."""
    sx, sy, qx, qy = batch
    grads = []
    for i in range(sx.shape[0]):
        k, d = sx[i].shape
        a = 2.0 / k * sx[i].T @ sx[i] + lam * torch.eye(d, dtype=theta.dtype)
        phi = torch.linalg.solve(a, 2.0 / k * sx[i].T @ sy[i, :, 0] + lam * theta)
        gq = 2.0 / qx[i].shape[0] * qx[i].T @ (qx[i] @ phi - qy[i, :, 0])
        damped = a + cg_damping * lam * torch.eye(d, dtype=theta.dtype)
        grads.append(lam * torch.linalg.solve(damped, gq))
    return torch.stack(grads).mean(0)


class TinyCNN(nn.Sequential):
    """Conv(1->4, 3x3, stride 2) - BatchNorm (batch statistics) - ReLU - Flatten - Linear(36 -> 5): 199
    parameters; an nn.Sequential of standard layers, so the engine runs it natively."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 4, 3, stride=2, bias=False),  # a bias before BatchNorm has gradient 0: Adam would
            # normalise its rounding noise to full steps, so batched and looped runs would part ways
            nn.BatchNorm2d(4, track_running_stats=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(36, 5),
        )


def tiny_batch(num_tasks=4, dtype=torch.float64, seed=0):
    """Classification episodes for TinyCNN: 5-way, 1 support and 2 query images of 8x8 per class; the tasks'
    inputs have different scales, so their solves take different numbers of steps."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 3.0, num_tasks, dtype=dtype)[:, None, None, None, None]
    sx = scale * torch.randn(num_tasks, 5, 1, 8, 8, generator=g, dtype=dtype)
    qx = scale * torch.randn(num_tasks, 10, 1, 8, 8, generator=g, dtype=dtype)
    sy = torch.arange(5).repeat(num_tasks, 1)
    qy = torch.arange(5).repeat(num_tasks, 2)
    return sx, sy, qx, qy


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def omniglot_batch(n_tasks=4, n_way=5, k_shot=1, k_query=1, seed=0):
    """A meta-batch of real Omniglot training episodes (paper split), or None when the data is not there."""
    from datamodules import OmniglotDataModule

    try:
        dm = OmniglotDataModule(
            n_way=n_way, k_shot=k_shot, k_query=k_query, meta_batch_size=n_tasks, seed=seed
        )
        dm.setup("fit")
    except (FileNotFoundError, RuntimeError, ValueError):
        return None
    return tuple(next(iter(dm.train_dataloader())))


__all__ = [
    "TinyCNN",
    "omniglot_batch",
    "params_of",
    "rel",
    "ridge_batch",
    "ridge_closed_form",
    "ridge_task",
    "tiny_batch",
]


def krylov_minimiser(A, b, k):
    """argmin over x in K_k(A, b) of 1/2 x^T A x - b^T x: what k exact CG steps from 0 return. The basis of
    K_k by Arnoldi with full reorthogonalisation (the monomial basis b, Ab, ... loses ~1e-11 here)."""
    V = [b / b.norm()]
    for _ in range(1, k):
        w = A @ V[-1]
        for _ in range(2):  # Gram-Schmidt twice: orthogonal to rounding
            for u in V:
                w = w - (u @ w) * u
        V.append(w / w.norm())
    V = torch.stack(V, dim=1)
    return V @ torch.linalg.solve(V.T @ A @ V, V.T @ b)
