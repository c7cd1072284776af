"""Issue 27: re-parameterization never silently changes a model. Each hard case converts exactly or is left alone
with a reason and a warning: tied weights, models torch.fx cannot trace (a returned raw conv output, a branch the
example does not take), BatchNorm subclasses with their own forward, channels-last, deploy reload paths.

Tolerances: one BN fold in float32 moves an output by a few ulps of ``max |y|``; ``fold_tol(depth)`` allows 32 ulps per
folded layer on the path (the zoo's 1e-5 is the same bound for ~40-layer models).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

from lightning_nd.reparam import (
    ACBlock,
    convert_model,
    convert_model_with_report,
    find_conv_bn_pairs,
    load_deploy,
    reparameterize_model,
    reparameterize_with_stats,
    save_deploy,
)
from lightning_nd.reparam.deploy_io import weights_path
from tests.reparam._helpers import randomize_bn, rel_err

EPS32 = torch.finfo(torch.float32).eps


def fold_tol(depth: int) -> float:
    """Relative tolerance for ``depth`` folded float32 layers on the longest path."""
    return 32 * EPS32 * depth


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ tied weights
class TiedConvs(nn.Module):
    """``a`` (followed by a BN) and ``b`` share one weight; ``b`` may be a ``ConvTranspose2d`` on the same tensor."""

    def __init__(self, transpose: bool = False, bn_on_b: bool = False) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        cls = nn.ConvTranspose2d if transpose else nn.Conv2d
        self.b = cls(4, 4, 3, padding=1, bias=False)
        self.b.weight = self.a.weight
        self.bn_b = nn.BatchNorm2d(4) if bn_on_b else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.a(x)) + self.bn_b(self.b(x))


@pytest.mark.parametrize("transpose", [False, True], ids=["conv-conv", "conv-transpose"])
def test_fold_of_a_tied_weight_goes_into_a_copy_and_warns(transpose):
    model = randomize_bn(TiedConvs(transpose)).eval()
    x = _x(2, 4, 8, 8)
    with torch.no_grad():
        y = model(x)
        with pytest.warns(UserWarning, match=r"tied tensor.*a\.weight, shared with b\.weight"):
            fused, stats = reparameterize_with_stats(model, fold_bn=True)
        assert stats.folded_bn == 1 and len(stats.untied) == 1
        assert rel_err(y, fused(x)) <= fold_tol(1)  # b still reads the unfolded weight
        assert fused.a.weight is not fused.b.weight
        assert rel_err(y, model(x)) == 0.0  # the source model is untouched (inplace=False)
        inplace = reparameterize_model(copy.deepcopy(model), inplace=True, fold_bn=True)
        assert rel_err(y, inplace(x)) <= fold_tol(1)


def test_tie_kept_when_every_user_folds_identically():
    model = randomize_bn(TiedConvs(bn_on_b=True)).eval()
    x = _x(2, 4, 8, 8)
    with torch.no_grad():
        model.bn_b.load_state_dict(model.bn_a.state_dict())  # same statistics: both fold to the same tensor
        y = model(x)
        fused, stats = reparameterize_with_stats(model, fold_bn=True)
        assert stats.folded_bn == 2 and stats.untied == []
        assert fused.a.weight is fused.b.weight  # still one tensor
        assert rel_err(y, fused(x)) <= fold_tol(1)
        randomize_bn(model, seed=1)  # different statistics: two copies, exact
        y = model(x)
        fused, stats = reparameterize_with_stats(model, fold_bn=True, warn=False)
        assert stats.folded_bn == 2 and len(stats.untied) == 2 and fused.a.weight is not fused.b.weight
        assert rel_err(y, fused(x)) <= fold_tol(1)


@pytest.mark.parametrize("block", ["acb", "dbb", "repvgg"])
def test_convert_keeps_a_tied_weight_tied(block):
    model = randomize_bn(TiedConvs(transpose=True)).eval()
    x = _x(2, 4, 8, 8)
    with torch.no_grad():
        y = model(x)
    report = convert_model_with_report(model, block, preserve=True)
    main = model.a.main_branch()
    assert report.converted == ["a"] and report.tied == ["a:conv.weight"]
    assert main.conv.weight is model.b.weight  # the block reuses the tensor: training updates both users
    with torch.no_grad():
        assert rel_err(y, model(x)) <= fold_tol(1)
        assert rel_err(y, reparameterize_model(model, fold_bn=True)(x)) <= fold_tol(2)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    optimizer.step()  # one update, seen by both users
    with torch.no_grad():
        torch.testing.assert_close(model.b(x), nn.functional.conv_transpose2d(x, main.conv.weight, padding=1))


def test_convert_refuses_a_tied_conv_bias():
    model = TiedConvs()
    model.a.bias = nn.Parameter(torch.randn(4))
    model.b.bias = model.a.bias
    with pytest.warns(UserWarning, match="a -> bn_a left as it is: the conv bias is tied to b.bias"):
        with pytest.raises(ValueError, match="no eligible"):  # it was the only pair
            convert_model(model, "acb")
    assert isinstance(model.a, nn.Conv2d) and model.a.bias is model.b.bias


# ------------------------------------------------------------------------------------ models fx cannot trace
class Untraceable(nn.Module):
    """Data-dependent control flow: ``c -> bn`` when the input mean is positive (returning the raw ``c`` output too),
    ``c2 -> bn2`` otherwise; ``d -> bn_d`` is a clean pair on both paths."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.bn_d = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.bn_d(self.d(x)))
        if x.mean() > 0:
            raw = self.c(h)
            return self.bn(raw), raw  # the raw feature is returned: folding bn into c would change it
        return self.bn2(self.c2(h)), h


def test_untraceable_model_output_is_a_reader_and_untaken_branch_is_named():
    model = randomize_bn(Untraceable()).eval()
    positive, negative = _x(2, 4, 8, 8).abs() + 0.1, -_x(2, 4, 8, 8, seed=1).abs() - 0.1
    with torch.no_grad():
        y_pos, y_neg = model(positive), model(negative)
        with pytest.warns(UserWarning, match=r"ONE forward on the example input.*never ran, so not paired: c2, bn2"):
            found = find_conv_bn_pairs(model, positive)
        assert found.method == "hooks" and [p.conv_path for p in found.pairs] == ["d"]
        assert found.never_ran == ["c2", "bn2"]
        reasons = {s.bn_path: s.reason for s in found.skipped}
        assert "the model output" in reasons["bn"] and reasons["bn2"] == "never called in the forward"
        with pytest.warns(UserWarning, match="ONE forward"):
            fused = reparameterize_model(model, fold_bn=True, example_input=positive)
        for y, x in ((y_pos, positive), (y_neg, negative)):  # both outputs, both paths
            for ref, out in zip(y, fused(x)):
                assert rel_err(ref, out) <= fold_tol(2)
        assert isinstance(fused.bn, nn.BatchNorm2d) and isinstance(fused.bn2, nn.BatchNorm2d)


def test_untraceable_without_example_names_example_input_array():
    with pytest.raises(ValueError, match="example_input_array"):
        find_conv_bn_pairs(Untraceable())


# --------------------------------------------------------------------------------------------- BN subclasses
class BatchNorm2d(nn.BatchNorm2d):  # the name of torch's class, another forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2 + 1


class PlainSubclassBN(nn.BatchNorm2d):  # a subclass that keeps BatchNorm2d's forward: still foldable
    pass


def test_bn_subclass_with_own_forward_is_not_folded():
    x = _x(2, 4, 8, 8)
    for norm, folded in ((BatchNorm2d, False), (PlainSubclassBN, True)):
        model = randomize_bn(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), norm(4))).eval()
        with torch.no_grad():
            y = model(x)
            found = find_conv_bn_pairs(model)
            fused, stats = reparameterize_with_stats(model, fold_bn=True, warn=False)
            assert rel_err(y, fused(x)) <= fold_tol(1)
        assert stats.folded_bn == int(folded)
        if not folded:
            assert "has its own forward" in found.skipped[0].reason and isinstance(fused[1], BatchNorm2d)
            with pytest.raises(ValueError, match="no eligible"):
                convert_model(model, "acb")


# -------------------------------------------------------------------------------------------- channels-last
@pytest.mark.parametrize("block", ["acb", "dbb", "repvgg"])
def test_channels_last_in_and_out(block):
    cl = torch.channels_last
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    model = randomize_bn(model).eval().to(memory_format=cl)
    x = _x(2, 8, 8, 8).to(memory_format=cl)
    with torch.no_grad():
        y = model(x)
        convert_model(model, block, preserve=True)
        square = [p for p in model.parameters() if p.dim() == 4 and min(p.shape[-2:]) > 1]
        assert square and all(p.is_contiguous(memory_format=cl) and not p.is_contiguous() for p in square)
        out = model(x)
        assert out.is_contiguous(memory_format=cl) and rel_err(y, out) <= fold_tol(2)
        fused = reparameterize_model(model, fold_bn=True)
        kernels = [p for p in fused.parameters() if p.dim() == 4]
        assert len(kernels) == 2 and all(p.is_contiguous(memory_format=cl) and not p.is_contiguous() for p in kernels)
        out = fused(x)
        assert out.is_contiguous(memory_format=cl) and rel_err(y, out) <= fold_tol(4)


# ------------------------------------------------------------------------------------------- reload paths
def test_weights_file_reloads_after_default_save_of_a_folded_model(tmp_path):
    train_form = randomize_bn(convert_model(timm.create_model("resnet10t", num_classes=5), "acb")).eval()
    fused = reparameterize_model(train_form, fold_bn=True)
    x = _x(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="no example_input"):  # the weights file only: no export needed here
        path = save_deploy(fused, tmp_path / "deploy.pt2")  # fold_bn not given: read from the model
    assert path == weights_path(tmp_path / "deploy.pt2")
    with torch.no_grad():
        reloaded = load_deploy(path, model=train_form)
        torch.testing.assert_close(reloaded(x), fused(x), rtol=0, atol=0)  # the same fusion, the same weights
        unfolded = reparameterize_model(train_form)  # a model fused without fold_bn records that too
        save_deploy(unfolded, tmp_path / "plain.pt2")
        torch.testing.assert_close(load_deploy(tmp_path / "plain_weights.pt", model=train_form)(x), unfolded(x),
                                   rtol=0, atol=0)


def test_deploy_program_has_dynamic_height_and_width(tmp_path):
    net = randomize_bn(timm.create_model("resnet10t", num_classes=5, in_chans=1)).eval()
    fused = reparameterize_model(net, fold_bn=True)
    program = load_deploy(save_deploy(fused, tmp_path / "deploy.pt2", _x(2, 1, 16, 16)))
    with torch.no_grad():
        for shape in ((1, 1, 16, 16), (3, 1, 96, 96), (2, 1, 24, 40)):  # 16x16's last stage is 1x1: not specialised
            x = _x(*shape)
            torch.testing.assert_close(program(x), fused(x))
    flat = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)).eval()
    program = load_deploy(save_deploy(flat, tmp_path / "flat.pt2", _x(2, 1, 8, 8)))  # H/W fixed by the model
    torch.testing.assert_close(program(_x(4, 1, 8, 8)), flat(_x(4, 1, 8, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the static option exports without falling back to TorchScript
        save_deploy(fused, tmp_path / "static.pt2", _x(2, 1, 16, 16), dynamic_hw=False)
    with pytest.raises(Exception, match="16"):
        load_deploy(tmp_path / "static.pt2")(_x(1, 1, 32, 32))


def test_acb_block_fused_stays_channels_last_alone():
    block = ACBlock(4, 4).eval().to(memory_format=torch.channels_last)
    block.reparameterize()
    assert block.reparam_conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_timm_conv2d_same_and_mixed_conv_fold_but_do_not_become_blocks():
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.mixed_conv2d import MixedConv2d

    model = nn.Sequential(Conv2dSame(4, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          MixedConv2d(8, 12, [3, 5, 7]), nn.BatchNorm2d(12), nn.ReLU(),
                          nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12))
    model = randomize_bn(model).eval()
    x = _x(2, 4, 15, 15)  # odd size: TF "same" padding is asymmetric here
    with torch.no_grad():
        y = model(x)
        fused, stats = reparameterize_with_stats(model, fold_bn=True)
        assert stats.folded_bn == 3 and stats.unfolded_bn == []
        assert rel_err(y, fused(x)) <= fold_tol(3)
        report = convert_model_with_report(model, "acb", preserve=True)
        assert report.converted == ["6"] and report.ineligible == ["0", "3"]  # the run-time padding / split convs stay
        assert rel_err(y, model(x)) <= fold_tol(1)
