"""The same seed and world size train the same supernet under torchrun and under Lightning's own DDP launcher.

A multi-node user launches with torchrun (or SLURM): two "nodes" of one process each on localhost, a static c10d
rendezvous, gloo on CPU, against ``--trainer.devices 2`` (Lightning starts the second process itself). Both runs
pin the same thread count: Lightning's launchers set ``torch.set_num_threads(cores // processes per node)``
whenever ``OMP_NUM_THREADS`` is unset, which differs between the two layouts (2 vs 1 threads per process on a
2-core machine) and changes float reductions; that, not seeding, data order or path sampling, made the two
launchers pick different cells. The CLI's ``torch_threads`` therefore also sets ``OMP_NUM_THREADS``; this test
leaves the variable unset so that the config alone has to pin both layouts.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")

CONFIG = {
    "seed_everything": 3,
    "torch_threads": 1,
    "trainer": {
        "max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 0, "accelerator": "cpu",
        "strategy": "ddp_find_unused_parameters_true", "enable_progress_bar": False, "enable_model_summary": False,
        "logger": False,
    },
    "model": {"class_path": "lightning_nd.modules.SupernetModule", "init_args": {
        "supernet": "nb201", "num_classes": 10, "in_chans": 3, "space_kwargs": {"C": 4, "N": 1}, "calib_batches": 0}},
    "data": {"class_path": "lightning_nd.datamodules.RandomLabels", "init_args": {"datamodule": {
        "class_path": "lightning_nd.datamodules.DigitsDataModule",
        "init_args": {"image_size": 8, "channels": 3, "batch_size": 32}}}},
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trained_weights(folder: Path) -> dict:
    """``{checkpoint file name: state_dict}`` of a run (the CLI may write ``last.ckpt`` beside the epoch one)."""
    return {ckpt.name: torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
            for ckpt in folder.rglob("*.ckpt")}


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to the interpreter")
def test_torchrun_two_nodes_trains_exactly_as_the_lightning_launcher(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("LOCAL_RANK", "OMP_NUM_THREADS"):  # the config's torch_threads alone must pin the threads
        env.pop(name, None)
    fit = [sys.executable, "-m", "lightning_nd", "fit", "-c", str(config)]
    lightning = subprocess.run([*fit, "--trainer.devices", "2", "--trainer.default_root_dir", str(tmp_path / "pl")],
                               env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert lightning.returncode == 0, lightning.stderr[-3000:]

    port = free_port()
    nodes = [
        subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr",
             "127.0.0.1", "--master_port", str(port), "-m", "lightning_nd", "fit", "-c", str(config),
             "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.default_root_dir", str(tmp_path / "tr")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]

    expected, got = trained_weights(tmp_path / "pl"), trained_weights(tmp_path / "tr")
    assert expected and expected.keys() == got.keys()
    for ckpt, state in expected.items():
        assert state.keys() == got[ckpt].keys()
        for name, value in state.items():  # bit-identical: same paths, data order, labels and updates
            assert torch.equal(value, got[ckpt][name]), (ckpt, name)
