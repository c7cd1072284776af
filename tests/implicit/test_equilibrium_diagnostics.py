"""Diagnostics of whether a DEQ uses its equilibrium: contraction estimate and one-application gap (issue 22)."""

import pytest
import torch
from torch import nn

from lightning_nd.implicit import DEQ
from lightning_nd.implicit.diagnostics import (
    EquilibriumReport,
    contraction_estimate,
    diagnose_equilibrium,
    equilibrium_report,
    equilibrium_warnings,
)

DIM = 6


class LinearCell(nn.Module):
    """z <- z A^T + x with a symmetric A of known spectrum (largest |eigenvalue| = ``radius``)."""

    def __init__(self, radius: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=torch.float64))
        eig = torch.tensor([-radius, 0.5, 0.3, -0.2, 0.1, 0.05], dtype=torch.float64)
        self.register_buffer("a", q @ torch.diag(eig) @ q.T)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z @ self.a.T + x


class ForgetfulCell(nn.Module):
    """A cell that ignores its state: the equilibrium is one application (the degenerate case to flag)."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) + 0.0 * z


class Net(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Linear(DIM, DIM, dtype=torch.float64)
        self.deq = DEQ(cell, f_solver="anderson", f_tol=1e-12, f_max_iter=300, f_stop_mode="abs")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deq(self.stem(x)).sum(dim=1)


def test_contraction_estimate_is_the_spectral_radius_of_a_linear_cell():
    cell = LinearCell(radius=0.9)
    x = torch.randn(4, DIM, dtype=torch.float64)
    rho = contraction_estimate(lambda z: cell(z, x), torch.zeros_like(x), iters=60,
                               generator=torch.Generator().manual_seed(1))
    expected = float(torch.linalg.eigvals(cell.a).abs().max())
    assert rho.shape == (4,)
    torch.testing.assert_close(rho, torch.full_like(rho, expected), rtol=1e-8, atol=0)  # (0.5 / 0.9)^60 ~ 5e-16


def test_gap_and_residual_match_the_closed_form_solution():
    cell = LinearCell(radius=0.8)
    deq = DEQ(cell, f_solver="anderson", f_tol=1e-13, f_max_iter=300, f_stop_mode="abs").eval()
    x = torch.randn(3, DIM, dtype=torch.float64)
    report = equilibrium_report(deq, x, generator=torch.Generator().manual_seed(0), iters=60)
    z_star = torch.linalg.solve(torch.eye(DIM, dtype=torch.float64) - cell.a, x.T).T  # z* = (I - A)^-1 x
    gap = (x - z_star).norm(dim=1) / z_star.norm(dim=1)  # one application from zero gives x
    assert report.gap == pytest.approx(float(gap.mean()), rel=1e-9)
    assert report.gap_min == pytest.approx(float(gap.min()), rel=1e-9)
    assert report.residual < 1e-10 and 0 < report.nfe < 300
    assert report.contraction == pytest.approx(0.8, rel=1e-8)
    assert set(report.as_dict("deq/")) == {f"deq/{k}" for k in
                                           ("contraction", "contraction_max", "gap", "gap_min", "residual", "nfe")}


def test_diagnose_equilibrium_reports_every_deq_on_the_input_it_received():
    net = Net(LinearCell(radius=0.7)).eval()
    x = torch.randn(5, DIM, dtype=torch.float64)
    reports = diagnose_equilibrium(net, lambda: net(x), iters=60, generator=torch.Generator().manual_seed(0))
    assert list(reports) == ["deq"]
    with torch.no_grad():
        direct = equilibrium_report(net.deq, net.stem(x), iters=60, generator=torch.Generator().manual_seed(0))
    assert reports["deq"] == direct
    assert not net.deq._forward_pre_hooks  # the capture hooks are removed again
    with torch.inference_mode():  # as in Lightning's validation loop: the VJPs still run, on normal copies
        x_inf = x.clone()
        assert diagnose_equilibrium(net, lambda: net(x_inf), iters=60,
                                    generator=torch.Generator().manual_seed(0))["deq"] == direct
        assert equilibrium_report(net.deq, net.stem(x_inf), iters=60,
                                  generator=torch.Generator().manual_seed(0)) == direct


def test_warnings_flag_a_deq_whose_equilibrium_adds_nothing():
    x = torch.randn(5, DIM, dtype=torch.float64)
    forgetful, linear = Net(ForgetfulCell()).eval(), Net(LinearCell(radius=0.7)).eval()
    flat = diagnose_equilibrium(forgetful, lambda: forgetful(x))
    assert flat["deq"].gap < 1e-12 and flat["deq"].contraction < 1e-12
    messages = equilibrium_warnings(flat)
    assert len(messages) == 1 and "'deq' does not use its equilibrium" in messages[0]
    assert equilibrium_warnings(diagnose_equilibrium(linear, lambda: linear(x))) == []
    report = EquilibriumReport(contraction=0.5, contraction_max=0.6, gap=0.01, gap_min=0.0, residual=0.0, nfe=3)
    assert len(equilibrium_warnings({"a": report})) == 1  # a small gap alone is enough
    assert equilibrium_warnings({"a": report}, min_gap=0.0) == []


def test_bad_arguments():
    cell = LinearCell()
    x = torch.randn(2, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="iters=0"):
        contraction_estimate(lambda z: cell(z, x), x, iters=0)
    with pytest.raises(ValueError, match="min_gap=-1"):
        equilibrium_warnings({}, min_gap=-1)
    with pytest.raises(ValueError, match="callable .cell"):
        equilibrium_report(nn.Linear(2, 2), x)
