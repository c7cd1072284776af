"""A trained tiny DEQ is a real equilibrium: solving it further at test time does not lower its accuracy (issue 22).

The MDEQ of benchmarks/results/deq_fashion.md lost accuracy when its test-time cap went from 6 to 8: trained with
a cap its solves never got under the tolerance, it had learned a 6-step weight-tied network, not an equilibrium.
The same happens to a tiny DEQ here (the control); trained with Jacobian regularisation (the literature's means,
reference deq.md section 5) its solves reach the tolerance within the training cap, its accuracy on a fixed batch
does not drop at larger caps, and it still uses its equilibrium (the one-application gap is not small).
"""

import torch
from torch import nn

from lightning_nd.implicit import DEQ
from lightning_nd.implicit.diagnostics import diagnose_equilibrium
from tests.implicit.helpers import ConvCell

CAPS = (6, 8, 12, 16, 30)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1x6x6 images; the label says which half (top or bottom) is brighter: learnable, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen)
    y = (x[:, :, :3].mean(dim=(1, 2, 3)) > x[:, :, 3:].mean(dim=(1, 2, 3))).long()
    return x, y


class Net(nn.Module):
    def __init__(self, jac_weight: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36, 2)
        self.jac_weight = jac_weight
        self.deq = DEQ(ConvCell(4, scale=0.6), f_solver="anderson", f_max_iter=CAPS[0], f_tol=1e-3,
                       f_stop_mode="rel", b_solver="anderson", b_max_iter=12, b_tol=1e-4, b_stop_mode="rel",
                       jac_reg=jac_weight > 0, warn_diverged=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.stem(x)).flatten(1))


def _train_and_sweep(jac_weight: float) -> tuple[Net, dict[int, float], float]:
    net = Net(jac_weight)
    x, y = _data()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(80):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        if jac_weight:
            loss = loss + jac_weight * net.deq.jac_loss
        loss.backward()
        opt.step()
    net.eval()
    x, y = _data(seed=1)  # a fixed held-out batch
    acc, converged = {}, 0.0
    with torch.no_grad():
        for cap in CAPS:
            net.deq.config.eval_f_max_iter = cap
            acc[cap] = float((net(x).argmax(1) == y).float().mean())
            if cap == CAPS[0]:
                converged = float(net.deq.last_stats.forward.converged.float().mean())
    return net, acc, converged


def test_larger_test_time_caps_do_not_lower_the_accuracy_of_a_trained_deq():
    net, acc, converged = _train_and_sweep(jac_weight=0.5)
    assert acc[CAPS[0]] > 0.7, acc  # it learned the task
    assert all(acc[cap] >= acc[CAPS[0]] for cap in CAPS), acc
    assert converged >= 0.9  # the solves stop at the tolerance within the training cap, not at the cap
    net.deq.config.eval_f_max_iter = None
    report = diagnose_equilibrium(net, lambda: net(_data(seed=1)[0]))["deq"]
    assert report.contraction < 1 and report.gap > 0.05  # a contraction, and iterating it still matters


def test_control_without_jacobian_regularisation_the_deq_is_a_capped_network():
    _, acc, converged = _train_and_sweep(jac_weight=0.0)
    assert converged < 0.5  # its training solves stopped at the cap
    assert acc[CAPS[-1]] < acc[CAPS[0]], acc  # and solving further costs accuracy
