"""Callbacks shared by the implicit-model condition matrices (``test_conditions_deq.py``, ``test_conditions_detection.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.callbacks import Callback


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class OverflowAt(Callback):
    """Makes the gradient reaching a DEQ's output infinite at one global step (what a too-large loss scale does).

    Also records the weights at the start of every training batch (``weights[global_step]``).
    """

    def __init__(self, step: int, layer: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        self.step, self.layer, self.active, self.weights = step, layer, False, {}

    def on_fit_start(self, trainer, pl_module):
        self.layer(pl_module).register_forward_hook(self._hook)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = weights(pl_module)
        self.active = trainer.global_step == self.step

    def _hook(self, module, args, out):
        first = out if isinstance(out, torch.Tensor) else out[0]
        if self.active and first.requires_grad:
            first.register_hook(lambda g: g * float("inf"))


class GradNorms(Callback):
    """Total gradient norm before clipping (``on_before_optimizer_step``) and as the optimizer used it."""

    def __init__(self) -> None:
        self.before, self.after = [], []

    @staticmethod
    def _norm(module) -> float:
        return float(torch.cat([p.grad.double().flatten() for p in module.parameters() if p.grad is not None]).norm())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(self._norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._norm(pl_module))  # gradients are zeroed only before the next backward


class Killed(Exception):
    pass


class KillAt(Callback):
    """Raises at the start of global step ``step``: the process dies there, leaving only the periodic checkpoints."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed
