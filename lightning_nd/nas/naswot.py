"""Neural architecture search without training (NASWOT): judge an untrained network from one minibatch.

Mellor et al. score a network at initialisation by how differently it treats the samples of one minibatch.

* **v2** (ICML 2021, the default): every module whose type name contains ``ReLU`` is hooked; its input, flattened per
  sample, gives a binary code ``c = (x > 0)``. Over all hooked units the kernel
  ``K = sum(c c^T + (1 - c)(1 - c)^T)`` counts, for each pair of samples, the units on which they agree
  (``N_units - Hamming``). The score is ``log|det K|``: high when the samples fall in different linear regions.
  ``K`` is accumulated in float64, because its integer entries are exact in float32 only up to 2^24 units.
* **v1** (the first preprint): the Jacobian ``J = d(sum of outputs)/dx`` of the minibatch, flattened per sample; with
  ``s`` the eigenvalues of its correlation matrix and ``k = 1e-5`` the score is ``-sum(log(s + k) + 1 / (s + k))``.

Both run the network in training mode (batch statistics in BatchNorm, as the official code, which never calls
``eval()``) and leave it exactly as it was: mode and BatchNorm running statistics are restored. Score every candidate
on the same minibatch. Functional ReLUs (``F.relu``) are invisible to v2, as in the official code. Cells that
disconnect input from output give ``NaN`` (v1) or a degenerate score; rank them last (``nanargmax``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

JACOBIAN_K = 1e-5  # v1's eigenvalue offset


def _inputs(batch: Any) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("naswot_score needs a batch tensor (or an (x, y) tuple) with a batch dimension")
    if x.shape[0] < 2:
        raise ValueError(f"naswot_score needs at least 2 samples in the batch, got {x.shape[0]}")
    return x


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    raise TypeError(f"cannot score a network whose output is a {type(out).__name__}")


class _Preserve:
    """Context: training mode on, then restore every module's mode and every BatchNorm buffer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.buffers = [
            (b, b.detach().clone())
            for m in self.model.modules()
            if isinstance(m, _BatchNorm)
            for b in m.buffers()
        ]
        self.model.train()

    def __exit__(self, *exc: Any) -> None:
        for module, mode in self.modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in self.buffers:
                buffer.copy_(saved)


def _unchecked_choices(model: nn.Module) -> bool:
    from lightning_nd.nas.choice import Choice

    return any(isinstance(m, Choice) and not getattr(m, "_shapes_checked", True) for m in model.modules())


def relu_modules(model: nn.Module) -> list[nn.Module]:
    """The modules v2 hooks: those whose type name contains ``ReLU`` (ReLU, ReLU6, LeakyReLU, ...)."""
    return [m for m in model.modules() if "ReLU" in type(m).__name__]


def _hamming_term(flat: torch.Tensor) -> torch.Tensor:
    """``c c^T + (1 - c)(1 - c)^T`` for the binary codes ``c = flat > 0`` of one module, in float64.

    Computed as ``2 c c^T - r 1^T - 1 r^T + units`` with ``r = diag(c c^T)``: one matmul of 0/1 codes, whose integer
    sums are exact in float32 up to 2^24 units (float64 beyond).
    """
    units = flat.shape[1]
    code = (flat > 0).to(torch.float32 if units < 2**24 else torch.float64)
    agree = (code @ code.T).to(torch.float64)
    active = agree.diagonal()
    return 2.0 * agree - active[:, None] - active[None, :] + float(units)


def hamming_kernel(model: nn.Module, batch: Any) -> torch.Tensor:
    """The v2 kernel ``K`` (float64, ``B x B``) of ``model`` on ``batch``: per pair, the ReLU units that agree.

    Raises:
        ValueError: when the model has no ReLU module (nothing to hook) or the batch is unusable.
    """
    x = _inputs(batch)
    hooked = relu_modules(model)
    if not hooked:
        raise ValueError(f"{type(model).__name__} has no ReLU modules: NASWOT v2 has nothing to hook (F.relu is invisible)")
    n = x.shape[0]
    kernel = torch.zeros(n, n, dtype=torch.float64, device=x.device)

    seen: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def hook(module: nn.Module, args: tuple) -> None:
        inp = args[0].detach()
        # Several ReLUs often read the same tensor (every NB201 edge leaving a node): count each module, as the
        # official code does, but compute a tensor's contribution once. The cache holds the tensor, so its
        # address cannot be reused while the key lives; only the last few tensors are kept.
        key = (inp.data_ptr(), inp.storage_offset(), tuple(inp.shape), inp.stride(), inp._version)
        if key not in seen:
            seen[key] = (inp, _hamming_term(inp.reshape(n, -1)))
            if len(seen) > 8:
                seen.popitem(last=False)
        kernel.add_(seen[key][1])

    handles = []
    try:
        with _Preserve(model), torch.no_grad():
            if _unchecked_choices(model):
                model(x)  # Choice runs every candidate on its first forward (a shape check): keep it out of K
            handles = [m.register_forward_pre_hook(hook) for m in hooked]
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    return kernel


def jacobian(model: nn.Module, batch: Any) -> torch.Tensor:
    """The v1 Jacobian ``d(sum of outputs)/dx``, flattened per sample (``B x D``, the input's dtype)."""
    x = _inputs(batch).detach().clone().requires_grad_(True)
    with _Preserve(model), torch.enable_grad():
        out = _logits(model(x))
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    return grad.reshape(x.shape[0], -1)


def jacobian_score(jac: torch.Tensor, k: float = JACOBIAN_K) -> float:
    """v1's score of a Jacobian: ``-sum(log(s + k) + 1/(s + k))`` over the eigenvalues ``s`` of its correlation matrix."""
    corr = torch.corrcoef(jac.to(torch.float64))
    if not torch.isfinite(corr).all():
        return float("nan")
    eig = torch.linalg.eigvalsh(corr)
    return float(-(torch.log(eig + k) + 1.0 / (eig + k)).sum())


def naswot_score(model: nn.Module, batch: Any, version: int = 2, arch: Sequence[int] | None = None) -> float:
    """Score an untrained network (or one supernet path) on one minibatch; higher is better.

    Args:
        model: any ``nn.Module``: a standalone subnet or a supernet with ``Choice`` layers.
        batch: the minibatch, a tensor or an ``(x, y)`` tuple (labels unused); use the same one for every candidate.
            The paper uses 128 samples for v2 and 256 for v1.
        version: 2 (Hamming-kernel log-determinant) or 1 (Jacobian correlation).
        arch: for a supernet, the path to score (set with ``set_arch`` first); ``None`` scores the active path.

    Returns:
        The score as a Python float (``log|det K|`` for v2; ``NaN`` for v1 when the Jacobian is degenerate).

    Raises:
        ValueError: for a version other than 1 or 2, a batch with fewer than 2 samples, or (v2) a model without ReLU
            modules.

    Example::

        x, _ = datamodule.sample_batch(128, split="train")
        scores = {s: naswot_score(NB201.build(s), x) for s in NB201().sample(100)}
    """
    if version not in (1, 2):
        raise ValueError(f"version={version!r} is not supported; allowed: 1 (Jacobian), 2 (Hamming kernel)")
    if arch is not None:
        from lightning_nd.nas.arch import set_arch

        set_arch(model, list(arch), allow_dead=True)
    if version == 1:
        return jacobian_score(jacobian(model, batch))
    _, logdet = torch.linalg.slogdet(hamming_kernel(model, batch))
    return float(logdet)
