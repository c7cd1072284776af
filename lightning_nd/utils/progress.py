"""Progress for long callback work (shrink steps, evolution generations, BN recalibration): never silent minutes.

Lightning's progress bar covers the training loop only; work done inside callback hooks gets its own tqdm bar
on global rank zero, and none when the trainer runs without a progress bar (tests, batch jobs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

T = TypeVar("T")


def progress(
    iterable: Iterable[T], desc: str, trainer: pl.Trainer | None = None, total: int | None = None
) -> Iterator[T]:
    """Iterate over ``iterable`` with a tqdm bar on global rank zero when the trainer shows progress.

    Example::

        for generation in progress(range(20), "evolution", trainer):
            ...
    """
    show = trainer is None or (trainer.is_global_zero and trainer.progress_bar_callback is not None)
    if not show:
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True) as bar:
        yield from bar


class VersionProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, showing the logger's whole version (``v_num=search``, not the last four characters).

    ``lnd`` puts it in place of the default bar; use it in a script as ``Trainer(callbacks=[VersionProgressBar()])``.
    """

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items:
            versions = dict.fromkeys(str(logger.version) for logger in trainer.loggers if logger.version is not None)
            items["v_num"] = "_".join(versions)
        return items
