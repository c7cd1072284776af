"""Progress for long callback work (shrink steps, evolution generations, BN recalibration): never silent minutes.

Lightning's progress bar covers the training loop only; work done inside callback hooks gets its own tqdm bar
on global rank zero, and none when the trainer runs without a progress bar (tests, batch jobs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import lightning.pytorch as pl

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
