"""Parameters as one flat row per task: a dict name -> Tensor (as ``torch.func.functional_call`` takes it) and
the same numbers laid out as a ``[..., P]`` tensor, P the total number of scalars.

The engine keeps the parameters of a batch of T tasks as one ``[T, P]`` tensor, so that every solver and
conjugate-gradient update is one kernel over all tasks and all parameters instead of one per parameter tensor;
:class:`ParamSpec` converts at the edges (the network's forward takes views, never copies).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ParamSpec", "check_lam_layout", "check_same_structure", "detached", "rowdot", "select_rows"]


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """<a_t, b_t> for every row t of two ``[T, N]`` tensors -> ``[T]``."""
    return torch.linalg.vecdot(a, b)


def select_rows(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Row t of ``a`` where ``mask[t]``, else of ``b`` (``[T]`` mask, ``[T, ...]`` tensors). Skips the copy
    when the mask is all True or all False, the common case (a broadcast ``torch.where`` measured 3x an
    add)."""
    if bool(mask.all()):
        return a
    if not bool(mask.any()):
        return b
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def detached(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: tensor.detach()}`` (shares storage)."""
    return {k: v.detach() for k, v in params.items()}


@dataclass(frozen=True)
class ParamSpec:
    """Names and shapes of a parameter dict, in order; P = :attr:`numel` scalars in all."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> ParamSpec:
        """The spec of a dict name -> Tensor (its leaves' full shapes)."""
        return cls(tuple(params), tuple(tuple(t.shape) for t in params.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, params: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """dict of ``[*lead, *shape]`` tensors -> ``[*lead, P]`` (``batch_dims`` = len(lead)); one copy."""
        lead = None
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            t = params[name]
            if lead is None:
                lead = tuple(t.shape[:batch_dims])
            parts.append(t.reshape(*lead, math.prod(shape)))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``[*lead, P]`` -> dict of ``[*lead, *shape]`` views of ``flat`` (no copy)."""
        if flat.shape[-1] != self.numel:
            raise ValueError(
                f"expected a last dimension of {self.numel} parameters, got shape {tuple(flat.shape)}"
            )
        lead = flat.shape[:-1]
        pieces = flat.split(self.sizes, dim=-1)
        return {n: p.view(tuple(lead) + s) for n, s, p in zip(self.names, self.shapes, pieces, strict=True)}

    def expand(self, per_tensor: Mapping[str, Tensor]) -> Tensor:
        """One value per parameter tensor (0-d) or per scalar (the parameter's shape) -> a ``[P]`` tensor."""
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            v = per_tensor[name]
            parts.append(v.reshape(1).expand(math.prod(shape)) if v.dim() == 0 else v.reshape(-1))
        return torch.cat(parts)


def check_lam_layout(lam: Mapping[str, Tensor], params: Mapping[str, Tensor], name: str = "params") -> None:
    """Raise ``ValueError`` unless the per-parameter ``lam`` has the keys of ``params`` (``name`` in the
    message), each entry 0-d or of its parameter's shape."""
    if set(lam) != set(params):
        raise ValueError(
            f"a per-parameter lam needs the keys of {name}: missing {sorted(set(params) - set(lam))}, "
            f"unknown {sorted(set(lam) - set(params))}"
        )
    for k, v in lam.items():
        if v.dim() and tuple(v.shape) != tuple(params[k].shape):
            raise ValueError(
                f"lam[{k!r}] has shape {tuple(v.shape)}; use a 0-d tensor or {tuple(params[k].shape)}"
            )


def check_same_structure(a, b, names: Sequence[str] = ("a", "b")) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` are both tensors of one shape, or dicts with the same keys
    and the same shape per key; ``names`` are the argument names the message uses."""
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
    if set(a) != set(b):
        raise ValueError(
            f"key mismatch between {na} and {nb}: only in {na}: {sorted(set(a) - set(b))}, "
            f"only in {nb}: {sorted(set(b) - set(a))}; pass dicts with the same parameter names"
        )
    for k in a:
        if tuple(a[k].shape) != tuple(b[k].shape):
            raise ValueError(
                f"shape mismatch for key {k!r}: {na}[{k!r}] has shape {tuple(a[k].shape)}, "
                f"{nb}[{k!r}] has {tuple(b[k].shape)}"
            )
