"""The standalone network of a searched architecture, built from scratch for retraining.

A search ends with an ``arch.json`` (written by :class:`~lightning_nd.callbacks.EvolutionSearch`): the best
architecture as op names per decision. :class:`Subnet` rebuilds the space by name, checks the file against it, keeps
only the chosen ops (:func:`~lightning_nd.nas.export_subnet`) and re-initialises every weight, so that a retrain
config can hand it to ``ImageClassifier`` as a plain model::

    model:
      class_path: lightning_nd.modules.ImageClassifier
      init_args:
        model:
          class_path: lightning_nd.nas.subnet.Subnet
          init_args: {space: nb201, arch: runs/rlnas_nb201/arch.json, num_classes: 10}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_nd.nas.arch import arch_from_json, arch_to_json, export_subnet


class Subnet(nn.Module):
    """A searched architecture of a named space, as a standalone network trained from scratch.

    Args:
        space: the space's registered name (``"nb201"``, ``"shufflenet"``, ``"mobilenet"`` or a user space).
        arch: the architecture: a path to an ``arch.json`` (its ``"best"`` entry is used), a dict in the
            :func:`~lightning_nd.nas.arch_to_json` format, a list of candidate indices, or, for ``nb201``, an official
            NAS-Bench-201 cell string.
        num_classes: classifier outputs.
        space_kwargs: further arguments of the space (``in_chans``, input size, width, ...; also accepted as keyword
            arguments). The decisions must be the search's: e.g. nb201 cells searched at ``C=8, N=1`` are retrained
            at the benchmark's ``C=16, N=5`` (same 6 decisions), but a ShuffleNet with other stage repeats is
            another space.
        seed: seed of the fresh initialisation, drawn from a private RNG (``None``: the global RNG).

    Raises:
        ValueError: when the architecture does not fit the space (other decisions, an unknown op, a wrong length),
            naming what differs; ``FileNotFoundError`` for a missing file.

    Example::

        net = Subnet("nb201", "runs/rlnas/arch.json", num_classes=10, space_kwargs={"C": 16, "N": 5})
        net.arch_json()  # {"arch": [...], "ops": {"1<-0": "nor_conv_3x3", ...}}
    """

    def __init__(
        self,
        space: str,
        arch: str | Path | dict | list[int],
        num_classes: int = 10,
        space_kwargs: dict[str, Any] | None = None,
        seed: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from lightning_nd.nas.spaces import build_space

        space_kwargs = {**(space_kwargs or {}), **kwargs}
        with torch.random.fork_rng(devices=[], enabled=seed is not None):  # the global RNG is left untouched
            if seed is not None:
                torch.manual_seed(seed)
            supernet = build_space(space, num_classes=num_classes, **space_kwargs)
            self.space, self.space_kwargs = space, dict(space_kwargs)
            self.arch = _decode(supernet, space, arch)
            self.description = arch_to_json(supernet, self.arch)
            self.net = export_subnet(supernet, self.arch, inherit_weights=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def arch_json(self) -> dict[str, Any]:
        """The architecture with its op names (the ``arch_to_json`` format)."""
        return dict(self.description)

    def extra_repr(self) -> str:
        return f"space={self.space!r}, arch={self.arch}"


def _decode(supernet: nn.Module, space: str, arch: str | Path | dict | list[int]) -> list[int]:
    if isinstance(arch, (list, tuple)):
        from lightning_nd.nas.arch import check_arch

        arch = [int(i) for i in arch]
        check_arch(supernet, arch, allow_dead=True)
        return arch
    if isinstance(arch, str) and arch.strip().startswith("|") and space == "nb201":
        from lightning_nd.nas.spaces.nb201 import str_to_arch

        return str_to_arch(arch)
    if isinstance(arch, (str, Path)):
        path = Path(arch)
        if not path.is_file():
            raise FileNotFoundError(f"architecture file {str(path)!r} not found (expected an arch.json from a search)")
        try:
            arch = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(arch, dict):
        raise ValueError(f"cannot read an architecture from a {type(arch).__name__}")
    try:
        return arch_from_json(supernet, arch)
    except ValueError as err:
        raise ValueError(f"the architecture does not fit the {space!r} space built with these arguments: {err}") from err
