"""One-shot NAS: ``Choice`` layers, architectures, path sampling, search spaces, angle statistics, search, scores."""

from lightning_nd.nas.arch import (
    Decision,
    alive_options,
    arch_from_json,
    arch_to_json,
    check_arch,
    decisions,
    export_subnet,
    get_arch,
    list_choices,
    set_alive,
    set_arch,
    space_size,
)
from lightning_nd.nas.choice import Choice

__all__ = [
    "Choice",
    "Decision",
    "alive_options",
    "arch_from_json",
    "arch_to_json",
    "check_arch",
    "decisions",
    "export_subnet",
    "get_arch",
    "list_choices",
    "set_alive",
    "set_arch",
    "space_size",
]
