"""Conv -> BN pairs found from the dataflow, per model: every torchvision classification model and a timm sample.

For each model: BatchNorms, verified pairs (:func:`lightning_nd.reparam.find_conv_bn_pairs`, a ``torch.fx`` trace) and
the BNs left unpaired by reason. Pairs are counted on the ``meta`` device (no weights allocated), so even ViT-H runs.
Models up to ``--max-params`` are then built for real (``pretrained=False``, BN statistics randomised, eval mode) and
checked: ``convert_model(preserve=True)`` (ACB blocks) and ``reparameterize_model(fold_bn=True)`` of the original and of
the converted model must keep the output (``max |dy| / max |y|``; target <= 1e-5).

    python benchmarks/reparam_pairs.py            # everything (about 10 min on 2 shared cores)
    python benchmarks/reparam_pairs.py --quick    # timm sample + one torchvision model per family
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

import timm
import torch
import torchvision
from results_io import write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for the PreAct-ResNet of the test helpers

from lightning_nd.reparam import (
    convert_model_with_report,
    count_batchnorms,
    find_conv_bn_pairs,
    reparameterize_with_stats,
)
from tests.reparam._helpers import PreActResNet18, randomize_bn, rel_err

TIMM = ["resnet18", "resnet50", "resnetv2_18", "resnetv2_50", "densenet121", "dpn48b", "efficientnet_b0",
        "mobilenetv3_small_100", "regnetx_002", "convnext_atto", "repvgg_a0", "mobileone_s0", "fastvit_t8",
        "repvit_m0_9", "levit_128s", "levit_conv_128s"]
QUICK_TV = ["resnet18", "resnext50_32x4d", "densenet121", "efficientnet_b0", "mobilenet_v3_small", "mnasnet0_5",
            "regnet_x_400mf", "shufflenet_v2_x0_5", "googlenet", "inception_v3", "convnext_tiny", "vgg11_bn"]


def input_size(name: str) -> int:
    if name.startswith(("vit", "maxvit", "swin")):
        return 224
    return 96 if name in ("inception_v3", "googlenet") else 64


def build(source: str, name: str) -> torch.nn.Module:
    if source == "torchvision":
        return torchvision.models.get_model(name, num_classes=10)
    if source == "timm":
        extra = {"img_size": input_size(name)} if name.startswith("levit") else {}
        return timm.create_model(name, pretrained=False, num_classes=10, **extra)
    return PreActResNet18()


def reasons(skipped: list) -> str:
    kinds = Counter()
    for s in skipped:
        if s.conv_path is None and "not a conv" in s.reason:
            kinds["input not a conv"] += 1
        elif "never called" in s.reason:
            kinds["not run in eval"] += 1
        elif "also feeds" in s.reason:
            kinds["conv output shared"] += 1
        else:
            kinds[s.reason.split(":")[0][:40]] += 1
    return ", ".join(f"{n} {k}" for k, n in kinds.most_common()) or "-"


def ok(error: str) -> bool:
    return error == "no eligible pair" or (error[:1].isdigit() and float(error) <= 1e-5)


@torch.no_grad()
def check(source: str, name: str) -> tuple[str, str, int]:
    """(convert error, fold error, pairs converted) on a real model with randomised BN statistics."""
    torch.manual_seed(0)
    model = randomize_bn(build(source, name)).eval()
    size = input_size(name)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = model(x)
    folded = reparameterize_with_stats(model, fold_bn=True, warn=False)[0]
    fold = f"{rel_err(y, folded(x)):.1e}"
    converted = copy.deepcopy(model)
    try:
        report = convert_model_with_report(converted, "acb", preserve=True)
    except ValueError:
        return "no eligible pair", fold, 0
    fused = reparameterize_with_stats(converted, fold_bn=True, warn=False)[0]
    worst = max(rel_err(y, converted(x)), rel_err(y, fused(x)))
    return f"{worst:.1e}", fold, len(report.converted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-params", type=float, default=100e6, help="check outputs only up to this many params")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tv = QUICK_TV if args.quick else torchvision.models.list_models(module=torchvision.models)
    models = [("torchvision", n) for n in tv] + [("timm", n) for n in TIMM] + [("cifar", "PreActResNet18")]
    rows, failures, checked = [], [], 0
    started = time.perf_counter()
    for source, name in models:
        try:
            with torch.device("meta"):
                meta = build(source, name)
        except NotImplementedError:  # builders that compute widths with tensors (RegNet) need real ones
            meta = build(source, name)
        params = sum(p.numel() for p in meta.parameters())
        found = find_conv_bn_pairs(meta.eval())
        bns = count_batchnorms(meta)
        conv_err, fold_err, converted = "-", "-", "-"
        if params <= args.max_params and bns:
            try:
                conv_err, fold_err, converted = check(source, name)
            except Exception as error:
                conv_err = fold_err = f"error: {type(error).__name__}: {str(error)[:80]}"
            checked += 1
            if not (ok(conv_err) and ok(fold_err)):
                failures.append(f"{source}/{name}")
        elif bns:
            conv_err = fold_err = f"not checked ({params / 1e6:.0f}M params)"
        rows.append(f"| {source} | {name} | {params / 1e6:.1f}M | {bns} | {len(found.pairs)} | {reasons(found.skipped)} "
                    f"| {converted} | {conv_err} | {fold_err} |")
        print(rows[-1], flush=True)
    total = time.perf_counter() - started
    command = "python benchmarks/reparam_pairs.py" + (" --quick" if args.quick else "")
    text = "\n".join([
        "# Conv -> BN pairs from the dataflow, per model",
        "",
        f"`{command}`; {len(models)} models ({len(tv)} torchvision, {len(TIMM)} timm, 1 CIFAR PreAct-ResNet-18), "
        f"pretrained=False, {checked} checked with randomised BN statistics in eval mode (input 2x3xSxS, S = 64, 96 for "
        f"Inception/GoogLeNet, 224 for ViT/Swin/MaxViT); {total / 60:.1f} min.",
        "",
        "Pairs: BNs whose only input is a conv's output that feeds nothing else, counted on the traced eval-mode graph. "
        "Unpaired BNs: pre-activation BNs (input not a conv: ReLU, add, concatenation, the model input), BNs after a "
        "conv whose output is also read elsewhere, BNs of heads that do not run in eval (GoogLeNet/Inception aux). "
        "convert: ACB blocks with preserve=True, worst of (converted, converted then fused) vs the original; "
        "fold: `reparameterize_model(fold_bn=True)` vs the original; both as max |dy| / max |y| (target <= 1e-5).",
        "",
        "| source | model | params | BN | pairs | unpaired BNs | converted (ACB) | convert rel. err | fold rel. err |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Failures (> 1e-5 or error): {', '.join(failures) if failures else 'none'}.",
    ])
    print(text)
    write_results("reparam_pairs" + ("_quick" if args.quick else ""), text, command=command, glance=[{
        "family": "Re-param",
        "what": "models (torchvision classification + timm sample) whose output convert_model(preserve=True) and "
                "fold_bn keep, randomised BN statistics",
        "value": f"{checked - len(failures)}/{checked}",
        "spread": "- (deterministic; one draw of BN statistics, seed 0)",
        "target": "all, <= 1e-5 relative",
    }])


if __name__ == "__main__":
    main()
