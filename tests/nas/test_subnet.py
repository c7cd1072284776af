"""Subnet: the standalone network of an arch.json / cell string, for retraining from scratch."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_nd.nas import Subnet, arch_to_json, build_space, count_params
from lightning_nd.nas.bench import NB201

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nas"
CELL = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|none~0|nor_conv_3x3~1|avg_pool_3x3~2|"  # index 11


def write_arch_json(path, space, arch, **space_kwargs):
    net = build_space(space, num_classes=10, **space_kwargs)
    best = arch_to_json(net, arch, score=1.0)
    path.write_text(json.dumps({"metric": "angle", "best": best, "top_k": [best]}))
    return path


def test_subnet_from_arch_json_is_the_benchmark_network(tmp_path):
    from lightning_nd.nas.spaces.nb201 import str_to_arch

    path = write_arch_json(tmp_path / "arch.json", "nb201", str_to_arch(CELL), C=4, N=1)  # searched on a small net
    net = Subnet("nb201", str(path), num_classes=10)  # retrained at the benchmark's width (C=16, N=5)
    assert count_params(net) == round(NB201.params(CELL) * 1e6) == 802426
    assert net.arch == str_to_arch(CELL) and net.arch_json()["ops"]["3<-0"] == "none"
    assert not any(type(m).__name__ == "Choice" for m in net.modules())
    # an official string and a plain index list give the same network; the seed fixes the initialisation
    small = Subnet("nb201", str(path), num_classes=10, space_kwargs={"C": 4, "N": 1})
    by_string = Subnet("nb201", CELL, num_classes=10, C=4, N=1)
    by_list = Subnet("nb201", str_to_arch(CELL), num_classes=10, C=4, N=1)
    for a, b, c in zip(small.state_dict().values(), by_string.state_dict().values(), by_list.state_dict().values()):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    state = torch.get_rng_state()
    Subnet("nb201", CELL, num_classes=10, seed=3, C=4, N=1)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_arch_json_that_does_not_fit_the_space_is_a_clear_error(tmp_path):
    nb = build_space("nb201", num_classes=10, C=4, N=1)
    data = arch_to_json(nb, [3, 3, 3, 1, 3, 2])
    wrong_key = dict(data, ops={**{k: v for k, v in data["ops"].items() if k != "3<-2"}, "4<-3": "none"})
    (tmp_path / "keys.json").write_text(json.dumps({"best": wrong_key}))
    with pytest.raises(ValueError, match="does not fit the 'nb201' space"):
        Subnet("nb201", str(tmp_path / "keys.json"))
    wrong_op = dict(data, ops={**data["ops"], "1<-0": "sep_conv_5x5"})
    (tmp_path / "op.json").write_text(json.dumps(wrong_op))
    with pytest.raises(ValueError, match="sep_conv_5x5"):
        Subnet("nb201", str(tmp_path / "op.json"))
    shuffle = build_space("shufflenet", num_classes=10, input_size=32, stage_repeats=[1, 1, 1, 1],
                          stage_out_channels=[8, 16, 32, 48, 64, 128])
    (tmp_path / "shuffle.json").write_text(json.dumps({"best": arch_to_json(shuffle, [0, 1, 2, 3])}))
    with pytest.raises(ValueError, match="does not fit"):
        Subnet("nb201", str(tmp_path / "shuffle.json"))
    with pytest.raises(ValueError, match="entries"):
        Subnet("nb201", [0, 1, 2])
    with pytest.raises(FileNotFoundError, match="arch.json"):
        Subnet("nb201", str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_retrain_config_trains_the_subnet_of_an_arch_json(tmp_path):
    from lightning_nd.cli import main

    write_arch_json(tmp_path / "arch.json", "nb201", [3, 3, 3, 1, 3, 2], C=8, N=1)
    config = yaml.safe_load((CONFIGS / "retrain_nb201.yaml").read_text())
    config["model"]["init_args"]["model"]["init_args"].update(arch=str(tmp_path / "arch.json"), space_kwargs={"C": 4, "N": 1})
    config["data"]["init_args"]["train_subset"] = 256
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "-c", str(tmp_path / "retrain.yaml"), "--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false"])
    # the YAML as shipped points at the arch.json the RLNAS config writes and retrains at the benchmark's width
    shipped = yaml.safe_load((CONFIGS / "retrain_nb201.yaml").read_text())["model"]["init_args"]["model"]["init_args"]
    rlnas = yaml.safe_load((CONFIGS / "rlnas_nb201.yaml").read_text())["trainer"]["callbacks"]
    assert shipped["arch"] == next(c for c in rlnas if "EvolutionSearch" in c["class_path"])["init_args"]["dirpath"] + "/arch.json"
    assert shipped["space_kwargs"] == {"C": 16, "N": 5}
