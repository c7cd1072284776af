"""ImplicitFPN: torchvision FPN interface, a real fixed point with cross-scale mixing, exact implicit gradients."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from lightning_nd.datamodules import ShapesDetectionDataModule
from lightning_nd.datamodules.shapes_detection import detection_collate
from lightning_nd.implicit import DEQConfig, ImplicitFPN
from lightning_nd.implicit.ifpn import IFPN_DEQ_DEFAULTS
from lightning_nd.modules import DetectionModule

IN_CHANNELS = [8, 16, 24]


def _features(size=(25, 13, 7), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (name, torch.randn(batch, c, s, s, generator=g)) for name, c, s in zip(("c3", "c4", "c5"), IN_CHANNELS, size)
    )


@pytest.mark.parametrize("extra", ["none", "pool", "p6p7"])
def test_outputs_have_the_names_and_shapes_of_torchvision_fpn(extra):
    make = {"none": lambda: None, "pool": LastLevelMaxPool, "p6p7": lambda: LastLevelP6P7(16, 16)}[extra]
    x = _features()
    ref = FeaturePyramidNetwork(IN_CHANNELS, 16, extra_blocks=make())(x)
    out = ImplicitFPN(IN_CHANNELS, 16, extra_blocks=make(), num_groups=4)(x)
    assert isinstance(out, OrderedDict)
    assert list(out) == list(ref)
    assert [v.shape for v in out.values()] == [v.shape for v in ref.values()]


def test_drop_in_replacement_in_a_torchvision_backbone():
    backbone = BackboneWithFPN(resnet18(weights=None), {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [128, 256, 512], 32, extra_blocks=LastLevelP6P7(32, 32))
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        ref = backbone(x)
        backbone.fpn = ImplicitFPN([128, 256, 512], 32, extra_blocks=LastLevelP6P7(32, 32), norm_layer=nn.BatchNorm2d)
        out = backbone(x)
    assert list(out) == list(ref) == ["0", "1", "2", "p6", "p7"]
    assert [v.shape for v in out.values()] == [v.shape for v in ref.values()]


def test_parameter_count_is_one_fpn_layer():
    # the same lateral 1x1 and per-level 3x3 convolutions as torchvision's FPN; the cell's convs carry no bias
    # (GroupNorm follows) and each level has a GroupNorm (2C): exactly C more parameters per level.
    fpn = FeaturePyramidNetwork(IN_CHANNELS, 16)
    ifpn = ImplicitFPN(IN_CHANNELS, 16, num_groups=4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ifpn) == count(fpn) + len(IN_CHANNELS) * 16


def test_solution_is_a_fixed_point_that_mixes_all_levels():
    fpn = ImplicitFPN(IN_CHANNELS, 16, num_groups=4, f_tol=1e-6, f_max_iter=100).eval()
    x = _features()
    with torch.no_grad():
        out = fpn(x)
        stats = fpn.last_stats.forward
        assert bool(stats.converged.all()) and stats.nfe < 100
        z = tuple(out.values())
        fz = fpn.cell(z, fpn.injection(x))
        for a, b in zip(fz, z):
            assert (a - b).norm() / b.norm() < 1e-5
        # top-down: the coarsest input reaches the finest output; bottom-up: the finest input reaches the coarsest
        x_coarse = OrderedDict(x, c5=x["c5"] + 1.0)
        x_fine = OrderedDict(x, c3=x["c3"] + 1.0)
        assert (fpn(x_coarse)["c3"] - out["c3"]).abs().max() > 1e-2
        assert (fpn(x_fine)["c5"] - out["c5"]).abs().max() > 1e-2


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_channels_list"):
        ImplicitFPN([], 16)
    with pytest.raises(ValueError, match="num_groups"):
        ImplicitFPN(IN_CHANNELS, 16, num_groups=5)
    with pytest.raises(ValueError, match="f_maxiter"):
        ImplicitFPN(IN_CHANNELS, 16, f_maxiter=3)
    with pytest.raises(ValueError, match="extra_blocks"):
        ImplicitFPN(IN_CHANNELS, 16, extra_blocks=nn.Identity())
    fpn = ImplicitFPN(IN_CHANNELS, 16, num_groups=4)
    with pytest.raises(ValueError, match="built for 3 levels"):
        fpn(OrderedDict(list(_features().items())[:2]))


def test_implicit_backward_through_the_detector_matches_unrolled_reference():
    torch.manual_seed(0)
    tight = {"f_tol": 1e-6, "f_max_iter": 100, "b_tol": 1e-7, "b_max_iter": 100}
    module = DetectionModule("retinanet", num_classes=4, neck="ifpn", returned_layers=[2, 3], out_channels=32,
                             min_size=64, max_size=64, neck_kwargs=tight)
    data = ShapesDetectionDataModule(image_size=64, max_object_size=24).dataset("train")
    images, targets = detection_collate([data[0], data[1]])
    fpn = module.net.backbone.fpn
    groups = {  # the cell's weights, and everything upstream of the equilibrium (lateral convs + backbone)
        "cell": list(fpn.cell.parameters()),
        "upstream": list(fpn.inner_blocks.parameters()) + list(module.net.backbone.body.parameters()),
    }

    def grads():
        sum(module.net(images, targets).values()).backward()
        out = {k: torch.cat([p.grad.flatten() for p in ps]).double() for k, ps in groups.items()}
        module.zero_grad(set_to_none=True)
        return out

    implicit = grads()
    assert fpn.last_stats.backward is not None and float(fpn.last_stats.backward.rel.max()) < 1e-6
    fpn.deq.config.backward, fpn.deq.config.phantom_steps, fpn.deq.config.phantom_tau = "phantom", 1, 1.0
    one_step = grads()
    fpn.deq.config.backward = "ift"
    fpn.deq.mode = "unrolled"  # plain backprop through 120 weight-tied applications of the cell
    fpn.deq.config.unroll_layers = 120
    unrolled = grads()
    assert float(fpn.last_stats.forward.rel.max()) < 1e-5  # the reference itself sits at the fixed point

    cos = torch.nn.functional.cosine_similarity
    for name in groups:
        assert cos(implicit[name], unrolled[name], dim=0) > 0.9999, name
        assert abs(float(implicit[name].norm() / unrolled[name].norm()) - 1) < 1e-3, name
        # the comparison has teeth: the 1-step (Jacobian-free) gradient is visibly off on the same detector
        assert cos(one_step[name], unrolled[name], dim=0) < 0.99, name


def test_a_config_object_and_a_dict_merge_over_the_ifpn_defaults_by_one_rule():
    # issue 12 item 7: DEQConfig(f_solver="broyden") used to reset every other field to DEQConfig's generic defaults
    # (30 steps, abs 1e-3, b_tol 1e-6), while {"f_solver": "broyden"} kept the i-FPN's
    from_object = ImplicitFPN(IN_CHANNELS, 16, num_groups=4, deq=DEQConfig(f_solver="broyden", b_max_iter=7))
    from_dict = ImplicitFPN(IN_CHANNELS, 16, num_groups=4, deq={"f_solver": "broyden", "b_max_iter": 7})
    assert from_object.deq.config == from_dict.deq.config
    cfg = from_object.deq.config
    assert (cfg.f_solver, cfg.b_max_iter) == ("broyden", 7)
    for name, value in IFPN_DEQ_DEFAULTS.items():
        if name not in ("f_solver", "b_max_iter"):
            assert getattr(cfg, name) == value, name
    # keywords win over both; unknown names are rejected whatever the form
    assert ImplicitFPN(IN_CHANNELS, 16, num_groups=4, deq={"f_tol": 0.5}, f_tol=0.25).deq.config.f_tol == 0.25
    with pytest.raises(ValueError, match=r"unknown DEQ option\(s\) \['threshold'\]"):
        ImplicitFPN(IN_CHANNELS, 16, num_groups=4, deq={"threshold": 3})
    plain = ImplicitFPN(IN_CHANNELS, 16, num_groups=4).deq.config
    assert all(getattr(plain, k) == v for k, v in IFPN_DEQ_DEFAULTS.items())
