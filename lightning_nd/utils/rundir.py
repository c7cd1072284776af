"""One run, one directory: a lock with the owner's pid, and earlier runs kept instead of overwritten.

Lightning lets two runs share a log directory (a fixed ``version:`` such as the quickstart's ``search``, or two
runs started at once that both pick the next ``version_N``) and a rerun deletes the earlier ``metrics.csv``.
:func:`claim_run_dir` makes a run directory this process's alone:

- another live process holds it (``.lnd.lock`` with that pid, on this host): refused with a :class:`RunDirBusy`
  that names the process and the ways out;
- a lock whose process is gone (killed, crashed) is stale: taken over;
- a new run (no ``--ckpt_path``) into a directory that already holds files: the earlier run is moved aside to
  ``<dir>.1`` (``.2``, ...) first, so the fixed path always holds the newest run and nothing is deleted;
- a resumed run (``--ckpt_path``) continues in the directory.

Example::

    claim = claim_run_dir("runs/quickstart/search", resume=False)
    try:
        ...  # train
    finally:
        claim.release()
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

LOCK_NAME = ".lnd.lock"


class RunDirBusy(MisconfigurationException):
    """The run directory is held by another live ``lnd`` process."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a reused pid from the lock's owner), where /proc exists."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the lock's owner still runs. A lock from another host cannot be checked: it counts as alive."""
    if owner.get("host") != socket.gethostname():
        return True
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = owner.get("started_ticks")
    return started is None or _process_start(pid) in (None, started)


def read_lock(folder: str | os.PathLike) -> dict | None:
    """The owner recorded in ``folder``'s lock (``pid``, ``host``, ``command``, ``since``), or None."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def _busy_message(folder: Path, owner: dict) -> str:
    since = time.strftime("%H:%M:%S", time.localtime(owner.get("since", 0)))
    return (
        f"run directory {folder} is in use by process {owner.get('pid')} on {owner.get('host')} "
        f"(started {since}: {owner.get('command', '?')}); two runs in one directory would mix their files.\n"
        f"Wait for it to finish, or give this run its own directory, e.g. --trainer.logger.init_args.version=<name> "
        f"(if that process is gone, delete {folder / LOCK_NAME})"
    )


def _held_by_other(folder: Path, inside: bool) -> dict | None:
    """The live owner of ``folder`` or, with ``inside``, of a run directory directly in it (a predict in its fit's)."""
    for lock in [folder / LOCK_NAME, *(folder.glob(f"*/{LOCK_NAME}") if inside else [])]:
        owner = read_lock(lock.parent)
        if owner is not None and owner.get("pid") != os.getpid() and _alive(owner):
            return {**owner, "folder": str(lock.parent)}
    return None


def _archive_name(folder: Path) -> Path:
    n = 1
    while folder.with_name(f"{folder.name}.{n}").exists():
        n += 1
    return folder.with_name(f"{folder.name}.{n}")


@dataclass
class RunDirClaim:
    """A run directory held by this process: :meth:`release` removes the lock (idempotent).

    Attributes:
        folder: the run directory.
        archived: where the earlier run's files were moved, or None.
    """

    folder: Path
    archived: Path | None = None

    def release(self) -> None:
        owner = read_lock(self.folder)
        if owner is not None and owner.get("pid") == os.getpid():
            (self.folder / LOCK_NAME).unlink(missing_ok=True)


def _write_lock(folder: Path, command: str) -> bool:
    """Create the lock file exclusively; False when another process created it first."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started_ticks": _process_start(os.getpid()),
             "since": time.time(), "command": command}
    try:
        fd = os.open(folder / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        json.dump(owner, file)
    return True


def claim_run_dir(folder: str | os.PathLike, resume: bool, command: str = "") -> RunDirClaim:
    """Make ``folder`` this process's run directory (see the module docstring).

    Args:
        folder: the run directory (created).
        resume: True for a run that continues the directory's run (``--ckpt_path``): its files stay.
        command: recorded in the lock, shown to a process that is refused.

    Returns:
        The claim; call :meth:`RunDirClaim.release` when the run ends.

    Raises:
        RunDirBusy: when another live process holds ``folder`` (or a run directory inside it).
    """
    folder = Path(folder)
    archived = None
    for _ in range(10):  # a few retries for races with a process that starts at the same moment
        archive = folder.exists() and not resume and any(p.name != LOCK_NAME for p in folder.iterdir())
        owner = _held_by_other(folder, inside=archive) if folder.exists() else None
        if owner is not None:
            raise RunDirBusy(_busy_message(Path(owner["folder"]), owner))
        if archive:
            target = _archive_name(folder)
            try:
                folder.rename(target)
            except FileNotFoundError:
                continue  # moved by a process starting at the same moment: look again
            archived = target
            (target / LOCK_NAME).unlink(missing_ok=True)  # a stale lock travels with the files
        folder.mkdir(parents=True, exist_ok=True)
        stale = read_lock(folder)
        if stale is not None and not _alive(stale):
            (folder / LOCK_NAME).unlink(missing_ok=True)
        if _write_lock(folder, command):
            return RunDirClaim(folder, archived)
    owner = read_lock(folder) or {}
    raise RunDirBusy(_busy_message(folder, owner))


# ---------------------------------------------------------------- where each command's run directory is
def _new_wandb_id() -> str:
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _version_of_checkpoint(ckpt_path: str | None, root: Path) -> str | None:
    """The version (run folder name under ``root``) that ``<root>/<version>/checkpoints/<file>`` belongs to."""
    if not ckpt_path or "://" in ckpt_path:
        return None
    ckpt = Path(ckpt_path).resolve()
    if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.parent == root.resolve():
        return ckpt.parent.parent.name
    return None


def plan_run_dir(config: Any, subcommand: str) -> None:
    """Edit a LightningCLI config (before its classes are built) so that the command gets its own run directory.

    - ``fit`` without a fixed logger version, resumed from ``<root>/<version>/checkpoints/*.ckpt``, continues in
      that version (instead of Lightning's next ``version_N``).
    - ``validate``/``test``/``predict`` of a run write into ``<run dir>/<command>`` (a logger version
      ``<version>/<command>``, or ``<default_root_dir>/<command>`` without a logger), never into the fit's files.
    - ``WandbLogger``: the run directory is ``<save_dir>/<project>/<id>`` (where Lightning puts its checkpoints)
      and wandb's own files go inside it; Lightning would use the shared ``save_dir`` for everything else.

    Loggers other than CSV, TensorBoard and wandb are left as configured.
    """
    trainer = config.trainer
    ckpt_path = config.get("ckpt_path")
    logger = trainer.get("logger")
    evaluating = subcommand != "fit"
    if logger is False:
        if evaluating:
            trainer.default_root_dir = str(Path(trainer.get("default_root_dir") or ".") / subcommand)
        return
    spec = (logger[0] if isinstance(logger, list) and logger else logger)
    if spec is None or isinstance(spec, bool) or not spec.get("class_path"):
        return  # Lightning's default logger: a new version_N for every command
    kind, init = spec.class_path.rsplit(".", 1)[-1], spec.init_args
    if kind in ("CSVLogger", "TensorBoardLogger"):
        name = init.get("name", "lightning_logs")
        root = Path(init.get("save_dir") or ".") / name if name else Path(init.get("save_dir") or ".")
        version = init.get("version")
        version = f"version_{version}" if isinstance(version, int) else version
        version = version or _version_of_checkpoint(ckpt_path, root)
        if version is not None:
            init.version = f"{version}/{subcommand}" if evaluating else version
    elif kind == "WandbLogger":
        project = init.get("project") or os.environ.get("WANDB_PROJECT") or "lightning_logs"
        root = Path(init.get("save_dir") or init.get("dir") or ".") / project
        run_id = init.get("version") or init.get("id") or _version_of_checkpoint(ckpt_path, root) or _new_wandb_id()
        folder = root / run_id
        if evaluating:
            folder, run_id = folder / subcommand, f"{run_id}-{subcommand}"
        init.save_dir, init.version = str(folder), run_id
        if "dir" in init:
            init.dir = None
        if "id" in init:
            init.id = None


def is_resume(ckpt_path: str | None, folder: str | os.PathLike) -> bool:
    """Whether ``ckpt_path`` lies inside ``folder``: a fit from it continues that run (its files stay)."""
    if not ckpt_path or "://" in ckpt_path:
        return False
    return Path(folder).resolve() in Path(ckpt_path).resolve().parents
