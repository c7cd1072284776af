"""Small shared helpers: logger-agnostic picture logging, rank-safe run directories, atomic writes, progress,
readable errors, and metrics that survive a resume."""

from lightning_nd.utils.errors import explain_parser_error, format_user_error, is_user_error, traceback_wanted
from lightning_nd.utils.files import atomic_save, atomic_write, atomic_write_text, run_dir
from lightning_nd.utils.images import figure_to_array, log_image
from lightning_nd.utils.progress import VersionProgressBar, progress
from lightning_nd.utils.resume import KeepMetricsOnResume

__all__ = [
    "KeepMetricsOnResume",
    "VersionProgressBar",
    "atomic_save",
    "atomic_write",
    "atomic_write_text",
    "explain_parser_error",
    "figure_to_array",
    "format_user_error",
    "is_user_error",
    "log_image",
    "progress",
    "run_dir",
    "traceback_wanted",
]
