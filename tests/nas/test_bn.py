import torch
from torch import nn

from lightning_nd.nas import recalibrate_bn
from lightning_nd.nas.bn import bn_state, load_bn_state


def test_cumulative_average_and_restore():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    batches = [(torch.randn(8, 2, 4, 4) * 3 + 1, torch.zeros(8)) for _ in range(5)]
    saved = bn_state(net)
    net.eval()
    used = recalibrate_bn(net, batches, num_batches=4)
    assert used == 4 and not net.training and net[1].momentum == 0.1
    with torch.no_grad():
        feats = [net[0](x) for x, _ in batches[:4]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(3, -1).var(1) for f in feats]).mean(0)
    assert torch.allclose(net[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(net[1].running_var, var, atol=1e-4)
    load_bn_state(net, saved)
    assert torch.equal(net[1].running_mean, torch.zeros(3))
