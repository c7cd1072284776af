"""Jacobian regularisation of locuslab/deq (Bai, Koltun, Kolter, ICML 2021): the estimator and its schedule.

The auxiliary loss is the Hutchinson estimate of ``||J_f(z*)||_F^2 / d`` (:func:`jacobian_loss`, computed by a
:class:`~lightning_nd.implicit.DEQ` when its ``jac_reg`` flag is on). It is expensive (a double
backward), so locuslab/deq applies it stochastically (probability ``JAC_LOSS_FREQ`` per step), with a weight that grows
by ``+0.1`` every ``JAC_INCREMENTAL`` steps after the warm-up, switched off after ``JAC_STOP_EPOCH``, and a separate
weight during the unrolled warm-up (``PRETRAIN_JAC_LOSS_WEIGHT``). On the steps where the loss is computed the
official code also jitters the forward solver's cap, ``f_thres += randint(-RAND_F_THRES_DELTA, 2)`` (-2..+1 for the
default delta 2), so the regularised cell is not tuned to one exact number of iterations.
:class:`JacobianSchedule` reproduces all of that.

Every decision is a pure function of ``(seed, step, epoch)``, so all DDP ranks agree without communication and a
resumed run makes the same decisions. :func:`jacobian_step` applies one step of a schedule to every DEQ layer of a
network (flags, cap jitter, probe seed; restored afterwards) and collects the loss term, so that any LightningModule
(``DEQClassifier``, ``DetectionModule``) trains with the same recipe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def jacobian_loss(
    fz: torch.Tensor, z: torch.Tensor, vecs: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hutchinson estimate of ``||dfz/dz||_F^2 / fz.numel()`` with ``vecs`` Gaussian probes (double backward).

    Args:
        generator: source of the probe vectors (on ``fz``'s device); default the global RNG. A schedule passes one
            seeded by its step so that a resumed run draws the same probes.

    Example::

        z = z_star.detach().requires_grad_()
        loss = jacobian_loss(cell(z, x), z, vecs=2)
    """
    total = fz.new_zeros((), dtype=torch.float32)
    for _ in range(vecs):
        v = torch.randn(fz.shape, generator=generator, device=fz.device, dtype=fz.dtype)
        (vj,) = torch.autograd.grad(fz, z, v, create_graph=True, retain_graph=True)
        total = total + vj.float().pow(2).sum()
    return total / vecs / fz.numel()


@dataclass
class JacobianSchedule:
    """When and how strongly to apply the Jacobian-regularisation loss.

    Raises:
        ValueError: for a negative weight, increment or interval, a probability outside [0, 1], a negative stop epoch
            or cap jitter.

    Example::

        sched = JacobianSchedule(weight=2.5, prob=0.08, increment=0.1, increment_every=50_000, stop_epoch=90,
                                 cap_jitter=2)
        if sched.active(step, epoch):   # before the forward: deq.jac_reg = True; cap + sched.cap_delta(step, epoch)
            loss = loss + sched.weight_at(step, warmup=False) * deq.jac_loss
    """

    weight: float = 0.0  # base weight (JAC_LOSS_WEIGHT); 0 disables the loss
    prob: float = 1.0  # probability of computing the loss at a step (JAC_LOSS_FREQ)
    increment: float = 0.1  # added to the weight every `increment_every` steps after `start_step`
    increment_every: int = 0  # JAC_INCREMENTAL; 0 keeps the weight constant
    start_step: int = 0  # growth counts from here (locuslab: PRETRAIN_STEPS)
    stop_epoch: int | None = None  # no regularisation from this epoch on (JAC_STOP_EPOCH)
    warmup_weight: float = 0.0  # weight while the DEQ runs unrolled (PRETRAIN_JAC_LOSS_WEIGHT)
    cap_jitter: int = 0  # RAND_F_THRES_DELTA: on regularised steps the forward cap moves by -cap_jitter..+1
    seed: int = 0  # seed of the per-step coin flips and jitter (shared by all ranks)

    def __post_init__(self) -> None:
        if self.weight < 0 or self.warmup_weight < 0 or self.increment < 0:
            raise ValueError(
                f"weight={self.weight}, warmup_weight={self.warmup_weight}, increment={self.increment} must be >= 0"
            )
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"prob={self.prob} must be in [0, 1]")
        if self.increment_every < 0 or self.start_step < 0:
            raise ValueError(f"increment_every={self.increment_every}, start_step={self.start_step} must be >= 0")
        if self.stop_epoch is not None and self.stop_epoch < 0:
            raise ValueError(f"stop_epoch={self.stop_epoch} must be None or >= 0")
        if not (isinstance(self.cap_jitter, int) and self.cap_jitter >= 0):
            raise ValueError(f"cap_jitter={self.cap_jitter} must be an integer >= 0")

    def _draws(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def weight_at(self, step: int, warmup: bool = False) -> float:
        """The loss weight at optimizer step ``step`` (``warmup``: the DEQ is in its unrolled stage)."""
        if warmup:
            return self.warmup_weight
        w = self.weight
        if self.increment_every > 0 and step >= self.start_step:
            w += self.increment * ((step - self.start_step) // self.increment_every)
        return w

    def active(self, step: int, epoch: int, warmup: bool = False) -> bool:
        """Whether to compute the loss at this step: weight > 0, before ``stop_epoch``, and the step's coin flip."""
        if self.weight_at(step, warmup) <= 0:
            return False
        if self.stop_epoch is not None and epoch >= self.stop_epoch:
            return False
        if self.prob >= 1.0:
            return True
        return bool(torch.rand((), generator=self._draws(step)) < self.prob)

    def probe_seed(self, step: int) -> int:
        """Seed of the Hutchinson probe vectors at this step (2**40 away from the seeds of the coin flips)."""
        return self.seed * 1_000_003 + step + 2**40

    def cap_delta(self, step: int, epoch: int, warmup: bool = False) -> int:
        """Change of the forward solver's cap at this step: ``randint(-cap_jitter, 2)`` on regularised steps, else 0."""
        if self.cap_jitter == 0 or not self.active(step, epoch, warmup):
            return 0
        gen = self._draws(step)
        torch.rand((), generator=gen)  # the coin flip of `active` comes first in the stream
        return int(torch.randint(-self.cap_jitter, 2, (), generator=gen))


@dataclass
class JacobianStep:
    """What a :class:`JacobianSchedule` decided for one training step, and the loss it produced.

    Attributes:
        active: whether the Jacobian loss is computed at this step.
        weight: the schedule's weight at this step (``weight_at``), 0.0 when inactive.
        cap_delta: the forward-cap jitter applied to every DEQ layer at this step.
        probe_seed: seed of the Hutchinson probes at this step.
        loss: the summed (unweighted) Jacobian loss of the network's DEQ layers, set when the ``with`` block of
            :func:`jacobian_step` ends; None on inactive steps or when no layer computed one (eval, no grad).

    Example::

        with jacobian_step(net, schedule, step, epoch) as jac:
            loss = criterion(net(x), y)
        if jac.loss is not None:
            loss = loss + jac.weight * jac.loss
    """

    active: bool
    weight: float
    cap_delta: int
    probe_seed: int
    loss: torch.Tensor | None = None


@contextmanager
def jacobian_step(
    net: nn.Module, schedule: JacobianSchedule, step: int, epoch: int, warmup: bool | None = None
) -> Iterator[JacobianStep]:
    """Apply one step of ``schedule`` to every DEQ layer of ``net`` for the duration of the ``with`` block.

    On entry every DEQ layer gets ``jac_reg`` (the step's coin flip), and lightning_nd DEQs also the forward-cap
    jitter (``f_max_iter_delta``) and the seed of the Hutchinson probes (``jac_probe_seed``); on exit, even after an
    exception, they are reset to off / 0 / None and the layers' Jacobian losses are summed into the yielded
    :class:`JacobianStep` (``loss``, only on active steps). Every decision is a function of ``(schedule.seed, step,
    epoch)``: pass the optimizer step (``trainer.global_step``) so a resumed run repeats the uninterrupted one.

    Args:
        net: the network whose DEQ layers (:func:`~lightning_nd.implicit.find_deqs`) are regularised.
        schedule: weight, probability, growth, stop epoch and cap jitter.
        step: the global optimizer step.
        epoch: the current epoch (for ``stop_epoch``).
        warmup: whether the DEQs run unrolled (the schedule's ``warmup_weight`` applies); default: whether any
            layer has ``mode == "unrolled"`` (set by ``DEQWarmup``).

    Yields:
        The step's :class:`JacobianStep`; its ``loss`` is filled in when the block ends.

    Raises:
        ValueError: if ``net`` contains no DEQ layer.

    Example::

        with jacobian_step(model, JacobianSchedule(weight=0.5, prob=0.1, cap_jitter=2), step, epoch) as jac:
            loss = criterion(model(x), y)
        if jac.loss is not None:
            loss = loss + jac.weight * jac.loss
        loss.backward()
    """
    from lightning_nd.implicit.deq import find_deqs  # deq.py imports this module: import late to avoid a cycle

    deqs = [m for _, m in find_deqs(net)]
    if not deqs:
        raise ValueError(f"jacobian_step needs a network with at least one DEQ layer; {type(net).__name__} has none")
    if warmup is None:
        warmup = any(m.mode == "unrolled" for m in deqs)
    active = schedule.active(step, epoch, warmup)
    record = JacobianStep(
        active=active,
        weight=schedule.weight_at(step, warmup) if active else 0.0,
        cap_delta=schedule.cap_delta(step, epoch, warmup),
        probe_seed=schedule.probe_seed(step),
    )
    for m in deqs:
        m.jac_reg = active
        if hasattr(m, "f_max_iter_delta"):  # lightning_nd DEQ (other layers only follow the jac_reg protocol)
            m.f_max_iter_delta, m.jac_probe_seed = record.cap_delta, record.probe_seed
    try:
        yield record
    finally:
        for m in deqs:
            m.jac_reg = False
            if hasattr(m, "f_max_iter_delta"):
                m.f_max_iter_delta, m.jac_probe_seed = 0, None
    losses = [m.jac_loss for m in deqs if getattr(m, "jac_loss", None) is not None]
    if active and losses:
        record.loss = torch.stack([j.float() for j in losses]).sum()


# DEQClassifier and DetectionModule save their schedule among their hyperparameters: allow it in torch.load's default weights_only mode,
# or resuming a checkpoint (Trainer.fit(ckpt_path=...)) fails with an UnpicklingError
torch.serialization.add_safe_globals([JacobianSchedule])
