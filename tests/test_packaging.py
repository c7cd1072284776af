"""The wheel holds every module of the three source trees and imports from the installed copy."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

TREES = {
    "lightning_nd": "lightning_nd",
    "callbacks": "lightning_nd/callbacks",
    "datamodules": "lightning_nd/datamodules",
}


@pytest.mark.slow
def test_wheel_contains_and_imports_every_module(repo_root, tmp_path):
    root = Path(repo_root)
    # Build from a clean copy: a stale build/ folder in the checkout would hide a package missing from pyproject.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *TREES):
        copy = shutil.copytree if (root / name).is_dir() else shutil.copy2
        copy(
            root / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("lightning_nd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = []
    for src, dst in TREES.items():
        for path in sorted((root / src).rglob("*.py")):
            rel = path.relative_to(root / src)
            if src == "lightning_nd" and rel.parts[0] in ("callbacks", "datamodules"):
                continue
            expected.append(f"{dst}/{rel.as_posix()}")
    missing = [name for name in expected if name not in names]
    assert not missing, f"modules missing from the wheel: {missing}"
    assert "lightning_nd/py.typed" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    modules = [name[: -len(".py")].replace("/", ".").removesuffix(".__init__") for name in expected]
    script = (
        "import importlib, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods:\n"
        "    mod = importlib.import_module(m)\n"
        f"    assert mod.__file__.startswith({str(site)!r}), (m, mod.__file__)\n"
        "print(len(mods))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) == len(modules)
