"""Flattening a DEQ state into one vector per sample, and back.

A DEQ state ``z`` may be a single tensor or a tuple/list of tensors (a multiscale MDEQ keeps one tensor per
resolution, an implicit FPN one per pyramid level). Solvers work on a plain ``(B, D)`` matrix: :func:`flatten`
concatenates the per-sample parts (a view for a single contiguous tensor, like MDEQ's ``list2vec``) and remembers a
:class:`StateSpec`; :func:`unflatten` rebuilds the same structure, shapes and dtypes (``vec2list``). Both are
differentiable, so the DEQ uses them inside its single tracked application of the cell as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

State = Union[torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor]]


@dataclass(frozen=True)
class StateSpec:
    """How a flat ``(B, D)`` matrix maps back onto the caller's structure.

    Raises:
        Nothing itself; :func:`spec_of` raises for states it cannot describe.

    Example::

        spec = spec_of([torch.zeros(2, 4, 8, 8), torch.zeros(2, 8, 4, 4)])
        assert spec.sizes == [256, 128] and unflatten(flatten(z), spec)[1].shape == (2, 8, 4, 4)
    """

    kind: str  # "tensor", "tuple" or "list"
    shapes: tuple[torch.Size, ...]  # per-part shape without the batch dimension
    dtypes: tuple[torch.dtype, ...]  # per-part dtype, restored on unflatten
    batch: int  # batch size B

    @property
    def sizes(self) -> list[int]:
        """Elements per sample of each part."""
        return [int(torch.Size(s).numel()) for s in self.shapes]


def _parts(z: State) -> tuple[str, list[torch.Tensor]]:
    if isinstance(z, torch.Tensor):
        return "tensor", [z]
    if isinstance(z, (tuple, list)) and len(z) > 0 and all(isinstance(t, torch.Tensor) for t in z):
        return ("tuple" if isinstance(z, tuple) else "list"), list(z)
    raise TypeError(f"a DEQ state must be a Tensor or a non-empty tuple/list of Tensors, got {type(z).__name__}")


def spec_of(z: State) -> StateSpec:
    """The :class:`StateSpec` of ``z``.

    Raises:
        TypeError: if ``z`` is not a tensor or a non-empty tuple/list of tensors.
        ValueError: if the parts disagree on the batch size or a part has no batch dimension.
    """
    kind, parts = _parts(z)
    if any(t.ndim == 0 for t in parts):
        raise ValueError("every part of a DEQ state needs a leading batch dimension")
    batch = parts[0].shape[0]
    if any(t.shape[0] != batch for t in parts):
        raise ValueError(f"all parts of a DEQ state must share the batch size, got {[t.shape[0] for t in parts]}")
    return StateSpec(kind, tuple(t.shape[1:] for t in parts), tuple(t.dtype for t in parts), batch)


def flatten(z: State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate the parts of ``z`` into one ``(B, D)`` matrix (cast to ``dtype`` when given)."""
    _, parts = _parts(z)
    flat = [t.reshape(t.shape[0], -1) for t in parts]
    if dtype is not None:
        flat = [t.to(dtype) for t in flat]
    elif len({t.dtype for t in flat}) > 1:
        common = flat[0].dtype
        for t in flat[1:]:
            common = torch.promote_types(common, t.dtype)
        flat = [t.to(common) for t in flat]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


def unflatten(vec: torch.Tensor, spec: StateSpec, cast: bool = True) -> State:
    """Split a ``(B, D)`` matrix back into the structure described by ``spec`` (restoring dtypes if ``cast``)."""
    pieces = torch.split(vec, spec.sizes, dim=1) if len(spec.shapes) > 1 else (vec,)
    out = []
    for piece, shape, dt in zip(pieces, spec.shapes, spec.dtypes):
        t = piece.reshape(vec.shape[0], *shape)
        out.append(t.to(dt) if cast else t)
    if spec.kind == "tensor":
        return out[0]
    return tuple(out) if spec.kind == "tuple" else out


def zeros_like_state(z: State) -> State:
    """Zeros with the structure, shapes, dtypes and devices of ``z``."""
    kind, parts = _parts(z)
    out = [torch.zeros_like(t) for t in parts]
    if kind == "tensor":
        return out[0]
    return tuple(out) if kind == "tuple" else out


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """Solver state precision: float64 stays float64, everything else (bf16, fp16, fp32) runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
