import json
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_nd.callbacks import AngleTracker, ProgressivePruner
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import alive_options, build_space, space_size


class FixedData(pl.LightningDataModule):
    """Unshuffled tiny data: the batch order is the same in a resumed and an uninterrupted run."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:16], self.y[:16]), batch_size=16)


class Paths(pl.Callback):
    def __init__(self):
        self.paths = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.paths.append(list(pl_module.current_arch))


def run(tmp_path, max_epochs, ckpt=None):
    pl.seed_everything(0)
    model = SupernetModule("nb201", num_classes=10, in_chans=1, input_size=8, space_kwargs={"C": 4, "N": 1},
                           calib_batches=1)
    tracker, paths = AngleTracker(heatmap=False), Paths()
    pruner = ProgressivePruner(warmup_epochs=1, interval=1, drop_per_step=3, space_threshold=10,
                               reset_reference_after=4)
    trainer = pl.Trainer(max_epochs=max_epochs, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, accelerator="cpu",
                         callbacks=[tracker, pruner, paths, ModelCheckpoint(tmp_path / "ckpt", save_last=True)])
    trainer.fit(model, FixedData(), ckpt_path=ckpt)
    return model, tracker, pruner, paths


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted(tmp_path):
    full = run(tmp_path / "a", 3)
    first = run(tmp_path / "b", 2)  # shrink steps at epochs 0 and 1; the reference reset (6 drops > 4) at epoch 1
    resumed = run(tmp_path / "c", 3, ckpt=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert first[3].paths + resumed[3].paths == full[3].paths
    assert alive_options(resumed[0].net) == alive_options(full[0].net)
    assert first[2].reset_done and len(first[2].timeline) == 2 and len(resumed[2].timeline) == 3
    assert space_size(full[0].net) == space_size(resumed[0].net) < space_size(first[0].net) < 5**6
    assert resumed[2].timeline == full[2].timeline
    for name, ref in full[1].reference.items():
        assert torch.equal(ref, resumed[1].reference[name])
    archs = np.random.default_rng(1).integers(0, 5, size=(50, 6))
    full[1].compute_statistics(full[0]), resumed[1].compute_statistics(resumed[0])
    assert np.allclose(full[1].path_angles(archs), resumed[1].path_angles(archs), rtol=0, atol=1e-9)
    shrunk = json.loads((tmp_path / "a" / "shrunk_space.json").read_text())
    assert shrunk["space_size"] == space_size(full[0].net)


def test_select_never_empties_a_decision():
    pruner = ProgressivePruner(drop_per_step=5)
    scores = {(0, 0): 0.1, (0, 1): 0.2, (1, 0): 0.3, (1, 1): 0.9, (1, 2): 0.05}
    drops = pruner.select_ops_to_drop(scores, [[0, 1], [0, 1, 2]])
    assert drops == [(1, 2), (0, 0), (1, 0)]


def test_depth_sampling_forces_the_op_and_adds_identities():
    net = build_space("mobilenet", num_classes=10, input_size=16, width_mult=0.25)
    pruner = ProgressivePruner()
    options = alive_options(net)
    from lightning_nd.callbacks.progressive_pruner import identity_ops

    ident = identity_ops(net)
    archs = pruner.sample_paths(np.random.default_rng(0), options, 3, 2, 500, ident)
    assert (archs[:, 3] == 2).all()
    depth = (archs == 6).sum(1)
    assert depth.min() == 0 and depth.max() >= 12  # a uniform number of identity layers
    pruner.setup(SimpleNamespace(callbacks=[AngleTracker()], datamodule=None), net, "fit")
    assert pruner.drop_per_step == 7  # ABS: op_num + 1, identity not counted


def test_bad_schedules_are_clear_errors():
    model = SupernetModule("nb201", num_classes=10, in_chans=1, space_kwargs={"C": 4, "N": 1})
    kw = {"max_steps": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
          "accelerator": "cpu"}
    with pytest.raises(ValueError, match="would empty a decision"):
        pl.Trainer(callbacks=[AngleTracker(), ProgressivePruner(drop_per_step=25)], **kw).fit(model, DigitsDataModule())
    with pytest.raises(MisconfigurationException, match="AngleTracker"):
        pl.Trainer(callbacks=[ProgressivePruner()], **kw).fit(model, DigitsDataModule())
    with pytest.raises(MisconfigurationException, match="interval"):
        ProgressivePruner(interval=0)


def test_warns_once_when_the_threshold_is_already_met():
    model = SupernetModule("nb201", num_classes=10, in_chans=1, space_kwargs={"C": 4, "N": 1})
    pruner = ProgressivePruner(warmup_epochs=1, space_threshold=1e6)  # 15,625 cells <= 1e6: it can never prune
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[AngleTracker(heatmap=False), pruner], limit_val_batches=0)
    with pytest.warns(UserWarning, match="will never prune.*15625 architectures <= space_threshold=1e\\+06") as record:
        trainer.fit(model, DigitsDataModule())
        pruner.setup(trainer, model, "fit")  # a second setup (e.g. validate after fit): no second warning
    assert sum("will never prune" in str(w.message) for w in record) == 1


def test_timeline_picture_uses_the_recorded_epochs():
    pruner = ProgressivePruner()
    pruner.timeline = [{"epoch": 3, "space_size": 6000}, {"epoch": 5, "space_size": 1000}]
    ax = pruner.timeline_figure().axes[0]
    assert list(ax.lines[0].get_xdata()) == [3, 5]  # as in shrunk_space.json
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_near_ties_are_decided_by_index_not_by_noise():
    pruner = ProgressivePruner(drop_per_step=1, tie_decimals=4)
    options = [[0, 1], [0, 1]]
    low = {(0, 1): 0.31230001, (1, 0): 0.31229999, (0, 0): 0.5, (1, 1): 0.5}  # equal at 4 decimals
    flipped = {(0, 1): 0.31229999, (1, 0): 0.31230001, (0, 0): 0.5, (1, 1): 0.5}
    assert pruner.select_ops_to_drop(low, options) == pruner.select_ops_to_drop(flipped, options) == [(0, 1)]


class RankCheck(pl.Callback):
    """Inside each worker: record the paths, masks and BN statistics; compare across ranks with all_gather."""

    def __init__(self, out_dir):
        self.out_dir, self.paths, self.bn_equal = str(out_dir), [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.paths.append(list(pl_module.current_arch))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        bn = next(m for m in pl_module.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
        gathered = trainer.strategy.all_gather(bn.running_mean)
        self.bn_equal.append(bool(torch.allclose(gathered[0], gathered[1], atol=1e-6)))

    def on_train_end(self, trainer, pl_module):
        masks = torch.cat([c.alive.float() for c in pl_module.net.modules() if hasattr(c, "alive")])
        gathered = trainer.strategy.all_gather(masks)
        record = {"paths": self.paths, "bn_equal": self.bn_equal, "masks_equal": bool(torch.equal(gathered[0], gathered[1])),
                  "alive": alive_options(pl_module.net)}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize(
    ("space", "space_kwargs", "alive_before"),
    [("nb201", {"C": 4, "N": 1}, 30),
     # DARTS: 2 x (1 + 3 + 6 + 10) input combinations + 28 edges x 7 ops (none masked)
     ("darts", {"C": 4, "layers": 3, "affine": True}, 40 + 28 * 7)],
    ids=["nb201", "darts"],
)
def test_two_ddp_ranks_agree_on_paths_bn_and_pruning(tmp_path, space, space_kwargs, alive_before):
    model = SupernetModule(space, num_classes=10, in_chans=1, space_kwargs=space_kwargs, calib_batches=2,
                           check_sync=True)
    trainer = pl.Trainer(strategy="ddp_spawn_find_unused_parameters_true", accelerator="cpu", devices=2,
                         max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path,
                         callbacks=[AngleTracker(heatmap=False),
                                    ProgressivePruner(warmup_epochs=1, interval=1, drop_per_step=4,
                                                      space_threshold=10),
                                    RankCheck(tmp_path)])
    trainer.fit(model, DigitsDataModule(batch_size=16))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["paths"] == r1["paths"] and len(r0["paths"]) == 6
    assert r0["masks_equal"] and r0["alive"] == r1["alive"]
    assert sum(len(o) for o in r0["alive"]) == alive_before - 8  # two shrink steps of 4 ops
    assert r0["bn_equal"] and all(r0["bn_equal"]) and all(r1["bn_equal"])
