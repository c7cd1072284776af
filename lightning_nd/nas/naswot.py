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
on the same minibatch. Cells that disconnect input from output give ``NaN`` (v1) or a degenerate score; rank them
last (``nanargmax``).

Functional activations. The official code hooks modules only, so a network written with ``torch.relu`` / ``F.relu``
gets the same kernel for every architecture and the search picks by tie-break. Here v2 also counts the functional
ReLU family (``F.relu``, ``torch.relu``, ``Tensor.relu``, ``F.relu6``, ``F.leaky_relu``, ``F.rrelu`` and their in-place
forms) called outside a hooked module, caught with a ``TorchFunctionMode``; a network with ``nn.ReLU`` modules only
scores exactly as before (the calls inside a hooked module are not counted twice). ``functional=False`` is the
official module-only rule. A forward in which no ReLU ran raises instead of returning a constant score.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

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


FUNCTIONAL_RELUS = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6, F.leaky_relu,
    F.leaky_relu_, F.rrelu, F.rrelu_,
})


class _FunctionalReLUs(TorchFunctionMode):
    """Calls ``on_input(x)`` for every functional ReLU-family call made outside a hooked ReLU module."""

    def __init__(self, on_input: Callable[[torch.Tensor], None], inside_module: list[int]) -> None:
        super().__init__()
        self.on_input, self.inside_module = on_input, inside_module

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in FUNCTIONAL_RELUS and not self.inside_module[0] and args and isinstance(args[0], torch.Tensor):
            self.on_input(args[0])
        return func(*args, **(kwargs or {}))


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


def hamming_kernel(model: nn.Module, batch: Any, functional: bool = True) -> torch.Tensor:
    """The v2 kernel ``K`` (float64, ``B x B``) of ``model`` on ``batch``: per pair, the ReLU units that agree.

    Args:
        model: the network.
        batch: the minibatch (tensor or ``(x, y)``).
        functional: also count functional ReLUs called outside ReLU modules (see the module docstring);
            ``False``: modules only, as the official code.

    Raises:
        ValueError: when no ReLU ran in the forward (no ReLU module, and no functional ReLU when ``functional``),
            or the batch is unusable.
    """
    x = _inputs(batch)
    hooked = relu_modules(model)
    if not hooked and not functional:
        raise ValueError(
            f"{type(model).__name__} has no ReLU modules: NASWOT v2 with functional=False has nothing to hook"
        )
    n = x.shape[0]
    counted = [0]
    inside_module = [0]
    kernel = torch.zeros(n, n, dtype=torch.float64, device=x.device)

    seen: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def add(inp: torch.Tensor) -> None:
        inp = inp.detach()
        # Several ReLUs often read the same tensor (every NB201 edge leaving a node): count each module, as the
        # official code does, but compute a tensor's contribution once. The cache holds the tensor, so its
        # address cannot be reused while the key lives; only the last few tensors are kept.
        key = (inp.data_ptr(), inp.storage_offset(), tuple(inp.shape), inp.stride(), inp._version)
        if key not in seen:
            seen[key] = (inp, _hamming_term(inp.reshape(n, -1)))
            if len(seen) > 8:
                seen.popitem(last=False)
        kernel.add_(seen[key][1])
        counted[0] += 1

    def enter(module: nn.Module, args: tuple) -> None:
        add(args[0])
        inside_module[0] += 1  # the module's own F.relu call is not counted a second time

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        inside_module[0] -= 1

    handles = []
    try:
        with _Preserve(model), torch.no_grad():
            if _unchecked_choices(model):
                model(x)  # Choice runs every candidate on its first forward (a shape check): keep it out of K
            for m in hooked:
                handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
            if functional:
                with _FunctionalReLUs(add, inside_module):
                    model(x)
            else:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    if not counted[0]:
        raise ValueError(
            f"no ReLU ran in the forward of {type(model).__name__}: NASWOT v2 reads the binary codes of ReLU inputs "
            "(nn.ReLU-family modules, or F.relu / torch.relu calls with functional=True); other activations "
            "(GELU, SiLU, ...) give it nothing to score"
        )
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


def naswot_score(
    model: nn.Module, batch: Any, version: int = 2, arch: Sequence[int] | None = None, functional: bool = True
) -> float:
    """Score an untrained network (or one supernet path) on one minibatch; higher is better.

    Args:
        model: any ``nn.Module``: a standalone subnet or a supernet with ``Choice`` layers.
        batch: the minibatch, a tensor or an ``(x, y)`` tuple (labels unused); use the same one for every candidate.
            The paper uses 128 samples for v2 and 256 for v1.
        version: 2 (Hamming-kernel log-determinant) or 1 (Jacobian correlation).
        arch: for a supernet, the path to score (set with ``set_arch`` first); ``None`` scores the active path.
        functional: v2 also counts functional ReLUs (``F.relu``, ``torch.relu``, ...) called outside ReLU modules;
            ``False`` hooks modules only, as the official code (a functional-ReLU network then cannot be scored).

    Returns:
        The score as a Python float (``log|det K|`` for v2; ``NaN`` for v1 when the Jacobian is degenerate).

    Raises:
        ValueError: for a version other than 1 or 2, a batch with fewer than 2 samples, or (v2) a forward in which no
            ReLU ran.

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
    _, logdet = torch.linalg.slogdet(hamming_kernel(model, batch, functional))
    return float(logdet)
