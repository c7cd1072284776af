"""The markdown of the GPU run: what ran where, each part's status, cap and wall time, then each part's section."""

from __future__ import annotations

from typing import Any

from gpu_run import PARTS


def markdown(runner: Any, device: str) -> str:
    cfg = runner.cfg
    kind = "smoke run (CPU, tiny sizes: checks the code paths, not the claims)" if cfg.smoke else "GPU run"
    lines = [
        f"# The seed's claims at the largest offline scale: {kind}",
        "",
        f"Device: **{device}**. Command: `{runner.command}`. Budget {cfg.budget_s:.0f} s for the whole run; "
        f"{runner.elapsed():.0f} s elapsed at this write. Training parts ran "
        f"{'side by side on the device' if cfg.parallel else 'one after another'}; the timing parts ran first, "
        f"alone (parts started by {runner.start_method}). Every number comes from one run (one seed unless a table "
        "says otherwise).",
        "",
        "| part | status | cap (s) | wall (s) |",
        "|---|---|---|---|",
    ]
    for name in runner.parts:
        cap = f"{runner.caps[name]:.0f}" if name in runner.caps else "-"
        wall = f"{runner.walls[name]:.0f}" if name in runner.walls else "-"
        lines.append(f"| {name} | {runner.status[name]} | {cap} | {wall} |")
    for name in runner.parts:
        record = runner.records[name]
        lines += ["", f"## {PARTS[name].title}", ""]
        if not record:
            lines.append(f"No result ({runner.status[name]}).")
            continue
        try:
            lines += PARTS[name].render(record) or [f"No result before it ended ({runner.status[name]})."]
        except (KeyError, TypeError, ValueError, IndexError) as err:  # keep the rest of the report
            lines.append(f"(record could not be rendered: {type(err).__name__}: {err})")
        if record.get("note"):
            lines += ["", str(record["note"])]
        if record.get("error"):
            lines += ["", f"**Failed:** `{record['error']}`", "", "```", record.get("traceback", "").strip(), "```"]
    return "\n".join(lines) + "\n"
