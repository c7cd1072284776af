"""Where a run writes its outputs, and how: atomically, so an interrupted write never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


def run_dir(trainer: pl.Trainer) -> Path:
    """The run directory every rank agrees on: the logger's versioned folder, else ``default_root_dir``.

    Decided on rank 0 and broadcast, because loggers may compute their version differently per rank.
    A collective: call it on every rank at the same point.
    """
    path = trainer.log_dir if trainer.log_dir is not None else trainer.default_root_dir
    path = trainer.strategy.broadcast(str(path), src=0)
    return Path(path)


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions a plain open() would
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the target folder, then rename it into place."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write text to a temporary file in the target folder, then rename it into place."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
