"""Writing and reading deploy models: one file holding the fused module, its state dict and the fusion report.

Deploy state dicts are not key-compatible with the training form (timm repvgg_a0: 351 keys -> 46), so a deploy model
is saved on its own and loaded either whole (:func:`load_deploy`) or into a fresh training-form model that is fused
first and then loaded *strictly* (``load_deploy(path, model=train_form)``); ``strict=False`` would hide mismatches
(DingXiaoH/RepVGG#35). Writes are atomic (a temporary file renamed into place).

Example::

    save_deploy(fused, "deploy.pt", report={"max_rel_error": 3e-7})
    model = load_deploy("deploy.pt")                     # the fused module, in eval mode
    model = load_deploy("deploy.pt", model=RepVGG())     # fuse a fresh train form, load the weights strictly
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_nd.reparam.protocol import reparameterize_model
from lightning_nd.utils import atomic_save

__all__ = ["FORMAT", "load_deploy", "save_deploy"]

FORMAT = "lightning_nd.deploy/1"


def _strip_prefix(state: dict[str, Any], prefix: str = "module.") -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def save_deploy(
    model: nn.Module, path: str | os.PathLike, report: dict[str, Any] | None = None, fold_bn: bool = False
) -> Path:
    """Atomically write ``model`` (already fused), its state dict and ``report`` to ``path``.

    ``fold_bn`` records whether conv -> BN pairs were folded, so :func:`load_deploy` can rebuild the same form.
    """
    state = _strip_prefix({k: v.detach().cpu() for k, v in model.state_dict().items()})
    payload = {"format": FORMAT, "model": model, "state_dict": state, "report": dict(report or {}), "fold_bn": fold_bn}
    return atomic_save(payload, path)


def load_deploy(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """The deploy model stored at ``path`` by :func:`save_deploy` or ``ReparamFuse``, in eval mode.

    The file holds a pickled module (``torch.load(weights_only=False)``): load only files you trust.

    Args:
        path: a file written by :func:`save_deploy` (``.pt``), or a TorchScript file (``.ts``) from ``ReparamFuse``.
        model: optional training-form model of the same architecture: it is fused (a copy) and the stored weights
            are loaded into it strictly; without it the pickled module is returned (its classes must be importable).
        map_location: device to load onto.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a lightning_nd deploy file.
        RuntimeError: when ``model``'s fused form does not match the stored keys or shapes (strict load).

    Example::

        net = load_deploy("runs/x/deploy.pt")
        logits = net(images)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no deploy model at {path}")
    if path.suffix == ".ts":
        return torch.jit.load(str(path), map_location=map_location).eval()
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lightning_nd deploy file (expected format {FORMAT!r})")
    if model is None:
        return payload["model"].eval()
    fused = reparameterize_model(model, fold_bn=payload.get("fold_bn", False))
    fused.load_state_dict(payload["state_dict"], strict=True)
    return fused.to(map_location).eval()


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The fusion report stored with a deploy model."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    return dict(payload.get("report", {}))
