"""BatchNorm recalibration for one path of a supernet.

All paths share the BN running statistics, which therefore fit no path in particular. Before a path's accuracy
is measured (SPOS, ABS), the statistics are reset and re-estimated on training batches with that path active.
:func:`recalibrate_bn` uses the exact cumulative average (``momentum=None``) instead of SPOS's 0.1 EMA and, under
DDP, all-reduces the estimates so every rank ends with the same statistics: the mean is averaged, and the
variance is combined through the second moment (``E[x²] = var + mean²``) so that differences of the rank means
are accounted for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return _first_tensor(batch[0])
    if isinstance(batch, dict) and batch:
        return _first_tensor(next(iter(batch.values())))
    raise ValueError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


def bn_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer that tracks running statistics (SyncBatchNorm included)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def bn_state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A copy of the running statistics of every BN layer (to restore them after an evaluation)."""
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bn_layers(model)]


def load_bn_state(model: nn.Module, state: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Restore statistics saved by :func:`bn_state`."""
    for m, (mean, var, count) in zip(bn_layers(model), state):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, batches: Iterable[Any], num_batches: int = 20, strategy: Any = None
) -> int:
    """Reset every BN layer's statistics and re-estimate them on ``num_batches`` batches with the active path.

    Args:
        model: the network (its active architecture is used as is).
        batches: an iterable of batches (a DataLoader); the input is the first tensor of each batch.
        num_batches: how many batches to average over (fewer if ``batches`` runs out).
        strategy: a Lightning strategy; when given, the statistics are all-reduced across ranks (a collective:
            call it on every rank with the same ``num_batches``).

    Returns:
        The number of batches used on this rank.

    Raises:
        ValueError: for ``num_batches < 1``.

    Example::

        set_arch(net, arch)
        recalibrate_bn(net, datamodule.train_dataloader(), num_batches=20)
        net.eval()
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1")
    layers = bn_layers(model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    used = 0
    model.train()
    try:
        for batch in batches:
            if used >= num_batches:
                break
            model(_first_tensor(batch).to(device))
            used += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)
    if strategy is not None and getattr(strategy, "world_size", 1) > 1:
        means = torch.cat([m.running_mean.double() for m in layers])
        second = torch.cat([(m.running_var.double() + m.running_mean.double() ** 2) for m in layers])
        packed = torch.cat([means, second]).to(strategy.root_device)
        packed = strategy.reduce(packed, reduce_op="mean")
        means, second = packed.to(device).chunk(2)
        offset = 0
        for m in layers:
            n = m.running_mean.numel()
            mean = means[offset : offset + n]
            m.running_mean.copy_(mean)
            m.running_var.copy_((second[offset : offset + n] - mean**2).clamp_min(0))
            offset += n
    return used
