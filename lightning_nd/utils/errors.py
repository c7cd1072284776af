"""Errors a user can read: a configuration or input error ends ``lnd`` with its cause and fix as the last lines.

LightningCLI instantiates classes through jsonargparse, which wraps an exception raised in a constructor in one
or more "Does not validate against any of the Union subtypes" errors that repeat the whole configuration (80+
lines). :func:`explain` walks the exception chain to the error our code (or Lightning's) raised, and
:func:`is_user_error` decides whether a short message is enough. ``LND_TRACEBACK=1`` keeps the full traceback.
"""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

from lightning.fabric.utilities.exceptions import MisconfigurationException

TRACEBACK_ENV = "LND_TRACEBACK"
# Raised for bad configuration or input by our constructors/setup checks and by Lightning's own validation.
USER_ERRORS = (ValueError, MisconfigurationException, FileNotFoundError, NotADirectoryError)


def traceback_wanted() -> bool:
    """True when ``LND_TRACEBACK`` asks for full tracebacks (``1``, ``true``, ``yes``)."""
    return os.environ.get(TRACEBACK_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions behind it (``raise ... from`` or raised while handling), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _raised_in(err: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(err.__traceback__)
    return frames[-1] if frames else None


def _from_argument_parser(err: BaseException) -> bool:
    frame = _raised_in(err)
    return frame is not None and f"{os.sep}jsonargparse{os.sep}" in frame.filename


def explain(err: BaseException) -> BaseException:
    """The error to show: the outermost one in the chain that the argument parser did not merely wrap."""
    for candidate in _chain(err):
        if not _from_argument_parser(candidate):
            return candidate
    return _chain(err)[-1]


def is_user_error(err: BaseException) -> bool:
    """A configuration or input error: raised while instantiating the config, or one of :data:`USER_ERRORS`."""
    if any(_from_argument_parser(e) for e in _chain(err)):
        return True
    return isinstance(explain(err), USER_ERRORS)


def _short_path(filename: str) -> str:
    path = Path(filename)
    for anchor in ("site-packages", "lightning_nd", "callbacks", "datamodules"):
        if anchor in path.parts:
            index = len(path.parts) - 1 - path.parts[::-1].index(anchor)
            start = index + 1 if anchor == "site-packages" else index
            return "/".join(path.parts[start:])
    return path.name


def format_user_error(err: BaseException, prog: str = "lnd") -> str:
    """Two or more lines: where it was raised (and how to see the traceback), then the message: cause and fix.

    Example::

        lnd: stopped by FileNotFoundError from lightning_nd/nas/subnet.py:100 (LND_TRACEBACK=1 prints the traceback)
        architecture file 'runs/x/arch.json' not found (expected an arch.json from a search)
    """
    shown = explain(err)
    frame = _raised_in(shown)
    where = f" from {_short_path(frame.filename)}:{frame.lineno}" if frame is not None else ""
    message = str(shown).strip() or repr(shown)
    return f"{prog}: stopped by {type(shown).__name__}{where} ({TRACEBACK_ENV}=1 prints the traceback)\n{message}"


# ---------------------------------------------------------------- argument parser errors
_NOT_ACCEPTED = re.compile(
    r"""class_path '(?P<cls>[\w.]+)'.*?(?:Option|Key) ["'](?P<key>[\w.]+)["'] is not (?:accepted|expected)""", re.S
)


def _config_files(args: list[str]) -> list[Path]:
    files = []
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def _yaml_error(args: list[str]) -> str | None:
    """The first ``-c`` file with a YAML syntax error, as cause (file, line, column, problem) and fix."""
    import yaml

    for path in _config_files(args):
        try:
            yaml.safe_load(path.read_text())
        except OSError:
            continue
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return (f"{path}: YAML syntax error{where}: {problem}\n"
                    f"Fix the YAML at {path}{line} (indentation, a missing ':' or an unclosed bracket or quote)")
    return None


def _allowed_arguments(class_path: str) -> list[str] | None:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        parameters = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def explain_parser_error(message: str, args: list[str] | None = None, subcommand: str | None = None) -> str:
    """Cause and fix (two lines) for a jsonargparse error message, which repeats whole config blocks.

    Handles an unknown argument of a class given by ``class_path`` (at any depth: names the class, the key, the
    accepted keys and the closest one) and YAML syntax errors in ``-c`` files (file and line); any other message
    keeps its first line and the innermost reason.
    """
    import difflib

    args = list(args or [])
    help_hint = f"lnd {subcommand} --help" if subcommand else "lnd --help"
    if "Problems parsing config" in message or "<unicode string>" in message:
        found = _yaml_error(args)
        if found is not None:
            return found
    unknown = list(_NOT_ACCEPTED.finditer(message))
    if unknown:
        cls, key = unknown[-1].group("cls"), unknown[-1].group("key").rsplit(".", 1)[-1]
        parser_key = re.search(r'Parser key "([^"]+)"', message)
        under = f" (in {parser_key.group(1)})" if parser_key else ""
        allowed = _allowed_arguments(cls)
        if allowed is not None:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            return (f"{cls} has no argument '{key}'{under}\n"
                    f"{hint}{cls.rsplit('.', 1)[-1]} takes: {', '.join(allowed)}")
        return f"{cls} does not accept '{key}'{under}\nSee its arguments with: {help_hint}"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Given value", "Subtypes:", "Errors:", "- a ", "Subclass"))]
    cause = lines[0] if lines else message.strip()
    detail = lines[-1].lstrip("- ") if len(lines) > 1 else ""
    if detail and detail not in cause:
        cause = f"{cause} {detail}"
    return f"{cause}\nSee the accepted options with: {help_hint}"
