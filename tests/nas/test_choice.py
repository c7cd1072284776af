import pytest
import torch
from torch import nn

from lightning_nd.nas import Choice, set_arch


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="no candidates"):
        Choice([])


def test_different_output_shapes_name_the_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Choice([nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(2, 8, 3, padding=1)])

        def forward(self, x):
            return self.block(x)

    net = Net()
    set_arch(net, [0])
    with pytest.raises(ValueError, match="'block'.*different output shapes"):
        net(torch.zeros(1, 2, 5, 5))


def test_forward_runs_the_active_candidate():
    c = Choice({"same": nn.Identity(), "softsign": nn.Softsign()})
    x = torch.full((1, 1, 2, 2), 3.0)
    with pytest.raises(RuntimeError, match="no active candidate"):
        c(x)
    c.active = 0
    assert torch.equal(c(x), x)
    c.active = 1
    assert torch.equal(c(x), torch.full_like(x, 0.75))
    assert c.names == ["same", "softsign"] and c.alive.tolist() == [True, True]
