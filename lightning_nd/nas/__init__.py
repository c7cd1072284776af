"""One-shot NAS: ``Choice`` layers, architectures, path sampling, search spaces, angle statistics, search, scores."""

from lightning_nd.nas.angle import ANGLE_PRESETS, AngleLayout, AngleStats, AngleVector
from lightning_nd.nas.arch import (
    Decision,
    alive_options,
    arch_from_json,
    arch_to_json,
    canonical_arch,
    check_arch,
    decisions,
    export_subnet,
    get_arch,
    list_choices,
    set_alive,
    set_arch,
    space_size,
    used_mask,
)
from lightning_nd.nas.bn import recalibrate_bn
from lightning_nd.nas.choice import Choice, InputChoice
from lightning_nd.nas.evolution import Evolution
from lightning_nd.nas.flops import ArchCost, CostConstraint, count_flops, count_params
from lightning_nd.nas.naswot import naswot_score
from lightning_nd.nas.sampler import PathSampler, arch_hash
from lightning_nd.nas.spaces import build_space, list_spaces, register_space
from lightning_nd.nas.subnet import Subnet

__all__ = [
    "ANGLE_PRESETS",
    "AngleLayout",
    "AngleVector",
    "AngleStats",
    "ArchCost",
    "Choice",
    "CostConstraint",
    "Decision",
    "Evolution",
    "InputChoice",
    "PathSampler",
    "Subnet",
    "alive_options",
    "arch_from_json",
    "arch_hash",
    "arch_to_json",
    "build_space",
    "canonical_arch",
    "check_arch",
    "count_flops",
    "count_params",
    "decisions",
    "export_subnet",
    "get_arch",
    "list_choices",
    "list_spaces",
    "naswot_score",
    "recalibrate_bn",
    "register_space",
    "set_alive",
    "set_arch",
    "space_size",
    "used_mask",
]
