"""Atomic training checkpoints: written into a hidden temp folder, fsynced, then renamed into place.

A checkpoint folder ``checkpoints/step-000120`` either exists complete or not at all: a run killed
while saving leaves only a ``.tmp-*`` folder, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
_PREFIX = "step-"


def checkpoint_dir(output: str | os.PathLike) -> Path:
    return Path(output) / "checkpoints"


def list_checkpoints(output: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def resolve_resume(output: str | os.PathLike, resume: str | None) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> the newest checkpoint or ``None``; else the folder given."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume!r}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(output: str | os.PathLike, step: int) -> Path:
    """The temp folder of step ``step`` when several processes write into it (a name all can derive)."""
    return checkpoint_dir(output) / f".tmp-{_PREFIX}{step:06d}-shared"


def _clear_stale(root: Path, keep: Path | None = None) -> None:
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
        if stale != keep:
            shutil.rmtree(stale, ignore_errors=True)


def begin_staging(staging: Path) -> None:
    """Create an empty shared temp folder (main process, before the others write into it)."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(staging.parent)
    staging.mkdir()


def write_checkpoint(
    output: str | os.PathLike,
    step: int,
    write: Any,
    state: dict[str, Any],
    total_limit: int | None = None,
    staging: Path | None = None,
) -> Path:
    """Create ``checkpoints/step-{step}`` atomically.

    ``write(folder)`` writes the tensors into the temp folder; ``state`` goes to ``state.json`` last.
    ``staging``: a temp folder from :func:`begin_staging` that other processes have already written into
    (else a private one is made). Older checkpoints beyond ``total_limit`` are removed only after the
    new one is in place.
    """
    root = checkpoint_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    _clear_stale(root, keep=staging)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = staging if staging is not None else root / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir(exist_ok=staging is not None)
    try:
        write(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
        for folder, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(folder, name), "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(Path(folder))
        if final.exists():  # the same step saved by an earlier run: move it aside, never half-replace it
            old = root / f".tmp-old-{final.name}-{time.time_ns()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit is not None and total_limit > 0:
        for old in list_checkpoints(output)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / STATE_FILE).read_text())
