"""``DEQClassifier``: an image classifier whose network contains equilibrium (DEQ) layers.

The task logic is :class:`~lightning_nd.modules.ImageClassifier`'s (cross-entropy, accuracy metrics, optimizer
wiring); this module adds the Jacobian-regularisation loss of its DEQ layers on the steps a
:class:`~lightning_nd.implicit.JacobianSchedule` selects, and on those steps moves the forward solver's cap by the
schedule's seeded jitter (locuslab/deq ``RAND_F_THRES_DELTA``), through
:func:`~lightning_nd.implicit.jacobian.jacobian_step` (shared with ``DetectionModule``). Every decision and the
Hutchinson probe vectors are functions of the global step and the schedule's seed, so DDP ranks agree and a resumed
run repeats the uninterrupted one. Validation and test run under Lightning's default ``inference_mode``: the DEQ's
forward needs no autograd outside training (the solver runs without a graph and the final application is a plain
call). Solver statistics are logged by the ``DEQMonitor`` callback, the unrolled warm-up is switched by
``DEQWarmup``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from lightning_nd.implicit import MDEQ, DEQConfig, JacobianSchedule, find_deqs
from lightning_nd.implicit.jacobian import jacobian_step
from lightning_nd.modules.classifier import ImageClassifier


class DEQClassifier(ImageClassifier):
    """Train a network with DEQ layers (by default an :class:`~lightning_nd.implicit.MDEQ`) as a classifier.

    Logs what :class:`ImageClassifier` logs, plus ``train/jac_loss`` and ``train/jac_weight`` on regularised steps.

    Args:
        model: the network (must contain at least one :class:`~lightning_nd.implicit.DEQ`); default an ``MDEQ``
            built from ``num_classes``, ``in_chans`` and ``model_kwargs``.
        num_classes: classes of the task.
        in_chans: input channels (for the default MDEQ).
        label_smoothing: cross-entropy label smoothing in [0, 1).
        optimizer: callable taking the parameters; default SGD (``default_optimizer``).
        lr_scheduler: callable taking the optimizer, stepped every epoch.
        model_kwargs: keyword arguments of the default ``MDEQ`` (channels, widths, ...).
        jac_reg: the Jacobian-regularisation schedule (weight, probability, growth, stop epoch, forward-cap jitter);
            default off (the shipped configs turn it on).
        deq: the default ``MDEQ``'s solver options (:class:`~lightning_nd.implicit.DEQConfig`). A typed argument, so
            the CLI overrides one field and keeps the others (``--model.deq.f_max_iter 12``); inside the plain dict
            ``model_kwargs`` such an override would replace the whole ``deq`` dict. ``model_kwargs["deq"]`` is
            still accepted when this is not given.

    Raises:
        ValueError: if the network contains no DEQ layer or a DEQ layer built with ``jac_reg=True`` (the schedule
            decides), if ``model_kwargs`` or ``deq`` come with a given ``model``, if the DEQ options are given both
            as ``deq`` and as ``model_kwargs["deq"]``, and for the :class:`ImageClassifier` errors.

    Example::

        model = DEQClassifier(num_classes=10, in_chans=1, model_kwargs={"channels": [8, 16], "head_channels": [4, 8]},
                              deq=DEQConfig(f_max_iter=12, f_tol=2e-2, f_stop_mode="rel"),
                              jac_reg=JacobianSchedule(weight=0.5, prob=0.2))
        trainer = Trainer(callbacks=[DEQMonitor(), DEQWarmup(warmup_steps=200)])
        trainer.fit(model, datamodule=FashionMNISTDataModule())
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        num_classes: int = 10,
        in_chans: int = 3,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        model_kwargs: dict[str, Any] | None = None,
        jac_reg: JacobianSchedule | None = None,
        deq: DEQConfig | None = None,
    ) -> None:
        if model is None:
            kwargs = dict(model_kwargs or {})
            if deq is not None:
                if "deq" in kwargs:
                    raise ValueError("the DEQ options are given twice, as deq and as model_kwargs['deq']; keep one")
                kwargs["deq"] = deq
            model = MDEQ(num_classes=num_classes, in_chans=in_chans, **kwargs)
        elif model_kwargs or deq is not None:
            raise ValueError("model_kwargs and deq only apply to the default MDEQ; configure the given model directly")
        super().__init__(model, num_classes, in_chans, label_smoothing, optimizer, lr_scheduler)
        deqs = find_deqs(self.net)
        if not deqs:
            raise ValueError(f"DEQClassifier needs a network with at least one DEQ layer; {type(model).__name__} has none")
        flagged = [name for name, m in deqs if m.jac_reg]
        if flagged:  # the schedule below sets the flags per step: a flag set on the layer would be silently overridden
            raise ValueError(
                f"DEQ layer(s) {flagged} were built with jac_reg=True, which DEQClassifier overrides every step; "
                "configure the regularisation with DEQClassifier(jac_reg=JacobianSchedule(weight=..., prob=...))"
            )
        self.jac_schedule = jac_reg if jac_reg is not None else JacobianSchedule()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        with jacobian_step(self.net, self.jac_schedule, self.global_step, self.current_epoch) as jac:
            loss = self._step(batch, "train")
        if jac.loss is not None:
            self.log("train/jac_loss", jac.loss.detach(), on_step=True, on_epoch=True)
            self.log("train/jac_weight", jac.weight, on_step=True, on_epoch=False)
            loss = loss + jac.weight * jac.loss
        return loss
