"""Weight normalisation and variational dropout for equilibrium cells (MDEQ, locuslab/deq, torchdeq).

Inside a DEQ the cell is applied dozens of times per forward pass, so two things must be fixed **per forward**, not
per application:

- **Weight norm** (``w = g * v / ||v||``) uses PyTorch's parametrizations (:func:`apply_weight_norm`); the
  :class:`~lightning_nd.implicit.DEQ` evaluates the cell inside ``torch.nn.utils.parametrize.cached()``, so the
  normalised weight is computed once per solve and once for the tracked application (MDEQ's ``_reset``; torchdeq's
  ``reset_norm`` that users must otherwise remember to call).
- **Variational dropout** (:class:`VariationalDropout`) draws one channel mask per forward and reuses it in every
  solver iteration, so the map being solved does not change between iterations. The DEQ calls
  :func:`reset_dropout` on its cell at the start of each forward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations


class VariationalDropout(nn.Module):
    """Channel-wise dropout whose mask is drawn once and kept until :meth:`reset` (one mask per DEQ forward).

    The mask has shape ``(B, C, 1, ..., 1)``: the same channels are dropped at every spatial position and in every
    solver iteration. Identity in eval mode or with ``p = 0``.

    Args:
        p: drop probability in [0, 1).

    Raises:
        ValueError: if ``p`` is outside [0, 1).

    Example::

        drop = VariationalDropout(0.25)
        drop.reset()
        y1, y2 = drop(z), drop(z)  # same mask in training mode
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"VariationalDropout p={p} must be in [0, 1)")
        self.p = p
        self.mask: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the mask; the next call in training mode draws a new one."""
        self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        if self.mask is None or self.mask.shape != shape or self.mask.device != x.device:
            keep = torch.empty(shape, device=x.device).bernoulli_(1.0 - self.p)
            self.mask = keep / (1.0 - self.p)
        return x * self.mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def reset_dropout(module: nn.Module) -> None:
    """Reset every :class:`VariationalDropout` (and anything else with ``reset_dropout_mask``) inside ``module``."""
    for m in module.modules():
        if isinstance(m, VariationalDropout):
            m.reset()
        elif hasattr(m, "reset_dropout_mask"):
            m.reset_dropout_mask()


def apply_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Weight-normalise ``module.<name>`` with PyTorch's parametrization (per output channel, ``dim=0``).

    Returns the module; its parameters become ``parametrizations.<name>.original0`` (g) and ``original1`` (v).
    """
    return parametrizations.weight_norm(module, name=name, dim=0)
