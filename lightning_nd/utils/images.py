"""Log a picture to whatever loggers are active.

Lightning has no common image API: wandb has ``log_image``, TensorBoard has ``add_image``, and a CSV-only
run has nowhere to put one. :func:`log_image` dispatches per logger and, for loggers without image
support, saves a PNG under ``<log_dir>/media/`` so that every run keeps its pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger


def figure_to_array(figure: Any) -> np.ndarray:
    """Render a matplotlib figure to an ``HxWx3`` uint8 array and close it."""
    import matplotlib.pyplot as plt

    figure.canvas.draw()
    rgba = np.asarray(figure.canvas.buffer_rgba())
    plt.close(figure)
    return np.ascontiguousarray(rgba[..., :3])


def _save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    from lightning_nd.utils.files import atomic_write

    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def log_image(trainer: pl.Trainer, key: str, image: Any, step: int | None = None) -> list[Path]:
    """Send a picture to every logger of ``trainer``; write PNGs for loggers that cannot take images.

    Call it on every rank; only global rank zero renders and writes (no collectives inside).

    Args:
        trainer: the running trainer.
        key: the picture's name, e.g. ``"nas/angle_heatmap"``; ``/`` becomes ``_`` in file names.
        image: a matplotlib figure (closed after rendering) or an ``HxWx3`` uint8 array.
        step: the step to log at; defaults to ``trainer.global_step``.

    Returns:
        The PNG files written (empty on other ranks, or when every logger took the image itself).

    Example::

        fig, ax = plt.subplots()
        ax.plot(residuals)
        log_image(trainer, "deq/residuals", fig)
    """
    if not trainer.is_global_zero:
        if hasattr(image, "canvas"):
            import matplotlib.pyplot as plt

            plt.close(image)
        return []
    array = figure_to_array(image) if hasattr(image, "canvas") else np.asarray(image, dtype=np.uint8)
    step = trainer.global_step if step is None else step
    written: list[Path] = []
    png_dirs: list[Path] = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[array], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, array, step, dataformats="HWC")
        elif logger.log_dir is not None:
            png_dirs.append(Path(logger.log_dir) / "media")
    if not trainer.loggers:
        png_dirs.append(Path(trainer.default_root_dir) / "media")
    name = f"{key.replace('/', '_')}_{step}.png"
    for folder in dict.fromkeys(png_dirs):
        written.append(_save_png(array, folder / name))
    return written
