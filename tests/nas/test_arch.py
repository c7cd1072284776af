import json

import pytest
import torch

from lightning_nd.nas import (
    arch_from_json,
    arch_to_json,
    build_space,
    count_params,
    export_subnet,
    get_arch,
    set_alive,
    set_arch,
    space_size,
)
from lightning_nd.nas.spaces import NB201_OPS


def test_json_round_trip(tmp_path):
    net = build_space("nb201", C=4, N=1, input_size=8)
    arch = [3, 0, 2, 4, 1, 3]
    data = arch_to_json(net, arch, score=0.5)
    assert data["ops"]["1<-0"] == "nor_conv_3x3" and data["score"] == 0.5
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"best": data}))
    assert arch_from_json(net, path) == arch
    assert arch_from_json(build_space("nb201", C=8, N=2), json.loads(json.dumps(data))) == arch
    bad = dict(data, ops=dict(data["ops"], **{"1<-0": "conv_9x9"}))
    with pytest.raises(ValueError, match="conv_9x9"):
        arch_from_json(net, bad)


def test_masks_space_size_and_export():
    net = build_space("nb201", num_classes=3, C=4, N=1, input_size=8)
    assert space_size(net) == 5**6
    set_alive(net, 0, 0, False)
    assert space_size(net) == 4 * 5**5
    with pytest.raises(ValueError, match="pruned"):
        set_arch(net, [0] * 6)
    for op in range(0, 4):
        set_alive(net, 1, op, False)
    with pytest.raises(ValueError, match="last alive op"):
        set_alive(net, 1, 4, False)
    set_arch(net, [3, 4, 3, 3, 3, 3])
    assert get_arch(net) == [3, 4, 3, 3, 3, 3]
    sub = export_subnet(net)
    assert count_params(sub) < count_params(net)
    x = torch.randn(2, 3, 8, 8)
    net.eval(), sub.eval()
    assert torch.allclose(net(x), sub(x), atol=1e-6)  # inherited weights: the same function
    assert len(NB201_OPS) == 5
