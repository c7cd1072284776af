"""The README does what it says: every fenced python/bash snippet runs, and the results table is the generated one.

A snippet preceded by ``<!-- snippet: illustrative (reason) -->`` is not run; the reason is required. Every other
snippet runs as written in a scratch folder that sees the repository's ``configs/``, ``scripts/`` and ``.venv``,
with one budget rule so the suite stays small: ``lnd fit`` trains 1 epoch of 2 batches, ``lnd predict`` 2 batches
(the flags are appended), and the snippet that runs the test suite only collects it (this suite is that run).
Python snippets run unchanged in a fresh interpreter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MARKER = re.compile(r"<!-- snippet: illustrative \((?P<reason>[^)]+)\) -->\s*$")
BUDGET = {
    "lnd fit": " --trainer.max_epochs=1 --trainer.limit_train_batches=2 --trainer.limit_val_batches=1"
    " --trainer.enable_progress_bar=false",
    "lnd predict": " --trainer.limit_predict_batches=2 --trainer.enable_progress_bar=false",
}


def snippets(text: str) -> list[tuple[int, str, str, str | None]]:
    """``(line, language, code, illustrative reason or None)`` for every fenced python/bash block."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if match.group(1) in ("python", "bash"):
            marker = MARKER.match(lines[i - 1]) if i else None
            found.append((i + 1, match.group(1), "\n".join(lines[i + 1 : end]) + "\n", marker and marker["reason"]))
        i = end + 1
    return found


def with_budget(line: str) -> str:
    """A bash line with the budget flags appended to its ``lnd fit``/``lnd predict`` command (before a comment)."""
    for command, flags in BUDGET.items():
        if re.search(rf"(^|[/\s&]){command}\s", line):
            code, hash_, comment = line.partition("  #")
            return code.rstrip() + flags + (f"  {hash_.strip()}{comment}" if hash_ else "")
    if re.search(r"python -m pytest", line):
        return re.sub(r"(python -m pytest[^&|;]*)", r"\1 --collect-only", line)
    return line


ALL = snippets(README.read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One scratch folder for all snippets, in README order (the retrain reads the search's arch.json)."""
    folder = tmp_path_factory.mktemp("readme")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "lnd").exists():
        pytest.skip(f"needs the project installed in the running virtual environment ({venv}/bin/lnd missing)")
    (folder / ".venv").symlink_to(venv)
    for name in ("configs", "scripts", "examples", "benchmarks", "pyproject.toml", "tests"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def test_every_snippet_is_marked_or_runnable():
    assert len(ALL) >= 8
    for line, _, code, reason in ALL:
        assert reason is None or len(reason) > 10, f"README.md:{line}: an illustrative snippet needs its reason"
        assert code.strip(), f"README.md:{line}: empty snippet"


def test_the_two_commands_are_first():
    first = [code.strip() for _, lang, code, _ in ALL[:2]]
    assert first == [
        "bash scripts/setup.sh && .venv/bin/lnd fit -c configs/quickstart.yaml",
        "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q",
    ]


def test_budget_rule():
    assert with_budget("lnd fit -c a.yaml   # note") == f"lnd fit -c a.yaml{BUDGET['lnd fit']}  # note"
    assert with_budget("x && .venv/bin/lnd fit -c q.yaml").endswith(BUDGET["lnd fit"])
    assert with_budget("x && .venv/bin/python -m pytest -q") == "x && .venv/bin/python -m pytest -q --collect-only"
    assert with_budget("python -c 'print(1)'") == "python -c 'print(1)'"


@pytest.mark.slow
@pytest.mark.parametrize(("line", "language", "code", "reason"), ALL, ids=[f"line{s[0]}" for s in ALL])
def test_snippet_runs(line, language, code, reason, workdir):
    if reason is not None:
        pytest.skip(f"illustrative: {reason}")
    if "FashionMNIST" in code or "fashion" in code:
        if not FASHION_MNIST.is_dir() and not os.environ.get("CI"):
            pytest.skip(f"needs Fashion-MNIST ({FASHION_MNIST})")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{workdir / '.venv' / 'bin'}:{os.environ['PATH']}"}
    env["LND_SETUP_CHECK_ONLY"] = "1"  # the set-up must find everything in place: a reinstall fails the test
    if language == "python":
        command = [sys.executable, "-c", code]
    else:
        script = "set -euo pipefail\n" + "\n".join(with_budget(line) for line in code.splitlines())
        command = ["bash", "-c", script]
    out = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"README.md:{line} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    if "ProgressivePruner" in code and "paths left" in code:  # the Core snippet must prune, as it says
        left = int(re.search(r"paths left: (\d+)", out.stdout)[1])
        assert left <= 16


def test_results_table_is_the_generated_one():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import glance
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    text = README.read_text()
    assert glance.replace_block(text, glance.render()) == text, "run `python benchmarks/glance.py`"


def test_glance_tolerates_missing_json_and_rejects_bad_rows(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import glance
        from results_io import write_results
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    (tmp_path / "old_report.md").write_text("# no JSON yet\n")
    row = {
        "family": "NAS",
        "what": "step ratio",
        "value": "1.03x",
        "spread": "0.98-1.06x over 5 runs",
        "target": "<= 1.10x",
    }
    write_results(
        "speed", "# report", command="python benchmarks/x.py", glance=[row], machine_line="2-core CPU", out_dir=tmp_path
    )
    block = glance.render(tmp_path)
    assert "| NAS | step ratio | 1.03x | 0.98-1.06x over 5 runs | <= 1.10x | `python benchmarks/x.py` | M1 |" in block
    assert "- M1: 2-core CPU" in block and "[`old_report`]" in block
    with pytest.raises(ValueError, match="lacks"):
        write_results("bad", "#", command="c", glance=[{"family": "x"}], out_dir=tmp_path)
    shutil.copy(tmp_path / "speed.json", tmp_path / "broken.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        glance.render(tmp_path)
