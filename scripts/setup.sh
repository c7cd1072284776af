#!/usr/bin/env bash
# Set up lightning-nd in ./.venv; safe to rerun: whatever is already in place is kept, nothing is reinstalled.
#
#   bash scripts/setup.sh          # the package (pip install -e .)
#   bash scripts/setup.sh --test   # also the test extras and the offline Fashion-MNIST (Debian: dataset-fashion-mnist)
#
# Works as root or not, with or without sudo. Where Fashion-MNIST cannot be installed it says why, and the tests that
# need it are skipped with that reason (under CI=true a missing data set is an error instead).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
for arg in "$@"; do
    case "$arg" in
        --test) want_test=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (allowed: --test, --help)" >&2; exit 2 ;;
    esac
done

say() { echo "setup: $*"; }

# Root runs apt-get directly, others through sudo when it exists; empty when neither can install packages.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else return 127
    fi
}
can_apt() { command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; }
apt_updated=0
apt_install() {
    [ "$apt_updated" -eq 1 ] || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt_updated=1; }
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. Python >= 3.10 and a virtual environment.
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: needs Python >= 3.10 as '$PYTHON' (found: $("$PYTHON" --version 2>&1 || echo none)); set PYTHON=/path/to/python3.x" >&2
    exit 1
fi
if ! .venv/bin/python -c 'import sys' 2>/dev/null; then
    say "creating .venv with $("$PYTHON" --version)"
    if ! "$PYTHON" -m venv .venv 2>/dev/null; then
        # Debian/Ubuntu ship venv's ensurepip separately (python3.X-venv).
        rm -rf .venv
        pkg="python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv"
        if can_apt && apt_install "$pkg"; then
            "$PYTHON" -m venv .venv
        else
            echo "setup: '$PYTHON -m venv' failed; install the package $pkg (as root: apt-get install $pkg) and rerun" >&2
            exit 1
        fi
    fi
fi

# 2. The package: installed unless this checkout is already installed with every requirement of pyproject.toml met.
extras=""; [ "$want_test" -eq 1 ] && extras="[test]"
installed() {
    .venv/bin/python - "$extras" <<'PY' 2>/dev/null
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: read the installed metadata instead
    tomllib = None
extra = "test" if sys.argv[1] else ""
if tomllib is not None:
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + (project["optional-dependencies"][extra] if extra else [])
else:
    requirements = md.requires("lightning-nd") or []
for text in requirements:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
        continue
    if not requirement.specifier.contains(md.version(requirement.name), prereleases=True):
        sys.exit(1)
import importlib.util  # noqa: E402

# this checkout is the installed one (found without importing torch: a cold import takes a minute on a busy CPU)
package = importlib.util.find_spec("lightning_nd")
sys.exit(0 if package and Path(package.origin).resolve().is_relative_to(Path("pyproject.toml").resolve().parent) else 1)
PY
}
if installed; then
    say "lightning-nd${extras} already installed in .venv with every requirement met: nothing to install"
elif [ -n "${LND_SETUP_CHECK_ONLY:-}" ]; then
    echo "setup: LND_SETUP_CHECK_ONLY is set and .venv lacks lightning-nd${extras} or one of its requirements" >&2
    exit 3
else
    say "pip install -e \".${extras}\" (the first time takes minutes: torch is large)"
    .venv/bin/python -m pip install -q -e ".${extras}"
fi

# 3. Test data: Debian's dataset-fashion-mnist (the tests read /usr/share/datasets/fashion-mnist).
if [ "$want_test" -eq 1 ]; then
    fashion=/usr/share/datasets/fashion-mnist
    if [ -d "$fashion" ]; then
        say "Fashion-MNIST found in $fashion"
    elif [ -n "${LND_SETUP_CHECK_ONLY:-}" ]; then
        say "Fashion-MNIST missing ($fashion); LND_SETUP_CHECK_ONLY is set, so nothing is installed"
    elif ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get here: the Fashion-MNIST tests will be skipped (they need Debian's dataset-fashion-mnist in $fashion)"
    elif ! can_apt; then
        say "not root and no sudo: the Fashion-MNIST tests will be skipped (as root: apt-get install dataset-fashion-mnist)"
    elif apt_install dataset-fashion-mnist && [ -d "$fashion" ]; then
        say "installed dataset-fashion-mnist into $fashion"
    else
        say "apt-get install dataset-fashion-mnist failed: the Fashion-MNIST tests will be skipped"
    fi
    if [ ! -d "$fashion" ] && [ -n "${CI:-}" ]; then
        echo "setup: CI=$CI needs Fashion-MNIST in $fashion (every test must run in CI)" >&2
        exit 1
    fi
fi
say "done"
