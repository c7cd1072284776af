"""CPU inference throughput of RepVGG-A0: training form vs deploy form, and our deploy model vs timm's.

Our ``lnd_repvgg_a0`` and timm's ``repvgg_a0`` share their state-dict layout, so both carry the *same* weights
(BatchNorm statistics randomised, the reference's protocol). The script times, interleaved round-robin so that a
shared machine's load affects every model alike, the median of ``--repeats`` forwards under ``torch.inference_mode``
after warm-ups, and reports images/s, the ratios and the largest relative output error after fusion
(``max |y_train - y_deploy| / max |y_train|``).

    python benchmarks/reparam_speed.py            # 224x224, batch 32, 5 timed rounds
    python benchmarks/reparam_speed.py --quick    # 224x224, batch 8, 3 timed rounds

Writes ``benchmarks/results/reparam_speed[_quick].md`` and ``.json`` (``results_io.write_results``); the spread is the
range of the per-round ratios (each round times every model once, back to back).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import timm
import torch
from results_io import write_results
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_nd.reparam import reparameterize_model, repvgg_a0


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / a.double().abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    batch = args.batch_size or (8 if args.quick else 32)
    repeats = args.repeats or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = repvgg_a0()
    randomize_bn(ours)
    ours.eval()
    theirs = timm.create_model("repvgg_a0", pretrained=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    models = {
        "train form (ours)": ours,
        "deploy (ours)": reparameterize_model(ours),
        "deploy (timm, same weights)": timm.utils.reparameterize_model(theirs),
    }
    x = torch.randn(batch, 3, args.size, args.size)
    with torch.inference_mode():
        outputs = {name: m(x) for name, m in models.items()}
        for _ in range(args.warmup - 1):
            for m in models.values():
                m(x)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - start)
    ips = {name: batch / statistics.median(t) for name, t in times.items()}
    rounds = {name: [a / b for a, b in zip(times["train form (ours)"], t)] for name, t in times.items()}
    err_ours = rel_err(outputs["train form (ours)"], outputs["deploy (ours)"])
    err_timm = rel_err(outputs["deploy (timm, same weights)"], outputs["deploy (ours)"])
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    lines = [
        f"# RepVGG-A0 CPU inference, {args.size}x{args.size}, batch {batch}, median of {repeats} interleaved rounds, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| model | params | img/s | vs train form |",
        "|---|---|---|---|",
    ]
    base = ips["train form (ours)"]
    for name in models:
        lines.append(f"| {name} | {params[name] / 1e6:.2f}M | {ips[name]:.2f} | x{ips[name] / base:.2f} |")
    lines += [
        "",
        f"- deploy / train form (ours): **x{ips['deploy (ours)'] / base:.2f}** (target >= 1.8)",
        f"- our deploy / timm deploy, same weights: **{ips['deploy (ours)'] / ips['deploy (timm, same weights)']:.3f}**"
        " (target >= 0.97)",
        f"- max relative error after fusion (ours, float32): **{err_ours:.1e}** (target <= 1e-6); ours vs timm "
        f"deploy: {err_timm:.1e}",
    ]
    spread = {name: f"x{min(r):.2f}-x{max(r):.2f} over {repeats} interleaved rounds" for name, r in rounds.items()}
    lines.append(f"- per-round deploy / train form: {spread['deploy (ours)']}; timm deploy / train form: "
                 f"{spread['deploy (timm, same weights)']}")
    text = "\n".join(lines) + "\n"
    print(text)
    threads = f"{torch.get_num_threads()} torch thread(s)"
    write_results("reparam_speed" + ("_quick" if args.quick else ""), text, command="python " + " ".join(sys.argv),
                  glance=[
        {"family": "Re-param", "what": f"RepVGG-A0 deploy / train-form CPU throughput, {args.size}px batch {batch}, "
                                       f"{threads}", "value": f"x{ips['deploy (ours)'] / base:.2f}",
         "spread": spread["deploy (ours)"], "target": ">= 1.8"},
        {"family": "Re-param", "what": "RepVGG-A0 max relative output error after fusion (float32)",
         "value": f"{err_ours:.1e}", "spread": "- (deterministic; one draw of BN statistics)", "target": "<= 1e-6"},
    ])


if __name__ == "__main__":
    main()
