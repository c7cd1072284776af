"""Callbacks that do the algorithm work: one callback per file, re-exported here."""

from lightning_nd.callbacks.angle_tracker import AngleTracker
from lightning_nd.callbacks.deq_monitor import DEQDivergenceError, DEQMonitor, DEQNonConvergenceError
from lightning_nd.callbacks.deq_warmup import DEQWarmup
from lightning_nd.callbacks.evolution_search import EvolutionSearch
from lightning_nd.callbacks.prediction_writer import PredictionWriter
from lightning_nd.callbacks.progressive_pruner import ProgressivePruner
from lightning_nd.callbacks.reparam_convert import ReparamConvert
from lightning_nd.callbacks.reparam_fuse import ReparamFuse

__all__ = [
    "AngleTracker",
    "DEQDivergenceError",
    "DEQMonitor",
    "DEQNonConvergenceError",
    "DEQWarmup",
    "EvolutionSearch",
    "PredictionWriter",
    "ProgressivePruner",
    "ReparamConvert",
    "ReparamFuse",
]
