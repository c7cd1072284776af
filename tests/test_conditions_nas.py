"""The NAS family under hostile conditions (issue 12's matrix): AngleTracker + ProgressivePruner + EvolutionSearch
on a tiny supernet, each condition asserting the search result, not only that nothing crashed."""

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_nd.callbacks import AngleTracker, EvolutionSearch, ProgressivePruner
from lightning_nd.datamodules import DigitsDataModule, RandomLabels
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import alive_options


class Record(Callback):
    """Losses and paths of every training batch; on fit end, every rank writes what it decided."""

    def __init__(self, folder=None):
        self.losses, self.paths, self.steps, self.folder = [], [], [], folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.paths.append(list(pl_module.current_arch))

    def on_fit_end(self, trainer, pl_module):
        if self.folder is not None:
            state = {"alive": alive_options(pl_module.net), "paths": self.paths}
            (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def run(folder, max_epochs=3, num_workers=0, ckpt_path=None, checkpoint_every=None, max_steps=-1, **trainer_kw):
    pl.seed_everything(0)
    model = SupernetModule("nb201", num_classes=10, space_kwargs={"C": 4, "N": 1}, calib_batches=2,
                           optimizer=sgd)
    dm = RandomLabels(DigitsDataModule(image_size=8, channels=3, batch_size=128, num_workers=num_workers))
    record = Record(folder)
    search = EvolutionSearch(metric="angle", population=12, top_k=4, mutations=4, crossovers=4, generations=3,
                             dirpath=str(folder))
    callbacks = [AngleTracker(preset="rlnas_nb201", heatmap=False),
                 ProgressivePruner(warmup_epochs=1, interval=1, drop_per_step=4, space_threshold=1000), search, record]
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=folder, every_n_train_steps=checkpoint_every, save_top_k=-1))
    trainer = pl.Trainer(max_epochs=max_epochs, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=folder, enable_checkpointing=bool(checkpoint_every), callbacks=callbacks,
                         limit_val_batches=trainer_kw.pop("limit_val_batches", 0), **trainer_kw)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return {"best": search.result["best"]["arch"] if search.result else None,
            "top": [(e["arch"], round(e["score"], 12)) for e in search.result["top_k"]] if search.result else None,
            "alive": alive_options(model.net), "losses": record.losses, "paths": record.paths, "steps": record.steps,
            "model": model}


def check(result):
    """The search result is sound: the pick lives in the shrunk space, scores are finite and ranked."""
    assert len(result["alive"]) == 6 and sum(len(o) for o in result["alive"]) < 30  # the pruner dropped ops
    assert all(result["best"][d] in result["alive"][d] for d in range(6))
    scores = [round(s, 6) for _, s in result["top"]]  # ranked at EvolutionSearch's tie_decimals=6
    assert np.isfinite(scores).all() and scores == sorted(scores, reverse=True) and scores[0] > 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"))


def test_reference_run(reference):
    check(reference)


def test_bf16_mixed(tmp_path, reference):
    result = run(tmp_path, precision="bf16-mixed")
    check(result)
    # The path of step s is drawn from (seed, s) over the alive ops: until the first shrink step (end of epoch 0,
    # warmup_epochs=1) the space is the same whatever the precision, so the schedule is too. Afterwards it depends on
    # what was pruned, which depends on bf16's angles (on AVX-512, 1 of 6 edges differed): not compared.
    steps_per_epoch = len(reference["losses"]) // 3
    assert result["steps"] == reference["steps"]
    assert result["paths"][:steps_per_epoch] == reference["paths"][:steps_per_epoch]
    assert all(p.dtype == torch.float32 for p in result["model"].net.parameters())  # fp32 master weights


def test_validation_under_inference_mode_leaves_training_untouched(tmp_path, reference):
    result = run(tmp_path, limit_val_batches=2, inference_mode=True)  # BN recalibration + validation every epoch
    check(result)
    assert result["losses"] == reference["losses"] and result["top"] == reference["top"]


def test_persistent_workers_give_the_same_run(tmp_path, reference):
    result = run(tmp_path, num_workers=2, limit_val_batches=2)
    assert result["losses"] == reference["losses"]
    assert result["top"] == reference["top"] and result["alive"] == reference["alive"]


def test_gradient_accumulation_keeps_one_path_per_optimizer_step(tmp_path):
    result = run(tmp_path, accumulate_grad_batches=2)
    check(result)
    by_step = {}
    for step, path in zip(result["steps"], result["paths"]):
        by_step.setdefault(step, []).append(path)
    assert len(by_step) < len(result["paths"])  # several micro-batches per optimizer step
    assert all(all(p == paths[0] for p in paths) for paths in by_step.values())  # ... sharing one path
    assert len({tuple(paths[0]) for paths in by_step.values()}) > 1


def test_gradient_clipping_reaches_the_supernet(tmp_path, reference):
    result = run(tmp_path, gradient_clip_val=1e-4)
    check(result)
    assert result["losses"][0] == reference["losses"][0] and result["losses"][5] != reference["losses"][5]
    assert result["top"][0][1] < 1e-3 < reference["top"][0][1]  # clipped steps barely turn the weights


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, reference):
    steps_per_epoch = len(reference["losses"]) // 3
    kill = steps_per_epoch + 3  # mid-epoch, after the first shrink step
    first = run(tmp_path / "a", max_steps=kill, checkpoint_every=kill)
    ckpt = next((tmp_path / "a").glob(f"*step={kill}.ckpt"))
    resumed = run(tmp_path / "b", ckpt_path=str(ckpt))
    assert first["losses"] == reference["losses"][:kill]
    assert resumed["losses"] == reference["losses"][kill:]
    assert resumed["alive"] == reference["alive"] and resumed["top"] == reference["top"]
    assert resumed["best"] == reference["best"]


@pytest.mark.ddp
def test_ddp_spawn_ranks_agree(tmp_path):
    result = run(tmp_path, max_epochs=2, limit_train_batches=4, strategy="ddp_spawn_find_unused_parameters_true",
                 accelerator="cpu", devices=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # same paths trained, same pruned space on both ranks
    best = json.loads((tmp_path / "arch.json").read_text())["best"]["arch"]
    assert all(best[d] in ranks[0]["alive"][d] for d in range(6))
    assert result["model"] is not None
