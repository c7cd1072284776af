"""Writing and reading deploy models: a self-contained program plus a weights-only file.

:func:`save_deploy` writes two files:

* ``deploy.pt2``: the fused model as a ``torch.export`` program (``torch.export.save``; a dynamic batch dimension and,
  by default, dynamic height and width where the model allows: ``Dim.AUTO`` keeps a size static only when the model
  fixes it, e.g. a ``Flatten -> Linear`` head),
  loadable in any process with only torch installed - no training code, no lightning_nd, no user classes
  (``torch.export.load(path).module()``). If the model does not export, a traced TorchScript module is written
  instead (with a warning); it loads the same way through :func:`load_deploy`.
* ``deploy_weights.pt``: the fused ``state_dict`` (``module.`` prefixes stripped), the fusion report and whether BNs
  were folded; plain tensors and JSON-like values, so ``torch.load(weights_only=True)`` reads it. Its keys are the
  *deploy* keys (``layer1.0.conv1.reparam_conv.weight``): they load into a training-form model only after that model is
  fused the same way (``load_deploy(weights_path, model=train_form)``, strictly; ``strict=False`` would hide
  mismatches, DingXiaoH/RepVGG#35).

Writes are atomic (a temporary file renamed into place).

Example::

    save_deploy(fused, "deploy.pt2", example_input=x, report={"max_rel_error": 3e-7})
    net = load_deploy("deploy.pt2")                              # in any process: a GraphModule, eval semantics
    net = load_deploy("deploy_weights.pt", model=RepVGG())       # fuse a fresh train form, load the weights strictly
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_nd.reparam.protocol import FOLDED_MARK, reparameterize_model
from lightning_nd.utils import atomic_save, atomic_write

__all__ = ["FORMAT", "deploy_kind", "load_deploy", "read_report", "save_deploy", "weights_path"]

FORMAT = "lightning_nd.deploy/2"


def _strip_prefix(state: dict[str, Any], prefix: str = "module.") -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def weights_path(path: str | os.PathLike) -> Path:
    """The weights-only file written beside the program at ``path``: ``deploy.pt2`` -> ``deploy_weights.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_weights.pt")


def _batch(example_input: Any) -> tuple:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    # a batch of 1 would be specialised to a constant size by torch.export: export with two samples
    return tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.shape[:1] == (1,) else a for a in args)


def _dynamic_dims(arg: Any, dynamic_hw: bool) -> dict[int, Any] | None:
    """``{0: AUTO}`` (batch), plus the last two dims of an image-like (4-D) tensor when ``dynamic_hw``."""
    if not isinstance(arg, torch.Tensor) or arg.dim() == 0:
        return None
    dims = {0: torch.export.Dim.AUTO}
    if dynamic_hw and arg.dim() == 4:
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    return dims


def _size_oblivious() -> Any:
    """A context in which export does not specialise sizes that happen to be 1 in the example (a 16x16 digit's last
    ResNet stage is 1x1, which would otherwise cap H and W at 16); a no-op where torch lacks the switch."""
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(fx_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


def _same(a: Any, b: Any) -> bool:
    """Equal up to torch.testing's default tolerance for the dtype (the same graph, maybe other kernels)."""
    try:
        torch.testing.assert_close(a, b)
    except (AssertionError, TypeError, ValueError):
        return False
    return True


def _export(model: nn.Module, args: tuple, dynamic_hw: bool) -> torch.export.ExportedProgram:
    """Export with a dynamic batch (and H/W); the program must reproduce the model on the example, else the next,
    more static, option is taken."""
    expected = model(*args)
    attempts = [(True, True), (True, False), (False, False)] if dynamic_hw else [(False, False)]
    error: Exception | None = None
    for hw, oblivious in attempts:
        dims = tuple(_dynamic_dims(a, hw) for a in args)
        try:
            with _size_oblivious() if oblivious else contextlib.nullcontext():
                program = torch.export.export(model, args, dynamic_shapes=dims)
            if _same(program.module()(*args), expected):
                return program
        except Exception as caught:  # a model that fixes H/W (or a torch without the switch): try the next option
            error = caught
    if error is not None:
        raise error
    raise RuntimeError("save_deploy: the exported program does not reproduce the model on the example input")


def _export_program(model: nn.Module, args: tuple, tmp: str, dynamic_hw: bool = True) -> None:
    program = _export(model, args, dynamic_hw)
    buffer = io.BytesIO()  # torch.export.save wants a .pt2 name; the temporary file has another
    torch.export.save(program, buffer)
    Path(tmp).write_bytes(buffer.getvalue())


def save_deploy(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Any = None,
    report: dict[str, Any] | None = None,
    fold_bn: bool | None = None,
    dynamic_hw: bool = True,
) -> Path:
    """Atomically write the fused ``model`` as a self-contained program at ``path`` and its weights beside it.

    Args:
        model: the deploy model (already fused); it is exported in eval mode, its flags are restored afterwards.
        path: the program file (``.pt2``, torch.export's convention); the weights go to :func:`weights_path`.
        example_input: a sample input (or tuple of inputs) to export with; its batch dimension is left dynamic.
            Without it only the weights file is written (with a warning) and its path is returned.
        report: JSON-like facts stored with the weights (errors, parameter counts, ...).
        fold_bn: whether conv -> BN pairs were folded, so :func:`load_deploy` can rebuild the same form; ``None``
            (default) reads it from the model (``reparameterize_model(..., fold_bn=True)`` marks what it returns).
        dynamic_hw: export height and width of 4-D inputs as dynamic (kept static where the model fixes them);
            ``False`` fixes them to the example's.

    Returns:
        ``path``; the weights file's path when there was no ``example_input`` or the model neither exports nor
        traces (each with a warning).
    """
    path = Path(path)
    if fold_bn is None:
        fold_bn = bool(getattr(model, FOLDED_MARK, False))
    state = _strip_prefix({k: v.detach().cpu() for k, v in model.state_dict().items()})
    payload = {"format": FORMAT, "state_dict": state, "report": dict(report or {}), "fold_bn": fold_bn}
    atomic_save(payload, weights_path(path))
    if example_input is None:
        warnings.warn(f"save_deploy: no example_input, so no self-contained program; wrote {weights_path(path)} only",
                      UserWarning, stacklevel=2)
        return weights_path(path)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    args = _batch(example_input)
    try:
        with torch.no_grad():
            try:
                atomic_write(path, lambda tmp: _export_program(model, args, tmp, dynamic_hw))
            except Exception as error:  # any export failure: fall back to TorchScript
                warnings.warn(f"save_deploy: torch.export failed ({type(error).__name__}: {error}); writing a traced "
                              "TorchScript module instead", UserWarning, stacklevel=2)
                try:
                    traced = torch.jit.trace(model, args)
                    atomic_write(path, lambda tmp: torch.jit.save(traced, tmp))
                except Exception as again:  # the weights file stands on its own
                    warnings.warn(f"save_deploy: TorchScript tracing failed too ({type(again).__name__}: {again}); "
                                  f"only {weights_path(path)} was written", UserWarning, stacklevel=2)
                    return weights_path(path)
    finally:
        for module, mode in modes.items():
            module.training = mode
    return path


def deploy_kind(path: str | os.PathLike) -> str:
    """``"program"`` (torch.export), ``"torchscript"`` or ``"weights"`` (torch.save), read from the archive layout.

    Raises:
        ValueError: for a file that is none of them.
    """
    try:
        names = zipfile.ZipFile(path).namelist()
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a deploy file (not a torch archive)") from error
    if any(n.endswith("/archive_format") for n in names):
        return "program"
    if any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        return "weights"
    raise ValueError(f"{path} is not a deploy file (unknown archive layout)")


def load_deploy(
    path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """The deploy model stored at ``path`` by :func:`save_deploy` or ``ReparamFuse``.

    Needs neither the training code nor the user's classes for a program file: the returned module is a
    ``torch.fx.GraphModule`` with inference semantics baked in (``.eval()`` is not supported on it and not needed).

    Args:
        path: the program (``deploy.pt2``), a TorchScript file, or the weights-only file (``deploy_weights.pt``).
        model: a training-form model of the same architecture, for the weights file: a copy is fused like the
            stored model and the weights are loaded into it strictly. Not needed for a program file.
        map_location: device to load onto.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not a deploy file, or a weights file comes without ``model``.
        RuntimeError: when ``model``'s fused form does not match the stored keys or shapes (strict load).

    Example::

        net = load_deploy("runs/x/deploy.pt2")
        logits = net(images)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no deploy model at {path}")
    kind = deploy_kind(path)
    if kind == "program":
        module = torch.export.load(str(path) if path.suffix == ".pt2" else io.BytesIO(path.read_bytes())).module()
        return module if str(map_location) == "cpu" else module.to(map_location)
    if kind == "torchscript":
        return torch.jit.load(str(path), map_location=map_location).eval()
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lightning_nd deploy weights file (expected format {FORMAT!r})")
    if model is None:
        raise ValueError(
            f"{path} holds weights only: pass model= (the training-form architecture) to fuse and load them, or "
            "load the self-contained program written beside it"
        )
    fold = bool(payload.get("fold_bn", False))
    fused = reparameterize_model(model, fold_bn=fold)
    stored, ours = set(payload["state_dict"]), set(fused.state_dict())
    if stored != ours:
        missing, unexpected = sorted(ours - stored), sorted(stored - ours)
        raise RuntimeError(
            f"load_deploy: {path} does not fit {type(model).__name__} fused with fold_bn={fold} (as recorded in the "
            f"file): {len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:3]}); pass the training-form model of the architecture that was saved"
        )
    fused.load_state_dict(payload["state_dict"], strict=True)
    return fused.to(map_location).eval()


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The fusion report stored in a weights file (pass the weights file or the program beside it)."""
    path = Path(path)
    if deploy_kind(path) != "weights":
        path = weights_path(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return dict(payload.get("report", {}))
