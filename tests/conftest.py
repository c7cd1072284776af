import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PYTHONHASHSEED", "0")
# `lnd` errors keep their traceback in tests (tests of the short message unset it).
os.environ.setdefault("LND_TRACEBACK", "1")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MISSING = (
    f"Fashion-MNIST is not installed ({FASHION_MNIST} missing): as root, `apt-get install dataset-fashion-mnist` "
    "(bash scripts/setup.sh --test does it where root or sudo is available)"
)


# Tests use tiny tensors: a second intra-op thread only spins (and on a loaded machine costs 10-100x).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``fashion_mnist`` when the Debian package is missing, except in CI (there it is an error)."""
    if FASHION_MNIST.is_dir() or os.environ.get("CI"):
        return
    skip = pytest.mark.skip(reason=FASHION_MNIST_MISSING)
    for item in items:
        if "fashion_mnist" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that fails only because Fashion-MNIST is missing is reported as skipped with the reason (never in CI).

    Catches the data module's own FileNotFoundError for the Debian folder, for tests not marked ``fashion_mnist``.
    """
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is None or FASHION_MNIST.is_dir() or os.environ.get("CI") or report.when != "call":
        return
    error = call.excinfo.value
    while error is not None:
        if isinstance(error, FileNotFoundError) and f"data_dir='{FASHION_MNIST}'" in str(error):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {FASHION_MNIST_MISSING}")
            return
        error = error.__cause__ or error.__context__


@pytest.fixture(autouse=True)
def _isolate_cwd(tmp_path, monkeypatch):
    """Run every test in its own folder so default run directories never collide or litter the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
