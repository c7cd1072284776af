"""Drop-in NAS with your own LightningModule (examples/own_module_search.py): one process and ddp_spawn."""

import importlib
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_nd.callbacks import AngleTracker, EvolutionSearch
from lightning_nd.datamodules import DigitsDataModule
from lightning_nd.nas import PathSampler

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def example(monkeypatch):
    # imported by its own name: ddp_spawn pickles MySearchModule by reference, the spawned processes import it
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("own_module_search")


class Recorder(pl.Callback):
    """Keeps the module the example trained, to look at what it did."""

    def on_fit_end(self, trainer, pl_module):
        self.module = pl_module


def test_own_module_samples_a_path_per_step_and_is_searched(tmp_path, monkeypatch, example):
    recorder = Recorder()
    original = pl.Trainer.__init__

    def with_recorder(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), recorder]
        original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "__init__", with_recorder)
    result = example.main(max_epochs=1, limit_train_batches=6, root=str(tmp_path))
    module = recorder.module
    # one path per step, the sampler's (seed, step) sequence: the callbacks saw a trained space, not one path
    expected = [PathSampler(example.TinySpace(), seed=0).sample(step) for step in range(6)]
    assert module.trained_archs == expected and len({tuple(a) for a in expected}) > 1
    assert result == json.loads((tmp_path / "arch.json").read_text())
    assert result["metric"] == "angle" and result["best"]["params"] is not None  # digits give the input shape
    tracker = next(cb for cb in module.trainer.callbacks if isinstance(cb, AngleTracker))
    assert result["best"]["score"] == pytest.approx(tracker.path_angle(result["best"]["arch"]))


@pytest.mark.ddp
def test_own_module_under_ddp_spawn(tmp_path, example):
    result = example.main(ddp_spawn=True, max_epochs=1, limit_train_batches=4, root=str(tmp_path / "ok"))
    assert result == json.loads((tmp_path / "ok" / "arch.json").read_text()) and result["best"]["params"] is not None

    # plain ddp_spawn: a clear hint at fit start (in the spawned process), not DDP's generic unused-parameter error
    search = EvolutionSearch(metric="angle", population=4, top_k=2, mutations=1, crossovers=1, generations=1, seed=0,
                             dirpath=str(tmp_path / "plain"))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", devices=2,
                         strategy="ddp_spawn", callbacks=[AngleTracker(every_n_epochs=1), search], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(Exception, match="ddp_spawn_find_unused_parameters_true") as info:
        trainer.fit(example.MySearchModule(), DigitsDataModule(batch_size=32))
    assert isinstance(info.value, MisconfigurationException) or "MisconfigurationException" in str(info.value)
    assert search.result is None  # what the launching process's callbacks hold after ddp_spawn
