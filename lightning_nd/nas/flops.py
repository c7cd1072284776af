"""Cost of an architecture: multiply-accumulates (what NAS papers call "FLOPs") and parameters.

:func:`count_flops` runs one forward pass at batch size 1 under ``torch.utils.flop_counter.FlopCounterMode`` and
returns **MACs** (the counter's FLOPs / 2): convolutions and matrix multiplications only; pooling, BN,
activations and additions count 0. This is the convention of the NAS-Bench-201 tables, SPOS (330M) and ABS (600M),
except that NB201 also adds the classifier bias (``num_classes`` MACs, 1e-5 M on CIFAR-10).

:class:`ArchCost` makes the cost of any path cheap: one forward records the input of every ``Choice``, each
candidate is then counted once on that input, and a path's cost is ``fixed + Σ table[decision][op]``
(vectorised over many paths by :meth:`ArchCost.flops_many`). Ops gated by an input choice (an op on an input edge, DARTS) count
only when that input is chosen: the table is multiplied by :func:`~lightning_nd.nas.arch.used_mask`. This is exact
whenever a ``Choice``'s input shape does not depend on the other decisions (true for every space here, since candidates must agree on output shapes);
``exact=True`` counts each exported subnet instead (cached). :class:`CostConstraint` turns ranges into a predicate
for :class:`~lightning_nd.nas.sampler.PathSampler`, the pruner and the evolutionary search.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_nd.nas.arch import decisions, export_subnet, list_choices, set_arch, used_mask
from lightning_nd.nas.choice import Choice


@contextmanager
def _quiet_choices(model: nn.Module):
    """Skip the Choice shape check (it would run and count every candidate) and keep train/eval mode."""
    choices = list_choices(model)
    saved = [c._shapes_checked for c in choices]
    mode = model.training
    for c in choices:
        c._shapes_checked = True
    model.eval()
    try:
        yield
    finally:
        for c, s in zip(choices, saved):
            c._shapes_checked = s
        model.train(mode)


def _macs(fn: Any, *args: Any, **kwargs: Any) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops()) // 2


def _input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros(1, *[int(s) for s in input_shape], device=device, dtype=dtype)


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass of ``model`` on one input of shape ``input_shape`` (C, H, W), batch excluded.

    A supernet is counted along its active path (set one with ``set_arch`` first).
    """
    with _quiet_choices(model):
        return _macs(model, _input(model, input_shape))


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _param_ids(module: nn.Module) -> dict[int, int]:
    return {id(p): p.numel() for p in module.parameters()}


class ArchCost:
    """MACs and parameter count of any path of a supernet, from a per-op table built with one forward pass.

    Args:
        model: the supernet.
        input_shape: input shape (C, H, W) without the batch dimension.
        exact: count every queried path by exporting and measuring its subnet (slow, cached) instead of the table.

    Raises:
        ValueError: for a model without ``Choice`` layers.

    Example::

        cost = ArchCost(build_space("nb201"), (3, 32, 32))
        cost.flops([3, 3, 3, 3, 3, 3]) / 1e6, cost.params([3] * 6)
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], exact: bool = False) -> None:
        self.model, self.input_shape, self.exact = model, tuple(int(s) for s in input_shape), exact
        self.decisions = decisions(model)
        if not self.decisions:
            raise ValueError(f"{type(model).__name__} has no Choice layers: ArchCost needs a supernet")
        self._cache: dict[tuple[int, ...], tuple[int, int]] = {}
        self._gated = False
        nested = any(isinstance(m, Choice) for c in list_choices(model) for m in c.candidates.modules())
        self.exact = exact or nested
        if not self.exact:
            self._build_table()

    def _build_table(self) -> None:
        model = self.model
        previous = [c.active for c in list_choices(model)]
        arch0 = [d.alive[0] if d.alive else 0 for d in self.decisions]
        set_arch(model, arch0, allow_dead=True)
        inputs: dict[int, tuple] = {}
        hooks = [
            c.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: inputs.setdefault(i, (args, kwargs)), with_kwargs=True
            )
            for i, c in enumerate(list_choices(model))
        ]
        self._gated = any(d.gate is not None for d in self.decisions)
        try:
            with _quiet_choices(model):
                total = _macs(model, _input(model, self.input_shape))
                # ops on inputs that arch0 does not choose saw no input: cycle the input choices until every
                # Choice has run once (each input is in some combination)
                rounds = max((len(d.names) for d in self.decisions if d.combinations), default=0)
                for r in range(rounds if self._gated else 0):
                    if len(inputs) == len(hooks):
                        break
                    arch_r = [r % len(d.names) if d.combinations else a for d, a in zip(self.decisions, arch0)]
                    set_arch(model, arch_r, allow_dead=True)
                    with torch.no_grad():
                        model(_input(model, self.input_shape))
                layer_macs = {
                    i: [_macs(op, *inputs[i][0], **inputs[i][1]) if i in inputs else 0 for op in c.candidates]
                    for i, c in enumerate(list_choices(model))
                }
        finally:
            for h in hooks:
                h.remove()
            for c, a in zip(list_choices(model), previous):
                c.active = a
        index = {id(layer): i for i, layer in enumerate(list_choices(model))}
        self.flops_table = [np.zeros(len(d.names)) for d in self.decisions]
        self.params_table = [np.zeros(len(d.names)) for d in self.decisions]
        chosen = 0
        candidate_ids: set[int] = set()
        used0 = used_mask(self.decisions, [arch0])[0]
        for d_idx, d in enumerate(self.decisions):
            for layer in d.layers:
                macs = layer_macs[index[id(layer)]]
                self.flops_table[d_idx] += np.asarray(macs, dtype=np.float64)
                chosen += macs[arch0[d_idx]] if used0[d_idx] else 0
                for o, op in enumerate(layer.candidates):
                    ids = _param_ids(op)
                    candidate_ids.update(ids)
                    self.params_table[d_idx][o] += sum(ids.values())
        self.fixed_flops = float(total - chosen)
        self.fixed_params = float(sum(n for i, n in _param_ids(model).items() if i not in candidate_ids))
        self._offsets = np.cumsum([0] + [len(d.names) for d in self.decisions])[:-1]
        self._flat_flops = np.concatenate(self.flops_table)
        self._flat_params = np.concatenate(self.params_table)

    def _exact(self, arch: Sequence[int]) -> tuple[int, int]:
        key = tuple(int(i) for i in arch)
        if key not in self._cache:
            subnet = export_subnet(self.model, list(key))
            self._cache[key] = (count_flops(subnet, self.input_shape), count_params(subnet))
        return self._cache[key]

    def flops(self, arch: Sequence[int]) -> float:
        """MACs of the path ``arch``."""
        if self.exact:
            return float(self._exact(arch)[0])
        if self._gated:
            return float(self.flops_many(np.asarray([arch]))[0])
        return float(self.fixed_flops + sum(t[int(i)] for t, i in zip(self.flops_table, arch)))

    def params(self, arch: Sequence[int]) -> int:
        """Parameters of the standalone subnet of ``arch``."""
        if self.exact:
            return self._exact(arch)[1]
        if self._gated:
            return int(round(float(self.params_many(np.asarray([arch]))[0])))
        return int(round(self.fixed_params + sum(t[int(i)] for t, i in zip(self.params_table, arch))))

    def flops_many(self, archs: np.ndarray) -> np.ndarray:
        """MACs of every row of an ``(n, decisions)`` array of paths (vectorised)."""
        archs = np.asarray(archs, dtype=np.int64)
        if self.exact:
            return np.array([self.flops(a) for a in archs], dtype=np.float64)
        return self.fixed_flops + self._table_sum(self._flat_flops, archs)

    def params_many(self, archs: np.ndarray) -> np.ndarray:
        """Parameter counts of every row of an ``(n, decisions)`` array of paths (vectorised)."""
        archs = np.asarray(archs, dtype=np.int64)
        if self.exact:
            return np.array([self.params(a) for a in archs], dtype=np.float64)
        return self.fixed_params + self._table_sum(self._flat_params, archs)

    def _table_sum(self, flat: np.ndarray, archs: np.ndarray) -> np.ndarray:
        values = flat[archs + self._offsets]
        if self._gated:
            values = values * used_mask(self.decisions, archs)
        return values.sum(axis=1)


def _range(name: str, value: Sequence[float | None] | None) -> tuple[float, float] | None:
    if value is None:
        return None
    if len(value) != 2:
        raise ValueError(f"{name}={value!r} must be a (low, high) pair; use null for an open end")
    low = -np.inf if value[0] is None else float(value[0])
    high = np.inf if value[1] is None else float(value[1])
    if low > high:
        raise ValueError(f"{name}={value!r} is empty: low > high")
    return low, high


class CostConstraint:
    """A FLOPs (MACs) and/or parameter range a path must satisfy; bounds inclusive, ``None`` = open end.

    Args:
        cost: the :class:`ArchCost` of the supernet.
        flops_range: ``(low, high)`` MACs, e.g. ``(0, 330e6)`` for SPOS.
        params_range: ``(low, high)`` parameter count.

    Raises:
        ValueError: for a range that is not a pair or has low > high.

    Example::

        ok = CostConstraint(ArchCost(net, (3, 224, 224)), flops_range=(None, 600e6))
        sampler = PathSampler(net, constraint=ok)
    """

    def __init__(
        self,
        cost: ArchCost,
        flops_range: Sequence[float | None] | None = None,
        params_range: Sequence[float | None] | None = None,
    ) -> None:
        self.cost = cost
        self.flops_range = _range("flops_range", flops_range)
        self.params_range = _range("params_range", params_range)

    def __call__(self, arch: Sequence[int]) -> bool:
        if self.flops_range and not self.flops_range[0] <= self.cost.flops(arch) <= self.flops_range[1]:
            return False
        return not (self.params_range and not self.params_range[0] <= self.cost.params(arch) <= self.params_range[1])

    def mask(self, archs: np.ndarray) -> np.ndarray:
        """Boolean feasibility of every row of an ``(n, decisions)`` array of paths (vectorised)."""
        archs = np.asarray(archs, dtype=np.int64)
        ok = np.ones(len(archs), dtype=bool)
        if self.flops_range:
            f = self.cost.flops_many(archs)
            ok &= (f >= self.flops_range[0]) & (f <= self.flops_range[1])
        if self.params_range:
            p = self.cost.params_many(archs)
            ok &= (p >= self.params_range[0]) & (p <= self.params_range[1])
        return ok
