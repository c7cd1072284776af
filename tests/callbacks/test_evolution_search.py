"""EvolutionSearch: each metric finds the known best path of a toy space; constraints, resume, DDP, checkpoints."""

import functools
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import TensorDataset

from lightning_nd.callbacks import AngleTracker, EvolutionSearch
from lightning_nd.datamodules import ClassificationDataModule, DigitsDataModule
from lightning_nd.modules import SupernetModule
from lightning_nd.nas import Choice, Evolution, count_params, export_subnet

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nas"
DECISIONS, WIDTH = 5, 4
EA = {"population": 10, "top_k": 4, "mutations": 3, "crossovers": 3, "generations": 4, "mutation_prob": 0.3}


class ToyData(ClassificationDataModule):
    """4-d Gaussian inputs labelled by their argmax."""

    num_classes = WIDTH
    input_shape = (WIDTH,)

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__(batch_size)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(160, WIDTH, generator=g)

    def setup(self, stage=None):
        y = self.x.argmax(1)
        self.train_dataset = TensorDataset(self.x[:96], y[:96])
        self.val_dataset = TensorDataset(self.x[96:], y[96:])


class BranchNet(nn.Module):
    """``head(x + stem(x) + sum_d choice_d(x))``: every decision is a parallel branch reading the input."""

    def __init__(self, ops, stem=None) -> None:
        super().__init__()
        self.stem = stem or nn.Identity()
        self.choices = nn.ModuleList(Choice({k: f() for k, f in ops.items()}) for _ in range(DECISIONS))

    def forward(self, x):
        return x + self.stem(x) + sum(c(x) for c in self.choices)


def linear(scale: float):
    def make():
        layer = nn.Linear(WIDTH, WIDTH, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(WIDTH, WIDTH))
            layer.weight.mul_(scale / layer.weight.norm())  # equal norms: angles then depend on direction only
        return layer

    return make


def frozen(net):
    """A SupernetModule whose weights never move (lr = 0): the toy's known optimum stays the optimum."""
    return SupernetModule(net, num_classes=WIDTH, in_chans=WIDTH, calib_batches=0,
                          optimizer=functools.partial(torch.optim.SGD, lr=0.0))


def fit(module, callbacks, tmp_path, **trainer_kwargs):
    trainer_kwargs.setdefault("max_steps", 1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=callbacks, default_root_dir=tmp_path, **trainer_kwargs,
    )
    trainer.fit(module, datamodule=ToyData())
    return trainer


def read(path):
    return json.loads(Path(path).read_text())


class FlipGoodOps(pl.Callback):
    """At fit end, point op 1 of every decision opposite to its initial weights: those paths have the largest angle."""

    def on_fit_end(self, trainer, pl_module):
        with torch.no_grad():
            for choice in pl_module.net.choices:
                choice.candidates[1].weight.neg_()


def test_angle_search_finds_the_most_rotated_path(tmp_path):
    torch.manual_seed(0)
    net = BranchNet({"a": linear(1.0), "b": linear(1.0), "c": linear(1.0)})
    search = EvolutionSearch(metric="angle", dirpath=str(tmp_path), seed=0, **EA)
    fit(frozen(net), [AngleTracker(), FlipGoodOps(), search], tmp_path)
    result = read(tmp_path / "arch.json")
    assert result["best"]["arch"] == [1] * DECISIONS
    assert result["best"]["ops"] == {f"choices.{i}": "b" for i in range(DECISIONS)}
    assert result["evaluated"] == search.evolution.generation * 10 < 3**DECISIONS  # found, not enumerated
    scores = [e["score"] for e in result["top_k"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == EA["top_k"]
    assert result["best"]["params"] == count_params(export_subnet(net, [1] * DECISIONS))
    assert search.result == result and (tmp_path / "evolution_state.pt").is_file()


def wide(scale: float):
    def make():
        layer = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.Linear(2 * WIDTH, WIDTH, bias=False))
        with torch.no_grad():
            for lin in layer:
                lin.weight.mul_(scale)
        return layer

    return make


def accuracy_net():
    torch.manual_seed(1)
    # op "clean" adds nothing; "noisy" / "wide" add a random map that corrupts label = argmax(x)
    return BranchNet({"noisy": linear(1.0), "clean": linear(0.0), "wide": wide(1.0)})


def test_accuracy_search_finds_the_clean_path_under_a_params_constraint(tmp_path):
    net = accuracy_net()
    limit = DECISIONS * WIDTH * WIDTH  # "wide" has twice the parameters of the others: excluded
    ea = {**EA, "population": 8, "generations": 3}  # 24 evaluations of the 2^5 = 32 feasible paths
    search = EvolutionSearch(metric="accuracy", dirpath=str(tmp_path), calib_batches=2, seed=0,
                             params_range=(None, limit), **ea)
    fit(frozen(net), [search], tmp_path)
    result = read(tmp_path / "arch.json")
    assert result["best"]["arch"] == [1] * DECISIONS and result["best"]["score"] == 1.0
    assert len(search.evolution.records) == 24
    assert all(2 not in arch for arch, _ in search.evolution.records)  # the constraint held for every candidate
    for entry, (arch, _) in zip(result["top_k"], search.evolution.top(EA["top_k"])):
        assert entry["arch"] == arch and entry["params"] == count_params(export_subnet(net, arch)) <= limit


def test_naswot_search_finds_the_path_with_every_relu_branch(tmp_path):
    torch.manual_seed(2)

    def relu_branch():
        return nn.Sequential(nn.Linear(WIDTH, 16), nn.ReLU(), nn.Linear(16, WIDTH))

    stem = nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, WIDTH))
    net = BranchNet({"linear": linear(1.0), "relu": relu_branch, "zero": linear(0.0)}, stem=stem)
    search = EvolutionSearch(metric="naswot", naswot_batch_size=12, dirpath=str(tmp_path), seed=0, **EA)
    fit(frozen(net), [search], tmp_path)
    # each hooked ReLU adds a positive semi-definite term to a positive definite kernel: log det grows with it
    assert read(tmp_path / "arch.json")["best"]["arch"] == [1] * DECISIONS


class Interrupt(Exception):
    pass


class CountingMetric:
    """A callable metric with a known optimum (every decision = op 2); can interrupt the search once."""

    __name__ = "counting"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, pl_module, arch):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise Interrupt
        return -float(sum(a != 2 for a in arch)) + 0.01 * arch[0]


def test_callable_metric_and_a_resumed_search_equals_an_uninterrupted_one(tmp_path):
    net = accuracy_net()
    full_metric = CountingMetric()
    fit(frozen(net), [EvolutionSearch(metric=full_metric, dirpath=str(tmp_path / "full"), **EA)], tmp_path)
    full = read(tmp_path / "full" / "arch.json")
    assert full["best"]["arch"] == [2] * DECISIONS and full["metric"] == "counting"

    broken = CountingMetric(fail_after=25)  # dies inside generation 3, after two generations were saved
    with pytest.raises(Interrupt):
        fit(frozen(accuracy_net()), [EvolutionSearch(metric=broken, dirpath=str(tmp_path / "resumed"), **EA)], tmp_path)
    assert not (tmp_path / "resumed" / "arch.json").exists()
    rest = CountingMetric()
    fit(frozen(accuracy_net()), [EvolutionSearch(metric=rest, dirpath=str(tmp_path / "resumed"), **EA)], tmp_path)
    resumed = read(tmp_path / "resumed" / "arch.json")
    assert rest.calls == full_metric.calls - 20  # the two saved generations were not scored again
    assert resumed["top_k"] == full["top_k"] and resumed["history"] == full["history"]


def test_standalone_search_on_a_saved_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = BranchNet({"a": linear(1.0), "b": linear(1.0), "c": linear(1.0)})
    module = SupernetModule(net, num_classes=WIDTH, in_chans=WIDTH, calib_batches=0,
                            optimizer=functools.partial(torch.optim.SGD, lr=0.5))  # weights move: a real angle
    trainer = fit(module, [AngleTracker(), EvolutionSearch(metric="angle", dirpath=str(tmp_path / "fit"), seed=0, **EA)],
                  tmp_path, max_steps=4)
    trainer.save_checkpoint(tmp_path / "supernet.ckpt")
    at_fit_end = read(tmp_path / "fit" / "arch.json")

    torch.manual_seed(5)  # another initialisation: the checkpoint must restore weights and reference
    fresh = SupernetModule(BranchNet({"a": linear(1.0), "b": linear(1.0), "c": linear(1.0)}), num_classes=WIDTH,
                           in_chans=WIDTH, calib_batches=0)
    validator = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                           enable_model_summary=False, default_root_dir=tmp_path,
                           callbacks=[AngleTracker(), EvolutionSearch(metric="angle", run_on="validate", seed=0,
                                                                      dirpath=str(tmp_path / "ckpt"), **EA)])
    validator.validate(fresh, datamodule=ToyData(), ckpt_path=str(tmp_path / "supernet.ckpt"))
    standalone = read(tmp_path / "ckpt" / "arch.json")
    assert standalone["top_k"] == at_fit_end["top_k"]


def test_bad_configuration():
    with pytest.raises(MisconfigurationException, match="allowed: 'angle'"):
        EvolutionSearch(metric="magnitude")
    with pytest.raises(MisconfigurationException, match="exceeds population"):
        EvolutionSearch(population=10, mutations=8, crossovers=8)
    with pytest.raises(MisconfigurationException, match="run_on"):
        EvolutionSearch(run_on="test")
    with pytest.raises(MisconfigurationException, match="naswot_version"):
        EvolutionSearch(naswot_version=3)


def test_angle_without_tracker_and_infeasible_constraint_fail_clearly(tmp_path):
    with pytest.raises(MisconfigurationException, match="needs an AngleTracker"):
        fit(frozen(accuracy_net()), [EvolutionSearch(metric="angle")], tmp_path)
    search = EvolutionSearch(metric="accuracy", params_range=(0, 1), dirpath=str(tmp_path), **EA)
    with pytest.raises(RuntimeError, match="loosen the constraint"):
        fit(frozen(accuracy_net()), [search], tmp_path)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_split_search_equals_single_process(tmp_path):
    for name, kwargs in (("single", {}), ("ddp", {"strategy": "ddp_spawn_find_unused_parameters_true", "devices": 2})):
        search = EvolutionSearch(metric="accuracy", calib_batches=2, dirpath=str(tmp_path / name), seed=3, **EA)
        trainer_kwargs = {"devices": 1, **kwargs}
        devices = trainer_kwargs.pop("devices")
        trainer = pl.Trainer(
            max_steps=1, accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=[search], default_root_dir=tmp_path, **trainer_kwargs,
        )
        trainer.fit(frozen(accuracy_net()), datamodule=ToyData())
    single, ddp = read(tmp_path / "single" / "arch.json"), read(tmp_path / "ddp" / "arch.json")
    assert ddp["evaluated"] == single["evaluated"] == EA["generations"] * EA["population"]
    assert ddp["top_k"] == single["top_k"] and ddp["history"] == single["history"]
    assert ddp["best"] == single["best"] and ddp["best"]["score"] == max(h["best"] for h in single["history"])
    state = torch.load(tmp_path / "ddp" / "evolution_state.pt", weights_only=False)
    assert state["evolution"]["generation"] == EA["generations"]


# ---------------------------------------------------------------- the configs
def run_config(tmp_path, name, edit=None, *args):
    from lightning_nd.cli import main

    config = yaml.safe_load((CONFIGS / name).read_text())
    if edit is not None:
        edit(config)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    main(["fit", "-c", str(path), "--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false", *args])


def search_args(config, **init_args):
    callback = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EvolutionSearch"))
    callback["init_args"].update(init_args)


@pytest.mark.slow
@pytest.mark.parametrize(
    "space",
    [
        [],
        ["--model.supernet=shufflenet", "--model.space_kwargs={stage_repeats: [1, 1, 1, 1], "
         "stage_out_channels: [8, 16, 32, 48, 64, 128]}"],
        ["--model.supernet=mobilenet", "--model.space_kwargs={width_mult: 0.25, last_channels: 64}"],
    ],
    ids=["nb201", "shufflenet", "mobilenet"],
)
def test_rlnas_config_runs_on_every_space(tmp_path, space):
    run_config(tmp_path, "rlnas_nb201.yaml", lambda c: search_args(c, generations=2), *space)
    result = read(tmp_path / "runs" / "rlnas_nb201" / "arch.json")
    assert result["metric"] == "angle" and result["evaluated"] == 50  # fast_dev_run: one generation
    assert ("nb201" in result["best"]) == (not space)
    if not space:
        assert 10.0 <= result["best"]["nb201"]["cifar10"] <= 94.38


@pytest.mark.slow
def test_spos_and_naswot_configs_run(tmp_path):
    small = {"population": 4, "top_k": 2, "mutations": 1, "crossovers": 1, "generations": 2}
    run_config(tmp_path, "spos_search_nb201.yaml", lambda c: search_args(c, calib_batches=1, val_batches=1, **small))
    spos = read(tmp_path / "runs" / "spos_search_nb201" / "arch.json")
    assert spos["metric"] == "accuracy" and all(e["flops"] <= 6.0e6 for e in spos["top_k"])

    def shrink(config):
        search_args(config, population=3, top_k=2, naswot_batch_size=8)
        config["model"]["init_args"]["space_kwargs"] = {"C": 4, "N": 1}

    run_config(tmp_path, "naswot_nb201.yaml", shrink)
    naswot = read(tmp_path / "runs" / "naswot_nb201" / "arch.json")
    assert naswot["metric"] == "naswot" and naswot["evaluated"] == 3


def test_scoring_batches_depend_on_the_seed_alone():
    from lightning_nd.callbacks.evolution_search import fixed_batches
    from lightning_nd.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=8, augment=True)
    dm.setup("fit")
    state = torch.get_rng_state()
    cached = fixed_batches(dm.train_dataloader, 3, seed=4)
    streamed = fixed_batches(dm.train_dataloader, 3, seed=4, cache=False)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    for _ in range(2):  # re-read identically on every pass (shuffling and augmentation seeded)
        assert len(list(streamed)) == 3
        for (xa, ya), (xb, yb) in zip(cached, streamed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = fixed_batches(dm.train_dataloader, 3, seed=5)
    assert not torch.equal(other[0][0], cached[0][0])
    assert len(fixed_batches(dm.val_dataloader, None, seed=0)) == len(dm.val_dataloader())


def test_naswot_runs_under_validate_inference_mode(tmp_path):
    """metric='naswot' with run_on='validate': scored outside inference mode, with grad on (v1 needs autograd)."""
    torch.manual_seed(0)
    module = SupernetModule("nb201", num_classes=10, space_kwargs={"C": 4, "N": 1}, calib_batches=0)
    for version in (1, 2):
        search = EvolutionSearch(metric="naswot", naswot_version=version, run_on="validate", naswot_batch_size=16,
                                 dirpath=str(tmp_path / f"v{version}"), seed=0, **EA)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, callbacks=[search],
                             limit_val_batches=1, inference_mode=True)
        trainer.validate(module, datamodule=DigitsDataModule(image_size=8, channels=3, batch_size=16))
        best = read(tmp_path / f"v{version}" / "arch.json")["best"]
        assert np.isfinite(best["score"]) and 0.0 <= best["nb201"]["percentile"]["cifar10"] <= 100.0


def test_ties_are_broken_by_the_encoding_not_by_evaluation_order():
    """Scores equal up to tie_decimals rank by architecture encoding, whatever the order they were told in."""
    options = [[0, 1, 2], [0, 1, 2]]
    picks = []
    for order in ([[2, 2], [0, 1], [1, 0]], [[1, 0], [2, 2], [0, 1]]):
        evolution = Evolution(options, population=3, top_k=3, mutations=0, crossovers=0, generations=1)
        evolution.pending = order
        noise = {(2, 2): 0.5 + 3e-8, (0, 1): 0.5 - 2e-8, (1, 0): 0.5}  # float noise below 1e-6
        evolution.tell(order, [noise[tuple(a)] for a in order])
        picks.append([a for a, _ in evolution.top()])
    assert picks[0] == picks[1] == [[0, 1], [1, 0], [2, 2]]


def test_a_search_resumed_with_other_settings_never_reuses_the_old_result(tmp_path):
    folder = str(tmp_path / "run")
    first = CountingMetric()
    fit(frozen(accuracy_net()), [EvolutionSearch(metric=first, dirpath=folder, seed=0, **EA)], tmp_path)
    assert read(tmp_path / "run" / "arch.json")["best"]["arch"] == [2] * DECISIONS

    # the same folder, another metric: the finished "counting" search must not be reported as the accuracy search
    other = EvolutionSearch(metric="accuracy", dirpath=folder, calib_batches=1, seed=0, **EA)
    with pytest.warns(UserWarning, match="other settings.*metric"):
        fit(frozen(accuracy_net()), [other], tmp_path)
    result = read(tmp_path / "run" / "arch.json")
    # an accuracy of the toy (> 0.5), not the counting score (<= 0.04) of the finished search
    assert result["metric"] == "accuracy" and result["best"]["score"] > 0.5
    assert other.evolution.generation == EA["generations"] and len(other.evolution.records) > 0

    # the same metric under a params limit that excludes the old pick: searched again, the limit holds
    again = CountingMetric()
    limit = DECISIONS * WIDTH * WIDTH  # op 2 ("wide") has twice the parameters: excluded
    with pytest.warns(UserWarning, match="params_range"):
        fit(frozen(accuracy_net()),
            [EvolutionSearch(metric=again, dirpath=folder, seed=0, params_range=(None, limit), **EA)], tmp_path)
    result = read(tmp_path / "run" / "arch.json")
    assert again.calls > 0 and 2 not in result["best"]["arch"]
    assert result["settings"]["params_range"] == [None, limit]

    # unchanged settings still resume: nothing is scored again
    same = CountingMetric()
    fit(frozen(accuracy_net()),
        [EvolutionSearch(metric=same, dirpath=folder, seed=0, params_range=[None, limit], **EA)], tmp_path)
    assert same.calls == 0 and read(tmp_path / "run" / "arch.json")["top_k"] == result["top_k"]


class FunctionalReluBranch(nn.Module):
    """The ``relu`` branch of the NASWOT test written with ``torch.relu`` (a user's own space)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(WIDTH, 16), nn.Linear(16, WIDTH)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_naswot_search_reads_functional_relus_and_stops_when_it_cannot_rank(tmp_path):
    torch.manual_seed(2)
    stem = nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, WIDTH))
    net = BranchNet({"linear": linear(1.0), "relu": FunctionalReluBranch, "zero": linear(0.0)}, stem=stem)
    search = EvolutionSearch(metric="naswot", naswot_batch_size=12, dirpath=str(tmp_path / "f"), seed=0, **EA)
    fit(frozen(net), [search], tmp_path)
    result = read(tmp_path / "f" / "arch.json")
    assert result["best"]["arch"] == [1] * DECISIONS  # as with nn.ReLU modules: every ReLU branch
    assert len({e["score"] for e in result["top_k"]}) == EA["top_k"]

    # candidate ops without any ReLU: the kernel is the stem's for every path, equal scores -> a clear error
    torch.manual_seed(2)
    flat = BranchNet({"a": linear(1.0), "b": linear(0.5), "c": linear(0.0)}, stem=stem)
    with pytest.raises(RuntimeError, match="does not tell these paths apart.*ReLU"):
        fit(frozen(flat), [EvolutionSearch(metric="naswot", naswot_batch_size=12, dirpath=str(tmp_path / "g"),
                                           seed=0, **EA)], tmp_path)
    assert not (tmp_path / "g" / "arch.json").exists()


class ShapelessData(ToyData):
    input_shape = None


def test_unknown_input_shape_warns_that_flops_and_params_are_null(tmp_path):
    search = EvolutionSearch(metric=CountingMetric(), dirpath=str(tmp_path), seed=0, **{**EA, "generations": 1})
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_steps=1,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[search], default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="flops and params null; pass input_shape"):
        trainer.fit(frozen(accuracy_net()), datamodule=ShapelessData())
    best = read(tmp_path / "arch.json")["best"]
    assert best["flops"] is None and best["params"] is None
    # given the shape, they are filled (and no warning is needed)
    shaped = EvolutionSearch(metric=CountingMetric(), dirpath=str(tmp_path / "s"), seed=0, input_shape=(WIDTH,),
                             **{**EA, "generations": 1})
    fit(frozen(accuracy_net()), [shaped], tmp_path)
    assert read(tmp_path / "s" / "arch.json")["best"]["params"] is not None
