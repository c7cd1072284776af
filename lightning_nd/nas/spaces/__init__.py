"""Search spaces built by name: ``build_space("nb201" | "shufflenet" | "mobilenet" | "darts", **kw)``.

Every space accepts ``num_classes``, ``in_chans`` and ``input_size``; register your own with
:func:`register_space` so configs can name it (``SupernetModule(supernet="myspace")``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_nd.nas.spaces.darts import DartsSupernet
from lightning_nd.nas.spaces.mobilenet import MOBILENET_OPS, MobileNetSupernet
from lightning_nd.nas.spaces.nb201 import NB201_OPS, NB201Supernet, arch_to_str, str_to_arch
from lightning_nd.nas.spaces.shufflenet import SHUFFLENET_OPS, ShuffleNetSupernet

_SPACES: dict[str, Callable[..., nn.Module]] = {
    "nb201": NB201Supernet,
    "shufflenet": ShuffleNetSupernet,
    "mobilenet": MobileNetSupernet,
    "darts": DartsSupernet,
}


def register_space(name: str, builder: Callable[..., nn.Module], overwrite: bool = False) -> None:
    """Make ``builder(**kw)`` available as ``build_space(name, **kw)``.

    Raises:
        ValueError: when ``name`` is taken and ``overwrite`` is False.
    """
    if name in _SPACES and not overwrite:
        raise ValueError(f"search space {name!r} is already registered; pass overwrite=True to replace it")
    _SPACES[name] = builder


def list_spaces() -> list[str]:
    """Names accepted by :func:`build_space`."""
    return sorted(_SPACES)


def build_space(name: str, **kwargs: Any) -> nn.Module:
    """Build a supernet by name.

    Raises:
        ValueError: for an unknown name (listing the known ones), or keyword arguments the space does not take
            (listing the ones it takes).

    Example::

        net = build_space("nb201", num_classes=10, C=4, N=1)
    """
    if name not in _SPACES:
        raise ValueError(f"unknown search space {name!r}; known: {list_spaces()}")
    builder = _SPACES[name]
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ValueError(f"search space {name!r} takes no argument(s) {unknown}; it takes {list(params)}")
    return builder(**kwargs)


__all__ = [
    "DartsSupernet",
    "MOBILENET_OPS",
    "NB201_OPS",
    "SHUFFLENET_OPS",
    "MobileNetSupernet",
    "NB201Supernet",
    "ShuffleNetSupernet",
    "arch_to_str",
    "build_space",
    "list_spaces",
    "register_space",
    "str_to_arch",
]
