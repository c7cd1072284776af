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


def test_parameter_count_is_about_one_fpn():
    # FPN: laterals + one 3x3 output conv (with bias) per level. i-FPN: the same laterals + one shared 3x3 conv, one
    # shared stride-2 3x3 "down" conv, one shared 1x1 "up" conv (no biases: GroupNorm follows) + a GroupNorm (2C) per
    # level in the residual branch (the injection and output norms have no affine parameters)
    c, levels = 16, len(IN_CHANNELS)
    fpn = FeaturePyramidNetwork(IN_CHANNELS, c)
    ifpn = ImplicitFPN(IN_CHANNELS, c, num_groups=4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ifpn) == count(fpn) - levels * (9 * c * c + c) + 2 * 9 * c * c + c * c + levels * 2 * c


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
        x_coarse = OrderedDict(x, c5=x["c5"] + torch.randn_like(x["c5"]))
        x_fine = OrderedDict(x, c3=x["c3"] + torch.randn_like(x["c3"]))
        assert (fpn(x_coarse)["c3"] - out["c3"]).abs().max() > 1e-2
        assert (fpn(x_fine)["c5"] - out["c5"]).abs().max() > 1e-2
        # ... which one application of the cell cannot do: it only exchanges between adjacent levels, so the
        # equilibrium is what fuses the whole pyramid
        fpn.deq.mode, fpn.deq.config.unroll_layers = "unrolled", 1
        one = fpn(x)
        assert torch.equal(fpn(x_coarse)["c3"], one["c3"]) and torch.equal(fpn(x_fine)["c5"], one["c5"])
        assert not torch.equal(fpn(x_coarse)["c4"], one["c4"])


def _old_cell(z, x, convs, norms):
    """The pre-issue-22 cell, kept here as the negative control: GN(conv(relu(z + x))) per level."""
    return tuple(n(c(torch.relu(zl + xl))) for zl, xl, c, n in zip(z, x, convs, norms))


def test_cell_is_not_scale_invariant_in_its_state():
    # issue 22: with GN(conv(relu(z + x))) a growing injection drowns the state out (the recurrence switches itself
    # off). The cell normalises its injection and carries the state on an identity path, so however the injection
    # is scaled, the output still depends on the state as much as at scale 1.
    torch.manual_seed(0)
    levels, c = 3, 16
    cell = ImplicitFPN(IN_CHANNELS, c, num_groups=4).cell
    x = tuple(torch.randn(2, c, s, s) for s in (12, 6, 3))
    z1 = tuple(torch.randn_like(t) for t in x)
    z2 = tuple(torch.randn_like(t) for t in x)
    convs = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(levels))
    norms = nn.ModuleList(nn.GroupNorm(4, c) for _ in range(levels))

    def state_effect(f, scale):
        xs = tuple(scale * t for t in x)
        a, b = torch.cat([t.flatten() for t in f(z1, xs)]), torch.cat([t.flatten() for t in f(z2, xs)])
        return float((a - b).norm() / a.norm())

    with torch.no_grad():
        new = [state_effect(cell, s) for s in (1.0, 1e2, 1e4)]
        old = [state_effect(lambda z, x: _old_cell(z, x, convs, norms), s) for s in (1.0, 1e2, 1e4)]
    assert new[0] > 0.3 and min(new[1:]) > 0.9 * new[0]
    assert old[0] > 0.3 and old[2] < 1e-3 * old[0]  # the control: the old cell forgets its state


def test_every_level_given_to_the_implicit_fpn_is_inside_the_equilibrium():
    # issue 22: P6/P7 used to be explicit convs on the equilibrium's output; now every level the detector gets
    # (inputs and extra levels) is part of the state and a fixed point of the cell
    fpn = ImplicitFPN(IN_CHANNELS, 16, extra_blocks=LastLevelP6P7(16, 16), num_groups=4, f_tol=1e-6,
                      f_max_iter=100).eval()
    assert fpn.cell.num_levels == len(IN_CHANNELS) + 2 == fpn.num_extra_levels + len(IN_CHANNELS)
    x = _features()
    with torch.no_grad():
        out = fpn(x)
        assert list(out) == ["c3", "c4", "c5", "p6", "p7"]
        b = fpn.injection(x)
        assert len(b) == 5
        for name, a, fa in zip(out, out.values(), fpn.cell(tuple(out.values()), b)):
            assert (fa - a).norm() / a.norm() < 1e-5, name
        # the extra levels are coupled to the rest: changing the finest input moves p7 (four levels away)
        assert (fpn(OrderedDict(x, c3=x["c3"] + torch.randn_like(x["c3"])))["p7"] - out["p7"]).abs().max() > 1e-2
    # the control (extra levels outside, as torchvision's FPN): p6/p7 are not part of the state
    outside = ImplicitFPN(IN_CHANNELS, 16, extra_blocks=LastLevelP6P7(16, 16), num_groups=4, extra_inside=False)
    assert outside.cell.num_levels == len(IN_CHANNELS) and len(outside.injection(x)) == 3
    assert list(outside(x)) == ["c3", "c4", "c5", "p6", "p7"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_channels_list"):
        ImplicitFPN([], 16)
    with pytest.raises(ValueError, match="num_groups"):
        ImplicitFPN(IN_CHANNELS, 16, num_groups=5)
    with pytest.raises(ValueError, match="f_maxiter"):
        ImplicitFPN(IN_CHANNELS, 16, f_maxiter=3)
    with pytest.raises(ValueError, match="extra_blocks"):
        ImplicitFPN(IN_CHANNELS, 16, extra_blocks=nn.Identity())
    with pytest.raises(ValueError, match="extra_inside"):
        ImplicitFPN(IN_CHANNELS, 16, num_groups=4, extra_inside="yes")
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
