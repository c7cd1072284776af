"""Implicit (equilibrium) models: fixed-point solvers, the ``DEQ`` layer, MDEQ and the implicit FPN."""

from lightning_nd.implicit.deq import DEQ, DEQConfig, DEQStats, find_deqs
from lightning_nd.implicit.ifpn import ImplicitFPN
from lightning_nd.implicit.jacobian import JacobianSchedule, JacobianStep, jacobian_loss, jacobian_step
from lightning_nd.implicit.mdeq import MDEQ, MDEQBlock, MDEQCell
from lightning_nd.implicit.norm import VariationalDropout, apply_weight_norm, reset_dropout
from lightning_nd.implicit.solvers import (
    SOLVERS,
    SolverStats,
    anderson,
    broyden,
    fixed_point,
    get_solver,
    register_solver,
    solve,
    solver_options,
)
from lightning_nd.implicit.structure import flatten, spec_of, unflatten, zeros_like_state

__all__ = [
    "DEQ",
    "SOLVERS",
    "DEQConfig",
    "DEQStats",
    "ImplicitFPN",
    "JacobianSchedule",
    "JacobianStep",
    "MDEQ",
    "MDEQBlock",
    "MDEQCell",
    "SolverStats",
    "VariationalDropout",
    "anderson",
    "apply_weight_norm",
    "broyden",
    "find_deqs",
    "fixed_point",
    "flatten",
    "get_solver",
    "jacobian_loss",
    "jacobian_step",
    "register_solver",
    "reset_dropout",
    "solve",
    "solver_options",
    "spec_of",
    "unflatten",
    "zeros_like_state",
]
