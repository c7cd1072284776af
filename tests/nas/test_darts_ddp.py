"""The DARTS space under DDP: what a 2-rank search shares with one process, and ``lnd fit`` under real DDP.

Guaranteed, and tested here: the path schedule (a function of the seed and the optimizer step alone) is the one of a
single process at the same global batch, and the search (pruning masks and EA pick, functions of the trained
weights and the search seed) is the one a single process makes on the same weights. Not guaranteed: the weights
themselves. Each rank's BatchNorm normalises its own half batch, so after a step they differ from one process at the
full batch (``SyncBatchNorm``, which would restore it, raises on CPU tensors), and so may the angles, masks and pick.
"""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_nd.callbacks import AngleTracker, EvolutionSearch, ProgressivePruner
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import alive_options
from tests.test_cli import _lnd_fit_under_ddp

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nas"
GLOBAL_BATCH, STEPS = 16, 4
EA = {"population": 8, "top_k": 3, "mutations": 3, "crossovers": 3, "generations": 3, "seed": 0}


class RecordPaths(Callback):
    """Each rank writes the path of every training step and the alive masks at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.paths = str(out_dir), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.paths.append(list(pl_module.current_arch))

    def on_train_end(self, trainer, pl_module):
        record = {"paths": self.paths, "alive": alive_options(pl_module.net)}
        Path(self.out_dir, f"rank{trainer.global_rank}_of_{trainer.world_size}.json").write_text(json.dumps(record))


def search(tmp_path: Path, devices: int) -> dict:
    """RLNAS on a small DARTS supernet: train STEPS steps at the global batch, shrink once, search by angle."""
    out = tmp_path / f"devices{devices}"
    pl.seed_everything(0)
    model = SupernetModule("darts", num_classes=10, in_chans=1, space_kwargs={"C": 4, "layers": 3, "affine": True},
                           calib_batches=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0,
        strategy="ddp_spawn_find_unused_parameters_true" if devices > 1 else "auto", logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[AngleTracker(preset="rlnas_darts", heatmap=False),
                   ProgressivePruner(warmup_epochs=1, interval=1, drop_per_step=14, paths_per_op=16,
                                     depth_sampling=False),
                   EvolutionSearch(metric="angle", dirpath=str(out / "search"), **EA), RecordPaths(out),
                   ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)],
    )
    trainer.fit(model, DigitsDataModule(batch_size=GLOBAL_BATCH // devices))
    ranks = [json.loads((out / f"rank{r}_of_{devices}.json").read_text()) for r in range(devices)]
    return {"ranks": ranks, "arch": json.loads((out / "search" / "arch.json").read_text()), "out": out}


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_share_the_schedule_and_search_the_weights_as_one_process(tmp_path):
    """2-rank ddp_spawn RLNAS search (per-rank batch 8) vs one process (batch 16): same paths at every step; the
    DDP run's masks and pick are those a one-process search of its checkpoint gives."""
    single, ddp = search(tmp_path, 1), search(tmp_path, 2)
    paths = single["ranks"][0]["paths"]
    assert len(paths) == STEPS and len({tuple(p) for p in paths}) == STEPS  # distinct paths: the schedule shows
    assert ddp["ranks"][0]["paths"] == ddp["ranks"][1]["paths"] == paths
    assert ddp["ranks"][0]["alive"] == ddp["ranks"][1]["alive"]
    # one shrink step of 14 ops on both: 2 x (1 + 3 + 6 + 10) input pairs + 28 edges x 7 ops (none masked) before
    assert sum(map(len, ddp["ranks"][0]["alive"])) == sum(map(len, single["ranks"][0]["alive"])) == 40 + 28 * 7 - 14

    # the search is a function of the weights: one process searching the DDP run's weights picks what DDP picked
    model = SupernetModule("darts", num_classes=10, in_chans=1, space_kwargs={"C": 4, "layers": 3, "affine": True},
                           calib_batches=0)
    validator = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, default_root_dir=tmp_path,
        callbacks=[AngleTracker(preset="rlnas_darts", heatmap=False),
                   EvolutionSearch(metric="angle", run_on="validate", dirpath=str(tmp_path / "replay"), **EA)],
    )
    validator.validate(model, DigitsDataModule(batch_size=GLOBAL_BATCH), ckpt_path=str(ddp["out"] / "ckpt" / "last.ckpt"))
    assert alive_options(model.net) == ddp["ranks"][0]["alive"]
    replay = json.loads((tmp_path / "replay" / "arch.json").read_text())
    assert replay["best"] == ddp["arch"]["best"] and replay["top_k"] == ddp["arch"]["top_k"]
    assert ddp["arch"]["best"]["genotype"]["normal"]


@pytest.mark.slow
@pytest.mark.ddp
def test_lnd_fit_rlnas_darts_under_real_ddp(tmp_path):
    """configs/nas/rlnas_darts.yaml with popen DDP on 2 CPU ranks exits 0 and writes arch.json with a genotype."""
    config = yaml.safe_load((CONFIGS / "rlnas_darts.yaml").read_text())
    config["model"]["init_args"]["space_kwargs"].update(C=4, layers=3)
    config["data"]["init_args"]["datamodule"]["init_args"].update(train_subset=64, val_size=64, batch_size=16)
    search_args = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EvolutionSearch"))
    search_args["init_args"].update(population=6, top_k=2, mutations=2, crossovers=2, generations=2)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    _lnd_fit_under_ddp(tmp_path, "-c", "search.yaml", "--trainer.strategy=ddp_find_unused_parameters_true",
                       "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    best = json.loads((tmp_path / "runs" / "rlnas_darts" / "arch.json").read_text())["best"]
    assert len(best["genotype"]["normal"]) == len(best["genotype"]["reduce"]) == 8
    assert torch.tensor(best["arch"]).numel() == 36
