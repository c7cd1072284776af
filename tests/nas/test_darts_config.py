"""The DARTS configs through ``lnd fit``: RLNAS search writes an arch.json with a genotype, the retrain config
trains that genotype and ReparamFuse writes a verified deploy model."""

import json
from pathlib import Path

import pytest
import yaml

from lightning_nd.nas import build_space
from lightning_nd.nas.arch import canonical_arch, decisions
from lightning_nd.nas.spaces.darts import Genotype, resolve_genotype

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "nas"
FAST = ["--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_rlnas_darts_search_then_retrain(tmp_path):
    from lightning_nd.cli import main

    config = yaml.safe_load((CONFIGS / "rlnas_darts.yaml").read_text())
    config["model"]["init_args"]["space_kwargs"].update(C=4, layers=3)
    config["data"]["init_args"]["datamodule"]["init_args"]["train_subset"] = 256
    search = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EvolutionSearch"))
    search["init_args"].update(population=6, top_k=2, mutations=2, crossovers=2, generations=2)
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "-c", str(tmp_path / "search.yaml"), *FAST])
    arch_json = tmp_path / "runs" / "rlnas_darts" / "arch.json"
    best = json.loads(arch_json.read_text())["best"]
    genotype = resolve_genotype(arch_json)
    assert isinstance(genotype, Genotype) and len(genotype.normal) == len(genotype.reduce) == 8
    assert [list(p) for p in genotype.normal] == best["genotype"]["normal"]
    for kind in ("normal", "reduce"):  # the genotype is what the ops say: 2 distinct inputs per node, chosen ops
        pairs = getattr(genotype, kind)
        for n in range(4):
            (op_a, a), (op_b, b) = pairs[2 * n], pairs[2 * n + 1]
            assert best["ops"][f"{kind}.n{n + 2}.inputs"] == f"{a}+{b}"
            assert best["ops"][f"{kind}.n{n + 2}<-{a}"] == op_a and best["ops"][f"{kind}.n{n + 2}<-{b}"] == op_b
    model_args = config["model"]["init_args"]  # the search draws one spelling per network: unused edges canonical
    supernet = build_space("darts", num_classes=model_args["num_classes"], in_chans=model_args["in_chans"],
                           **model_args["space_kwargs"])
    assert best["arch"] == canonical_arch(decisions(supernet), best["arch"])

    retrain = yaml.safe_load((CONFIGS / "retrain_darts.yaml").read_text())
    shipped = retrain["model"]["init_args"]["model"]["init_args"]
    assert shipped["genotype"] == search["init_args"]["dirpath"] + "/arch.json"  # the config chain as shipped
    shipped.update(C=4, layers=3)
    retrain["data"]["init_args"]["train_subset"] = 256
    (tmp_path / "retrain.yaml").write_text(yaml.safe_dump(retrain))
    main(["fit", "-c", str(tmp_path / "retrain.yaml"), *FAST])
    report = json.loads(next((tmp_path / "runs" / "retrain_darts").rglob("reparam_report.json")).read_text())
    assert report["passed"] and report["batchnorms_deploy"] < report["batchnorms_train"]
