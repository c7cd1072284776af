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
    c = Choice({"double": nn.Identity(), "zero": nn.ZeroPad2d(0)})
    c.active = 0
    x = torch.ones(1, 1, 2, 2)
    assert torch.equal(c(x), x)
    assert c.names == ["double", "zero"] and c.alive.tolist() == [True, True]
