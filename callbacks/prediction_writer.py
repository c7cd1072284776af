"""``PredictionWriter``: what ``trainer.predict`` returns, written to the run directory (``lnd predict`` adds it)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_nd.utils.files import atomic_save, atomic_write_text, run_dir


def _flatten(nested: Any) -> list[Any]:
    """One list of per-batch items from Lightning's ``[batch]`` or ``[[batch] per dataloader]``."""
    if nested and all(isinstance(item, list) for item in nested):
        return [item for inner in nested for item in inner]
    return list(nested)


class PredictionWriter(BasePredictionWriter):
    """Write the predictions of a ``predict`` epoch to ``<dirpath>/<filename>.pt`` and say where.

    The file holds ``{"predictions": ..., "indices": ...}``: the batch outputs concatenated along the first
    dimension when they are tensors (else the list of batch outputs) and the dataset index of every sample. A
    2-D floating output (class probabilities, as ``ImageClassifier.predict_step`` returns) is also written as
    ``<filename>.csv`` with the columns ``index, class, probability``. Under DDP every rank writes its own
    part, ``<filename>_rank<r>.pt``.

    Args:
        dirpath: output folder; default the run directory (the logger's folder, else ``default_root_dir``).
        filename: file stem.

    Raises:
        ValueError: for an empty ``filename`` or one containing a path separator.

    Example::

        trainer = Trainer(callbacks=[PredictionWriter()])
        trainer.predict(model, datamodule=dm)   # -> <run dir>/predictions.pt, predictions.csv
    """

    def __init__(self, dirpath: str | None = None, filename: str = "predictions") -> None:
        super().__init__(write_interval="epoch")
        if not filename or "/" in filename or "\\" in filename:
            raise ValueError(f"filename={filename!r} must be a plain file stem such as 'predictions'")
        self.dirpath, self.filename = dirpath, filename
        self.written: list[Path] = []

    @override
    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        folder = Path(self.dirpath) if self.dirpath is not None else run_dir(trainer)  # a collective: every rank
        stem = self.filename if trainer.world_size == 1 else f"{self.filename}_rank{trainer.global_rank}"
        outputs = _flatten(predictions)
        indices = [int(i) for batch in _flatten(batch_indices or []) for i in batch]
        if outputs and all(isinstance(out, torch.Tensor) for out in outputs):
            outputs = torch.cat([out.detach().cpu() for out in outputs])
        self.written = [atomic_save({"predictions": outputs, "indices": indices}, folder / f"{stem}.pt")]
        if isinstance(outputs, torch.Tensor) and outputs.ndim == 2 and outputs.is_floating_point():
            self.written.append(atomic_write_text(_csv(outputs, indices), folder / f"{stem}.csv"))
        rows = len(outputs)
        rank_zero_info(f"predictions ({rows} rows) written to {', '.join(str(p.resolve()) for p in self.written)}")


def _csv(probabilities: torch.Tensor, indices: list[int]) -> str:
    best, prediction = probabilities.max(dim=1)
    if len(indices) != len(prediction):
        indices = list(range(len(prediction)))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["index", "class", "probability"])
    writer.writerows(zip(indices, prediction.tolist(), (f"{p:.6g}" for p in best.tolist())))
    return text.getvalue()
