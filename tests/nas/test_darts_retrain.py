"""DARTS's retrain recipe in ImageClassifier: the auxiliary head's loss (weight 0.4) and the linear drop-path ramp."""

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_nd.modules import ImageClassifier
from lightning_nd.nas.spaces.darts import GENOTYPES, build_network


def test_auxiliary_logits_add_their_weighted_loss_in_training_only():
    torch.manual_seed(0)
    net = build_network(GENOTYPES["darts_v2"], C=4, layers=3, num_classes=10, auxiliary=True)
    clf = ImageClassifier(net, num_classes=10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = net(x)
    expected = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(net.aux_logits, y)
    with pytest.warns(UserWarning):  # self.log outside a Trainer
        assert torch.allclose(clf._step((x, y), "train"), expected, rtol=1e-6, atol=0)
        clf.eval()
        assert torch.allclose(clf._step((x, y), "val"), F.cross_entropy(net(x), y), rtol=1e-6, atol=0)


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.drop_path_prob = 0.3
        self.seen: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(self.drop_path_prob)
        return self.fc(x)


def test_drop_path_ramps_linearly_over_the_epochs_as_in_darts():
    net = _Recorder()
    data = DataLoader(TensorDataset(torch.randn(4, 4), torch.tensor([0, 1, 2, 0])), batch_size=4)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(ImageClassifier(net, num_classes=3, drop_path_ramp=True), data)
    assert net.seen == pytest.approx([0.0, 0.1, 0.2], abs=1e-12)  # drop_path_prob * epoch / epochs
    with pytest.raises(ValueError, match="drop_path_prob"):
        ImageClassifier(nn.Linear(4, 3), num_classes=3, drop_path_ramp=True)
