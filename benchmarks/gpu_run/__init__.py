"""The GPU run (issue 16): each family's claims at the largest scale the offline data allows, in one command that
fits a lent GPU's minutes. ``python benchmarks/gpu_run.py`` is the entry point; see its docstring for how to run it
on the lent machine. Parts live in ``nas``, ``reparam`` and ``implicit``; ``runner`` times, caps and reports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gpu_run import implicit, nas, reparam


@dataclass
class Config:
    """Every size and budget of the run: the defaults are for the lent H200, ``smoke_test()`` is the CPU check."""

    device: str = "cuda"  # torch device of every part
    smoke: bool = False  # tiny sizes on the CPU: the same code paths, not the claims
    budget_s: float = 460.0  # wall seconds for the whole run, from the command's start to the last write (smoke:
    # a safety net only; its tiny sizes bound the work, so it ends in well under a minute on an idle 2-core CPU)
    parallel: bool = True  # training parts share the device at the same time (each then has the whole window)
    alone_caps: dict[str, float] = field(default_factory=lambda: {"reparam_speed": 60.0, "deq_speed": 30.0})
    caps: dict[str, float] = field(default_factory=dict)  # per-part overrides of the hard cap (seconds)
    grace_s: float = 12.0  # a part's own budget ends this long before it is killed at its cap
    final_s: float = 8.0  # kept for the last write
    overrun: tuple[str, ...] = ()  # fault injection (tests): these parts ignore their budget after their first report
    threads: int = 4  # torch CPU threads per part
    start_method: str = "auto"  # how parts start: fork, spawn, or auto (fork unless a forked process cannot use CUDA)
    test_subset: int | None = None  # evaluate classifiers on the first N official test images (None: all 10,000)
    data_dir: Path | None = None  # Fashion-MNIST idx folder (found up front)
    seed: int = 0
    compile: bool = True  # also time torch.compile'd RepVGG-A0 forms (kept only as an extra row)
    calib_steps: int = 30  # timed steps before a training run plans how many steps fit
    calib_skip: int = 5  # untimed steps before them (on a GPU the first steps load kernels and create handles)
    # NAS
    nas_C: int = 16
    nas_N: int = 5
    nas_batch: int = 256
    nas_lr: float = 0.1  # 0.025 at batch 64 (RLNAS), scaled linearly
    nas_train_subset: int | None = None
    nas_max_steps: int | None = None  # None: as many as the budget allows
    nas_cells: int = 1000
    naswot_batch: int = 128
    naswot_share: float = 0.1  # at most this share of the part's budget goes to NASWOT
    nas_reserve: float = 25.0  # seconds kept after training for the angle passes and the correlations
    evo_population: int = 50
    evo_generations: int = 20
    # re-parameterization
    reparam_seeds: int = 3
    reparam_batch: int = 128
    reparam_lr: float = 0.1
    reparam_max_epochs: int = 30
    reparam_train_subset: int | None = None
    reparam_reserve: float = 5.0
    speed_batch: int = 64
    speed_size: int = 224
    speed_rounds: int = 20
    speed_warmup: int = 5
    # implicit
    mdeq_recipe: str = "wide_b4"  # deq_fashion.py recipe (its CONFIG_RECIPE, that of mdeq_tiny_fashion.yaml)
    mdeq_batch: int = 128
    mdeq_lr: float = 2e-3
    mdeq_share: float = 0.75  # of the part's budget for the MDEQ (the ResNet is several times faster per step)
    mdeq_train_subset: int | None = None
    mdeq_max_steps: int | None = None  # None: as many as the MDEQ's share of the budget allows
    mdeq_warmup_steps: int | None = None  # unrolled warm-up steps (None: the recipe's)
    mdeq_reserve: float = 10.0
    deq_speed_steps: int = 30
    ifpn_size: int = 128
    ifpn_train: int = 4000
    ifpn_val: int = 500
    ifpn_batch: int = 16
    ifpn_lr: float = 1e-3
    ifpn_max_steps: int | None = None
    ifpn_reserve: float = 20.0

    @classmethod
    def smoke_test(cls, **kw: Any) -> Config:
        """Tiny sizes on the CPU: every code path of the GPU run, bounded by step counts, not by the budget."""
        return replace(cls(
            device="cpu", smoke=True, budget_s=150.0, parallel=False, alone_caps={"reparam_speed": 20.0, "deq_speed": 20.0},
            grace_s=2.0, final_s=1.0, threads=1, test_subset=200, compile=False, calib_steps=2, calib_skip=1,
            nas_C=4, nas_N=1, nas_batch=32, nas_lr=0.05, nas_train_subset=256, nas_max_steps=24, nas_cells=12,
            naswot_batch=16,
            naswot_share=0.3, nas_reserve=3.0, evo_population=8, evo_generations=2,
            reparam_seeds=1, reparam_batch=32, reparam_max_epochs=1, reparam_train_subset=128, reparam_reserve=1.0,
            speed_batch=2, speed_size=64, speed_rounds=2, speed_warmup=1,
            mdeq_batch=32, mdeq_train_subset=128, mdeq_max_steps=12, mdeq_warmup_steps=4, mdeq_reserve=2.0, deq_speed_steps=2,
            ifpn_size=64, ifpn_train=16, ifpn_val=4, ifpn_batch=2, ifpn_max_steps=4, ifpn_reserve=3.0,
        ), **kw)

    def with_(self, **kw: Any) -> Config:
        return replace(self, **kw)


@dataclass(frozen=True)
class Part:
    """One claim's measurement: its function, how to render its record, its glance rows, and how it is scheduled."""

    title: str  # section title in the report
    run: Callable[[Any], None]  # run(ctx): measures and calls ctx.report(...) as it goes
    render: Callable[[dict], list[str]]  # markdown lines of a record (partial records too)
    glance: Callable[[dict, str], list[dict[str, str]]] | None = None  # README glance rows of a record
    alone: bool = False  # timing part: runs first, alone on the device, under alone_caps
    weight: float = 1.0  # share of the window when the training parts run one after another
    needs: tuple[str, ...] = ()  # Python modules it imports beyond the project's own dependencies


PARTS: dict[str, Part] = {
    "reparam_speed": Part("Re-parameterization: RepVGG-A0 inference, training form vs deploy form", reparam.speed,
                          reparam.render_speed, reparam.glance_speed, alone=True, needs=("timm",)),
    "deq_speed": Part("Implicit: MDEQ-tiny vs ResNet training step, alone on the device", implicit.deq_speed,
                      implicit.render_deq_speed, implicit.glance_deq_speed, alone=True),
    "nas": Part("NAS: angle and NASWOT vs NAS-Bench-201 (random-label nb201 supernet)", nas.run,
                nas.render, nas.glance, weight=2.0, needs=("scipy",)),
    "reparam": Part("Re-parameterization: plain vs ACB vs DBB vs RepVGG-style on Fashion-MNIST",
                    reparam.accuracy, reparam.render_accuracy, reparam.glance_accuracy),
    "mdeq": Part("Implicit: MDEQ-tiny vs an equal-size ResNet on Fashion-MNIST", implicit.mdeq,
                 implicit.render_mdeq, implicit.glance_mdeq),
    "ifpn": Part("Implicit: i-FPN vs FPN RetinaNet on shapes", implicit.ifpn, implicit.render_ifpn,
                 implicit.glance_ifpn, needs=("pycocotools", "torchvision")),
}
