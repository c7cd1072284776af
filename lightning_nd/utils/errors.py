"""Errors a user can read: a configuration or input error ends ``lnd`` with its cause and fix as the last lines.

LightningCLI instantiates classes through jsonargparse, which wraps an exception raised in a constructor in one
or more "Does not validate against any of the Union subtypes" errors that repeat the whole configuration (80+
lines). :func:`explain` walks the exception chain to the error our code (or Lightning's) raised, and
:func:`is_user_error` decides whether a short message is enough. ``LND_TRACEBACK=1`` keeps the full traceback.
"""

from __future__ import annotations

import os
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
