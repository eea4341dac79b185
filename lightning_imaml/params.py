"""Tiny arithmetic over parameter trees: a ``dict[str, Tensor]`` or a single ``Tensor``.

Parameters travel as the dicts that ``torch.func.functional_call(model, params, x)`` takes, so conjugate
gradient, the inner solvers and the batched path all need the same handful of vector-space operations on
them. Every function accepts either a dict of tensors (same keys, same shapes) or one plain tensor, and
returns the same kind. Nothing here builds an autograd graph on purpose; results follow the usual autograd
rules of the inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

Tree = Tensor | Mapping[str, Tensor]

__all__ = [
    "Tree",
    "tree_map",
    "tree_add",
    "tree_sub",
    "tree_scale",
    "tree_axpy",
    "tree_dot",
    "tree_norm",
    "tree_zeros_like",
    "tree_detach",
    "tree_clone",
    "tree_where",
    "flatten",
    "unflatten",
    "check_same_structure",
]


def tree_map(fn, *trees: Tree) -> Tree:
    """Apply ``fn`` leafwise: ``fn(a[k], b[k], ...)`` for every key (or once for plain tensors)."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    return {k: fn(*(t[k] for t in trees)) for k in first}


def tree_add(a: Tree, b: Tree) -> Tree:
    """a + b leafwise."""
    return tree_map(torch.add, a, b)


def tree_sub(a: Tree, b: Tree) -> Tree:
    """a - b leafwise."""
    return tree_map(torch.sub, a, b)


def tree_scale(a: Tree, s: float | Tensor) -> Tree:
    """s * a leafwise; ``s`` is a Python number or a 0-d tensor."""
    return tree_map(lambda t: t * s, a)


def tree_axpy(alpha: float | Tensor, x: Tree, y: Tree) -> Tree:
    """y + alpha * x leafwise (the BLAS axpy; one fused kernel per leaf when alpha is a number)."""
    if isinstance(alpha, Tensor):
        return tree_map(lambda xi, yi: yi + alpha * xi, x, y)
    return tree_map(lambda xi, yi: torch.add(yi, xi, alpha=alpha), x, y)


def tree_dot(a: Tree, b: Tree) -> Tensor:
    """<a, b> = sum_k sum(a[k] * b[k]) -> 0-d tensor (no host sync)."""
    if isinstance(a, Tensor):
        return torch.sum(a * b)
    terms = [torch.sum(a[k] * b[k]) for k in a]
    if not terms:
        raise ValueError("tree_dot got an empty parameter dict; pass at least one tensor")
    return torch.stack(terms).sum()


def tree_norm(a: Tree) -> Tensor:
    """||a||_2 over all leaves -> 0-d tensor."""
    return torch.sqrt(tree_dot(a, a))


def tree_zeros_like(a: Tree) -> Tree:
    """Zeros with each leaf's shape, dtype and device."""
    return tree_map(torch.zeros_like, a)


def tree_detach(a: Tree) -> Tree:
    """Leafwise ``detach()`` (shares storage)."""
    return tree_map(torch.Tensor.detach, a)


def tree_clone(a: Tree) -> Tree:
    """Leafwise ``detach().clone()``: a fresh copy with no history."""
    return tree_map(lambda t: t.detach().clone(), a)


def tree_where(cond: Tensor, a: Tree, b: Tree) -> Tree:
    """``torch.where(cond, a, b)`` leafwise; ``cond`` a bool scalar (or a per-task [T] mask under vmap)."""
    return tree_map(lambda x, y: torch.where(cond, x, y), a, b)


def flatten(a: Tree) -> Tensor:
    """Concatenate all leaves (in key order) into one 1-D tensor of length sum_k numel(a[k])."""
    if isinstance(a, Tensor):
        return a.reshape(-1)
    return torch.cat([t.reshape(-1) for t in a.values()])


def unflatten(flat: Tensor, like: Tree) -> Tree:
    """Inverse of :func:`flatten`: split a 1-D ``flat`` back into ``like``'s keys and shapes."""
    if isinstance(like, Tensor):
        if flat.numel() != like.numel():
            raise ValueError(f"unflatten: flat has {flat.numel()} elements but `like` has {like.numel()}")
        return flat.reshape(like.shape)
    total = sum(t.numel() for t in like.values())
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(
            f"unflatten: expected a 1-D tensor with {total} elements to match `like`, "
            f"got shape {tuple(flat.shape)}"
        )
    out, i = {}, 0
    for k, t in like.items():
        out[k] = flat[i : i + t.numel()].reshape(t.shape)
        i += t.numel()
    return out


def check_same_structure(a: Tree, b: Tree, names: Sequence[str] = ("a", "b")) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same keys and the same shape per key.

    ``names`` are the argument names used in the message, e.g. ``("params", "query_grad")``.
    """
    na, nb = names
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            raise ValueError(
                f"{na} is a {type(a).__name__} but {nb} is a {type(b).__name__}; "
                "pass both as tensors or both as dicts of tensors"
            )
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch: {na} has shape {tuple(a.shape)}, {nb} has {tuple(b.shape)}")
        return
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        raise ValueError(f"expected dicts of tensors, got {na}: {type(a).__name__}, {nb}: {type(b).__name__}")
    ka, kb = set(a), set(b)
    if ka != kb:
        raise ValueError(
            f"key mismatch between {na} and {nb}: only in {na}: {sorted(ka - kb)}, "
            f"only in {nb}: {sorted(kb - ka)}; pass dicts with the same parameter names"
        )
    for k in a:
        sa, sb = tuple(a[k].shape), tuple(b[k].shape)
        if sa != sb:
            raise ValueError(
                f"shape mismatch for key {k!r}: {na}[{k!r}] has shape {sa}, {nb}[{k!r}] has {sb}"
            )
