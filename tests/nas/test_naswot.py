"""NASWOT scores: v2 Hamming kernel and v1 Jacobian covariance, against direct computations."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nd.nas import Choice, export_subnet, set_arch
from lightning_nd.nas.naswot import hamming_kernel, jacobian, naswot_score


def small_cnn(seed=0, width=8):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 5),
    ).double()


def batch(n=32, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_v2_is_invariant_to_batch_order_and_leaves_the_model_untouched():
    model = small_cnn().eval()
    x = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score = naswot_score(model, (x, torch.zeros(len(x))))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    assert naswot_score(model, x[perm]) == pytest.approx(score, rel=1e-12, abs=1e-9)
    kernel, permuted = hamming_kernel(model, x), hamming_kernel(model, x[perm])
    assert torch.equal(permuted, kernel[perm][:, perm])
    assert not model.training  # mode restored
    for key, value in model.state_dict().items():  # BN running stats and weights unchanged
        assert torch.equal(value, before[key]), key
    assert math.isfinite(score)


def test_v2_kernel_counts_agreeing_relu_units():
    # a lone ReLU on the raw input: K_ij = number of coordinates where x_i and x_j have the same sign (> 0 or not)
    x = batch(6).reshape(6, -1)
    code = (x > 0).numpy()
    expected = (code[:, None, :] == code[None, :, :]).sum(-1)
    kernel = hamming_kernel(nn.Sequential(nn.ReLU(), nn.Linear(x.shape[1], 2).double()), x)
    assert kernel.dtype == torch.float64
    np.testing.assert_array_equal(kernel.numpy(), expected)
    assert naswot_score(nn.Sequential(nn.ReLU()), x) == pytest.approx(float(np.linalg.slogdet(expected)[1]))


def test_v1_matches_per_sample_gradients_and_the_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 3)).double()  # no BN: per-sample
    x = batch(10)[:, :, :4, :4]
    jac = jacobian(model, x)
    for i in (0, 7):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xi).sum(), xi)
        torch.testing.assert_close(jac[i], grad.reshape(-1))
    eig = np.linalg.eigvalsh(np.corrcoef(jac.numpy()))
    expected = -np.sum(np.log(eig + 1e-5) + 1.0 / (eig + 1e-5))
    assert naswot_score(model, x, version=1) == pytest.approx(expected, rel=1e-9)
    # an output that ignores the input (a disconnected cell) gives no ranking information: NaN, ranked last
    dead = nn.Sequential(nn.Flatten(), nn.Linear(48, 3).double())
    nn.init.zeros_(dead[1].weight)
    assert math.isnan(naswot_score(dead, x, version=1))


def test_supernet_path_scores_like_the_exported_subnet():
    torch.manual_seed(0)
    supernet = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        Choice({"conv": nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)), "skip": nn.Identity()}),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4),
    ).double()
    x = batch(16)
    scores = {}
    for arch in ([0], [1]):
        scores[tuple(arch)] = naswot_score(supernet, x, arch=arch)
        set_arch(supernet, arch)
        assert naswot_score(export_subnet(supernet, arch), x) == pytest.approx(scores[tuple(arch)], rel=1e-12)
    assert scores[(0,)] != scores[(1,)]  # the extra ReLU of the conv path adds units to the kernel


def test_bad_input():
    with pytest.raises(ValueError, match="allowed: 1"):
        naswot_score(small_cnn(), batch(), version=3)
    with pytest.raises(ValueError, match="no ReLU"):
        naswot_score(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)).double(), batch())
    with pytest.raises(ValueError, match="at least 2"):
        naswot_score(small_cnn(), batch(1))


class FunctionalCNN(nn.Module):
    """``small_cnn`` with its ReLU modules replaced by functional calls (``relu`` picks which one)."""

    def __init__(self, relu, seed=0, width=8):
        super().__init__()
        modules = small_cnn(seed, width)
        self.c1, self.b1, self.c2, self.b2, self.pool, self.head = (modules[i] for i in (0, 1, 3, 4, 6, 8))
        self.relu = relu

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(x)))
        return self.head(self.pool(x).flatten(1))


@pytest.mark.parametrize("relu", [torch.relu, nn.functional.relu, torch.Tensor.relu,
                                  lambda t: nn.functional.relu(t, inplace=True)],
                         ids=["torch.relu", "F.relu", "Tensor.relu", "F.relu_inplace"])
def test_v2_counts_functional_relus_exactly_as_relu_modules(relu):
    x = batch()
    modules, functional = small_cnn(), FunctionalCNN(relu)
    torch.testing.assert_close(hamming_kernel(functional, x), hamming_kernel(modules, x), rtol=0, atol=0)
    # the official, module-only rule has nothing to hook in the functional network: a clear error, not a constant
    with pytest.raises(ValueError, match="no ReLU modules"):
        naswot_score(functional, x, functional=False)


def test_v2_does_not_count_a_relu_module_twice():
    # nn.ReLU calls F.relu inside its forward: with functional counting on, the module is still counted once
    model, x = small_cnn(), batch()
    torch.testing.assert_close(hamming_kernel(model, x), hamming_kernel(model, x, functional=False), rtol=0, atol=0)


def test_functional_relu_supernet_paths_get_distinct_scores():
    class Act(nn.Module):  # a candidate op whose activation is functional (a user's own space)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(x))

    torch.manual_seed(0)
    supernet = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        Choice({"act": Act(), "conv": nn.Conv2d(8, 8, 3, padding=1), "skip": nn.Identity()}),
        nn.Flatten(), nn.Linear(8 * 64, 4),
    ).double()
    x = batch(16)
    score = naswot_score(supernet, x, arch=[0])
    set_arch(supernet, [0])
    assert math.isfinite(score) and score == pytest.approx(naswot_score(export_subnet(supernet, [0]), x), rel=1e-12)
    # the paths without any ReLU have nothing to score: an error, not equal (tie-broken) scores
    for arch in ([1], [2]):
        with pytest.raises(ValueError, match="no ReLU ran"):
            naswot_score(supernet, x, arch=arch)


def test_an_activation_naswot_cannot_read_is_an_error():
    with pytest.raises(ValueError, match="no ReLU ran.*GELU"):
        naswot_score(nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.GELU(), nn.Linear(8, 2)).double(), batch())
