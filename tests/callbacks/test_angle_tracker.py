import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_nd.callbacks import AngleTracker
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.modules import ImageClassifier, SupernetModule


def test_tracks_logs_and_keeps_reference_in_state(tmp_path):
    model = SupernetModule("nb201", num_classes=10, in_chans=1, space_kwargs={"C": 4, "N": 1}, calib_batches=1)
    initial = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    tracker = AngleTracker(every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[tracker], accelerator="cpu")
    trainer.fit(model, DigitsDataModule(batch_size=16))
    state = tracker.state_dict()
    assert torch.equal(state["reference"]["classifier.weight"], initial["classifier.weight"])
    archs = np.random.default_rng(0).integers(0, 5, size=(30, 6))
    fresh = AngleTracker.from_reference(model.net, initial)
    fresh.compute_statistics(model.net)
    assert np.allclose(tracker.path_angles(archs), fresh.path_angles(archs), atol=1e-12)
    assert tracker.path_angles(archs).max() > 0
    ops = tracker.op_angles()
    assert len(ops) == 6 and all(len(row) == 5 for row in ops)
    assert np.isnan(ops[0][0]) and np.isnan(ops[0][4])  # none, pool: no weights (op_angles doc)
    assert np.nanmax(np.array(ops)) > 0  # sampled conv ops moved
    assert list(tmp_path.rglob("*angle_heatmap*.png"))
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "angle/1<-0/nor_conv_3x3" in metrics


def test_model_without_choice_is_a_clear_error():
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[AngleTracker()], accelerator="cpu")
    with pytest.raises(ValueError, match="AngleTracker needs a supernet with Choice layers"):
        trainer.fit(ImageClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), 10),
                    DigitsDataModule())


def test_bad_arguments():
    with pytest.raises(MisconfigurationException, match="identity"):
        AngleTracker(identity="matrix")
    with pytest.raises(MisconfigurationException, match="every_n_epochs"):
        AngleTracker(every_n_epochs=0)
    with pytest.raises(RuntimeError, match="compute_statistics"):
        AngleTracker().path_angle([0])
