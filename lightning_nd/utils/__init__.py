"""Small shared helpers: logger-agnostic picture logging, rank-safe run directories, atomic writes, progress."""

from lightning_nd.utils.files import atomic_save, atomic_write, atomic_write_text, run_dir
from lightning_nd.utils.images import figure_to_array, log_image
from lightning_nd.utils.progress import progress

__all__ = ["atomic_save", "atomic_write", "atomic_write_text", "figure_to_array", "log_image", "progress", "run_dir"]
