"""Where benchmark results go: a human-readable markdown file and a machine-readable JSON beside it.

Every benchmark ends with one call::

    from results_io import write_results
    write_results("nas_core", markdown_text, command="python benchmarks/nas_core.py --quick",
                  glance=[{"family": "NAS core", "what": "supernet step / standalone subnet step",
                           "value": "1.03x", "spread": "0.98x-1.06x over 5 repeats", "target": "<= 1.10x"}])

``benchmarks/results/<name>.md`` holds the benchmark's full report; ``benchmarks/results/<name>.json`` holds the
command that produced it, the machine, and the rows the README's "Results at a glance" table is generated from
(``python benchmarks/glance.py``). Both files are written atomically.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GLANCE_KEYS = ("family", "what", "value", "spread", "target")


def machine() -> str:
    """One line naming the machine: CPU model and cores (or the GPU), torch threads, torch version, load."""
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} GPU"
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        device = f"{os.cpu_count()}-core CPU ({model})"
    load = ""
    if hasattr(os, "getloadavg"):
        load = f", load average {os.getloadavg()[0]:.1f}"
    return f"{device}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}{load}"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(
    name: str,
    markdown: str,
    *,
    command: str,
    glance: list[dict[str, str]] | None = None,
    machine_line: str | None = None,
    out_dir: Path | str = RESULTS_DIR,
) -> Path:
    """Write ``<out_dir>/<name>.md`` and ``<out_dir>/<name>.json``; return the markdown path.

    Args:
        name: file stem, e.g. ``"nas_core"``.
        markdown: the full report.
        command: the exact command line that reproduces the report from a fresh clone.
        glance: rows for the README's "Results at a glance" table, each with the keys ``family``, ``what``,
            ``value``, ``spread`` (over seeds / repeats / thread counts, or "-" with the reason in ``what``)
            and ``target``.
        machine_line: the machine the numbers come from; defaults to :func:`machine` now.
        out_dir: where to write (tests pass a temporary folder).

    Raises:
        ValueError: if a glance row lacks one of the keys.
    """
    rows = list(glance or [])
    for row in rows:
        missing = [k for k in GLANCE_KEYS if k not in row]
        if missing:
            raise ValueError(f"glance row {row!r} lacks {missing}; each row needs {list(GLANCE_KEYS)}")
    out_dir = Path(out_dir)
    record = {
        "name": name,
        "command": command,
        "machine": machine_line or machine(),
        "date": datetime.date.today().isoformat(),
        "glance": [{k: str(row[k]) for k in GLANCE_KEYS} for row in rows],
    }
    md_path = out_dir / f"{name}.md"
    _atomic_write(md_path, markdown if markdown.endswith("\n") else markdown + "\n")
    _atomic_write(out_dir / f"{name}.json", json.dumps(record, indent=2) + "\n")
    return md_path
