import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONHASHSEED", "0")


# Tests use tiny tensors: a second intra-op thread only spins (and on a loaded machine costs 10-100x).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolate_cwd(tmp_path, monkeypatch):
    """Run every test in its own folder so default run directories never collide or litter the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
