"""``ReparamFuse``: at the end of fit, build, verify and write the deploy form of the trained network.

What happens in ``on_fit_end`` (DDP is unwrapped, SyncBatchNorm reverted, the module on CPU, every checkpoint written):

1. a **deep copy** of the network is converted through the protocol (``fuse()`` -> replacement, else
   ``reparameterize()``, else ``switch_to_deploy()``; the root too; each module once), then the remaining
   conv -> BN pairs are folded (``fold_bn``); the training network is never modified;
2. both forms run **in eval mode** on a real batch (the datamodule's ``sample_batch``, else the first validation or
   training batch, else the LightningModule's ``example_input_array``, else random inputs of ``input_shape``); every
   floating-point tensor of the output (a tensor, tuple, list or dict) is compared, and the largest error relative to
   that tensor's ``max |y|`` must stay within ``rtol`` (default 1e-4 in float32, 5e-2 for bf16/fp16 weights); tied
   tensors that the fold had to copy are listed (``untied``) with a warning;
3. the report (error, parameters and BatchNorms before/after, what was converted) goes to the loggers
   (``log_metrics``), the console and ``<run dir>/reparam_report.json``;
4. rank 0 writes ``<run dir>/deploy.pt2``, a self-contained ``torch.export`` program that loads in any process without
   the training code (:func:`lightning_nd.reparam.load_deploy` or ``torch.export.load(path).module()``), and
   ``deploy_weights.pt``, the fused state dict for users who rebuild the model; optionally also TorchScript (``.ts``)
   and ONNX (``.onnx``). Writes are atomic; all ranks then meet at a barrier.

The network is the LightningModule's only child holding convolutions unless ``attr`` says otherwise (as in
:class:`~lightning_nd.callbacks.ReparamConvert`). The check restores every module's train/eval flag afterwards (a
deliberately frozen BN stays in eval mode).

The in-memory LightningModule keeps its training form during fit, because with ``ddp_spawn`` the main process only
receives the worker's weights through a ``strict=False`` load that would silently drop fused keys. With ``swap=True``,
later ``trainer.test`` / ``validate`` / ``predict`` calls fuse the network that was just loaded (the current weights
or ``ckpt_path="best"``) at the start of the loop and put the deploy form in place; the next ``setup`` puts the
training form back first, so checkpoints always load into the form they were written from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path
from typing_extensions import override

from lightning_nd.callbacks.reparam_convert import (
    AUTO,
    TRAIN_FORM,
    find_network_attr,
    resolve_network,
    restore_train_form,
    set_network,
)
from lightning_nd.reparam import count_batchnorms, reparameterize_with_stats, save_deploy
from lightning_nd.reparam.protocol import METHODS
from lightning_nd.utils import atomic_write, atomic_write_text, run_dir

EXPORTS = ("torchscript", "onnx")


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The input tensor of a batch: ``x`` of ``(x, y)``, the first tensor value of a dict, or the batch itself."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return first_tensor(batch[0])
    if isinstance(batch, dict):
        for value in batch.values():
            found = first_tensor(value)
            if found is not None:
                return found
    return None


@torch.no_grad()
def output_errors(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> list[tuple[str, float, float, float]]:
    """``(output name, max |dy|, max |y|, max |dy| / max |y|)`` for **every** floating-point tensor the reference
    returns (a tensor, or the leaves of a tuple / list / dict output), both models in eval mode.

    Every module's training flag is restored afterwards (not only the roots').

    Raises:
        RuntimeError: when the two models return different structures (other keys, another number of tensors).
    """
    modes = {m: m.training for net in (reference, candidate) for m in net.modules()}
    reference.eval()
    candidate.eval()
    try:
        out_ref, out = reference(x), candidate(x)
    finally:
        for module, mode in modes.items():
            module.training = mode
    leaves_ref, spec_ref = tree_flatten_with_path(out_ref)
    leaves, spec = tree_flatten_with_path(out)
    if spec_ref != spec:
        raise RuntimeError(f"ReparamFuse: the deploy form returns {spec}, the training form {spec_ref}")
    errors = []
    for (path, y_ref), (_, y) in zip(leaves_ref, leaves):
        if not (isinstance(y_ref, torch.Tensor) and y_ref.is_floating_point()):
            continue
        diff = (y_ref.float() - y.float()).abs().max().item() if y_ref.numel() else 0.0
        scale = y_ref.float().abs().max().item() if y_ref.numel() else 0.0
        errors.append((keystr(path) or "output", diff, scale, diff / scale if scale > 0 else diff))
    return errors


def relative_error(reference: nn.Module, candidate: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """``(max |y_ref - y|, max |y_ref|, max |y_ref - y| / max |y_ref|)`` of the worst output tensor (relative error),
    both models in eval mode; see :func:`output_errors`."""
    return _worst(output_errors(reference, candidate, x))[1:]


def _worst(errors: list[tuple[str, float, float, float]]) -> tuple[str, float, float, float]:
    """The entry of :func:`output_errors` with the largest relative error (zeros for a model without float outputs)."""
    return max(errors, key=lambda e: e[3], default=("output", 0.0, 0.0, 0.0))


class ReparamFuse(Callback):
    """Fuse the trained network into its deploy form at the end of fit; verify it; write it on rank 0.

    Args:
        attr: attribute of the LightningModule holding the network; ``"auto"`` (default) takes the only child that
            holds convolutions (``ImageClassifier``: ``net``); ``None`` fuses the whole LightningModule.
        fold_bn: also fold the conv -> BN pairs that no block covers (e.g. a plain stem).
        check: run the eval-mode equivalence check on a real batch.
        check_samples: samples in the check batch.
        rtol: largest allowed ``max |dy| / max |y|``; default 1e-4 (float32/64 weights) or 5e-2 (bf16/fp16).
        strict: raise ``RuntimeError`` when the check fails (after writing the report, before writing the model);
            ``False`` warns and writes anyway.
        save: write the deploy program (``deploy_path``, default ``<run dir>/deploy.pt2``) and its weights
            (``deploy_weights.pt`` beside it).
        deploy_path: where to write the program.
        export: also write ``"torchscript"`` (traced, ``.ts``) and/or ``"onnx"`` (``.onnx``, dynamic batch axis).
        swap: make later ``trainer.test``/``validate``/``predict`` run the deploy form (needs ``attr``).
        input_shape: ``(C, H, W)`` of random check inputs when no data is attached.
        methods: protocol method names in priority order.

    Raises:
        MisconfigurationException: for bad arguments (unknown export, non-positive ``check_samples`` or ``rtol``,
            ``swap`` without ``attr``, an unknown method) or a missing ``attr`` at setup.
        RuntimeError: at the end of fit, when ``strict`` and the deploy form differs by more than ``rtol``.

    Example::

        trainer = Trainer(callbacks=[ReparamConvert("dbb"), ReparamFuse(export=["onnx"], swap=True)])
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm, ckpt_path="best")    # runs the fused network of the best checkpoint
        deploy = load_deploy(Path(trainer.log_dir) / "deploy.pt2")     # no training code needed
    """

    def __init__(
        self,
        attr: str | None = AUTO,
        fold_bn: bool = True,
        check: bool = True,
        check_samples: int = 8,
        rtol: float | None = None,
        strict: bool = True,
        save: bool = True,
        deploy_path: str | None = None,
        export: list[Literal["torchscript", "onnx"]] | None = None,
        swap: bool = False,
        input_shape: tuple[int, ...] | None = None,
        methods: tuple[str, ...] = METHODS,
    ) -> None:
        export = list(export or [])
        bad = [e for e in export if e not in EXPORTS]
        if bad:
            raise MisconfigurationException(f"ReparamFuse(export={bad}): allowed: {', '.join(EXPORTS)}")
        if check_samples < 1:
            raise MisconfigurationException(f"ReparamFuse(check_samples={check_samples}): must be >= 1")
        if rtol is not None and not (rtol > 0 and math.isfinite(rtol)):
            raise MisconfigurationException(f"ReparamFuse(rtol={rtol}): must be a positive number")
        if swap and attr is None:
            raise MisconfigurationException("ReparamFuse(swap=True) needs attr: the network to swap on the module")
        if not methods or any(m not in METHODS for m in methods):
            raise MisconfigurationException(f"ReparamFuse(methods={methods!r}): each must be one of {METHODS}")
        self.attr, self.fold_bn, self.check, self.check_samples = attr, fold_bn, check, check_samples
        self.rtol, self.strict, self.save, self.deploy_path = rtol, strict, save, deploy_path
        self.export, self.swap, self.input_shape, self.methods = export, swap, input_shape, tuple(methods)
        self.report: dict[str, Any] | None = None
        self.deploy_file: str | None = None
        self.network_attr: str | None = None if attr == AUTO else attr  # the attribute actually used

    # ----------------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        restore_train_form(pl_module, self.network_attr)  # a swapped-in deploy net would not look like the network
        self.network_attr = find_network_attr(pl_module, self.attr, "ReparamFuse")
        if self.attr == AUTO:
            rank_zero_info(f"ReparamFuse: fusing {type(pl_module).__name__}.{self.network_attr} (attr='auto')")
        resolve_network(pl_module, self.network_attr, "ReparamFuse")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        deploy, report = self.fuse(trainer, pl_module)
        # every rank acts on rank 0's check (ranks may have checked on different batches): no rank raises alone
        report = trainer.strategy.broadcast(report, src=0)
        folder = run_dir(trainer)  # a collective: every rank
        self.report = report
        failed = report.get("passed") is False
        if trainer.is_global_zero:
            atomic_write_text(json.dumps(report, indent=2), folder / "reparam_report.json")
            if self.save and not (failed and self.strict):
                self.deploy_file = str(self._write(deploy, report, folder, trainer, pl_module))
        self.deploy_file = trainer.strategy.broadcast(self.deploy_file, src=0)
        trainer.strategy.barrier()
        if failed:
            message = (
                f"ReparamFuse: the deploy form differs from the training form by {report['max_rel_error']:.3g} "
                f"(relative to max|y|), above rtol={report['rtol']:.3g}; converted {report['converted']}, folded "
                f"{report['folded_bn']} conv -> BN pairs, {len(report['unfolded_bn'])} BNs left unfolded (the report's "
                f"'unfolded_bn' says why); a module whose fuse()/reparameterize() is not exact in eval mode is the "
                f"usual cause; see {folder / 'reparam_report.json'}"
            )
            if self.strict:
                raise RuntimeError(message + " (strict=True: no deploy model written)")
            rank_zero_warn(message)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._swap_in(trainer, pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"report": self.report, "deploy_file": self.deploy_file}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Checkpoints are written before on_fit_end, so they never hold a newer report than this callback's own.
        if self.report is None:
            self.report = state_dict.get("report")
            self.deploy_file = state_dict.get("deploy_file")

    # ---------------------------------------------------------------------------------------------- work
    def fuse(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[nn.Module, dict[str, Any]]:
        """The deploy form of the module's network (a new module) and its report; the network is untouched."""
        net = resolve_network(pl_module, self.network_attr, "ReparamFuse")
        x = self._example_input(trainer, net)
        deploy, stats = reparameterize_with_stats(
            net, fold_bn=self.fold_bn, methods=self.methods, warn=False, example_input=x
        )
        if stats.total == 0:
            rank_zero_warn(
                f"ReparamFuse: nothing to fuse in {type(net).__name__}: no module has {'/'.join(self.methods)}() "
                f"{'and no conv -> BN pair was found' if self.fold_bn else '(fold_bn=False)'}; the deploy model "
                "equals the trained one"
            )
        if stats.untied:
            rank_zero_warn(f"ReparamFuse: tied tensors folded into copies in the deploy form: {'; '.join(stats.untied)}")
        dtype = next((p.dtype for p in net.parameters()), torch.float32)
        half = dtype in (torch.float16, torch.bfloat16)
        report: dict[str, Any] = {
            "converted": dict(stats.converted),
            "folded_bn": stats.folded_bn,
            "params_train": sum(p.numel() for p in net.parameters()),
            "params_deploy": sum(p.numel() for p in deploy.parameters()),
            "batchnorms_train": count_batchnorms(net),
            "batchnorms_deploy": count_batchnorms(deploy),
            "unfolded_bn": [f"{s.bn_path}: {s.reason}" for s in stats.unfolded_bn],
            "untied": list(stats.untied),
            "dtype": str(dtype).replace("torch.", ""),
            "rtol": self.rtol if self.rtol is not None else (5e-2 if half else 1e-4),
            "global_step": trainer.global_step,
        }
        if self.check and x is not None:
            errors = output_errors(net, deploy, x)
            name, abs_err, scale, rel_err = _worst(errors)
            report.update(
                max_abs_error=abs_err, max_abs_output=scale, max_rel_error=rel_err, check_batch=list(x.shape),
                passed=bool(rel_err <= report["rtol"]), outputs_checked=len(errors),
            )
            if len(errors) > 1:  # a tuple / dict output: every tensor is checked, the worst one is reported
                report["worst_output"] = name
                report["output_rel_errors"] = {n: e for n, _, _, e in errors}
        elif self.check:
            rank_zero_warn("ReparamFuse: no batch to check with (no datamodule/dataloader, no input_shape): skipped")
        self._log(trainer, report)
        return deploy, report

    def _example_input(self, trainer: pl.Trainer, net: nn.Module) -> torch.Tensor | None:
        x = None
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "sample_batch"):
            x = first_tensor(datamodule.sample_batch(self.check_samples, "val"))
        if x is None:
            for loaders in (trainer.val_dataloaders, trainer.train_dataloader, trainer.test_dataloaders):
                loader = first_loader(loaders)
                if loader is not None:
                    x = first_tensor(next(iter(loader)))
                    if x is not None:
                        break
        example = getattr(trainer.lightning_module, "example_input_array", None) if trainer.lightning_module else None
        if x is None and isinstance(example, torch.Tensor):
            x = example
        if x is None and self.input_shape is not None:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(self.check_samples, *self.input_shape, generator=generator)
        if x is None:
            return None
        ref = next((p for p in net.parameters()), None)
        x = x[: self.check_samples]
        if ref is not None:
            x = x.to(ref.device, dtype=ref.dtype if x.is_floating_point() else x.dtype)
        return x

    def _log(self, trainer: pl.Trainer, report: dict[str, Any]) -> None:
        keys = ("max_rel_error", "max_abs_error", "params_train", "params_deploy", "batchnorms_deploy")
        metrics = {f"reparam/{k}": float(report[k]) for k in keys if k in report}
        for logger in trainer.loggers:  # pl_module.log is not allowed in on_fit_end; loggers may be finalized: save
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        err = f"max rel. error {report['max_rel_error']:.2e}" if "max_rel_error" in report else "not checked"
        rank_zero_info(
            f"ReparamFuse: {report['converted']} + {report['folded_bn']} folded BN; params {report['params_train']:,} "
            f"-> {report['params_deploy']:,}; BN {report['batchnorms_train']} -> {report['batchnorms_deploy']}; {err}"
        )

    def _write(
        self, deploy: nn.Module, report: dict[str, Any], folder: Path, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Path:
        path = Path(self.deploy_path) if self.deploy_path else folder / "deploy.pt2"
        deploy = deploy.eval()
        x = self._example_input(trainer, resolve_network(pl_module, self.network_attr, "ReparamFuse"))
        path = save_deploy(deploy, path, x, report, fold_bn=self.fold_bn)
        if self.export:
            if x is None:
                rank_zero_warn(f"ReparamFuse: no example input, skipped export {self.export}")
                return path
            with torch.no_grad():
                if "torchscript" in self.export:
                    traced = torch.jit.trace(deploy, x[:1])
                    atomic_write(path.with_suffix(".ts"), lambda tmp: torch.jit.save(traced, tmp))
                if "onnx" in self.export:
                    atomic_write(path.with_suffix(".onnx"), lambda tmp: _onnx_export(deploy, x[:1], tmp))
        return path

    # ---------------------------------------------------------------------------------------------- swap
    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.swap or self.network_attr is None:
            return
        restore_train_form(pl_module, self.network_attr)
        with torch.inference_mode(False):  # evaluation hooks run in inference mode; the copy must stay usable
            deploy, report = self.fuse(trainer, pl_module)
        report = trainer.strategy.broadcast(report, src=0)  # all ranks swap, or all raise
        if report.get("passed") is False and self.strict:
            raise RuntimeError(
                f"ReparamFuse: deploy form differs by {report['max_rel_error']:.3g} > rtol={report['rtol']:.3g}; "
                "not swapping it in"
            )
        train_net = resolve_network(pl_module, self.network_attr, "ReparamFuse")
        deploy.train(train_net.training)
        object.__setattr__(deploy, TRAIN_FORM, train_net)  # unregistered: not in state_dict / parameters
        set_network(pl_module, self.network_attr, deploy)


def first_loader(loaders: Any) -> Any:
    """The first dataloader of whatever ``trainer.*_dataloader(s)`` holds (a loader, list, tuple or dict)."""
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def _onnx_export(model: nn.Module, x: torch.Tensor, path: str) -> None:
    torch.onnx.export(
        model, (x,), path, input_names=["input"], output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False,
    )
