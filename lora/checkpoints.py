"""Training checkpoints: what one holds, how it is written atomically, verified, found, loaded and pruned.

A checkpoint folder ``checkpoints/step-000120`` is written into a hidden temp folder, fsynced, then
renamed into place, so it either exists complete or not at all: a run killed while saving leaves only a
``.tmp-*`` folder, which resume ignores and the next save removes. Files on disk can still be damaged
afterwards (a full disk, a copy cut short), so a checkpoint is verified before it is resumed
(:func:`verify`): the safetensors headers, the ``torch.save`` archives (every member's CRC) and the
state JSON. ``--resume latest`` skips a damaged newest checkpoint for the newest valid one, with a
warning (:func:`resolve_resume`); an explicit folder is never replaced by another.

Contents: ``trainable.safetensors`` (the trainable weights, whole), ``optimizer.pt`` (or DeepSpeed's
``deepspeed/`` partitions), ``lr_scheduler.pt``, ``ema.pt`` (``--ema``), ``scaler.pt`` (fp16) and
``state.json`` (the step, the options that must match on resume, the fixed-set loss at the start).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "lr_scheduler.pt"
EMA_FILE = "ema.pt"
SCALER_FILE = "scaler.pt"
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's own files (the partitioned optimizer)
_PREFIX = "step-"
# the keys state.json must hold (older checkpoints hold no more than these)
REQUIRED_STATE_KEYS = ("step",)
# fields that must match between a checkpoint and the run resuming from it
IDENTITY = ("model", "recipe", "rank", "lora_alpha", "lora_targets", "train_modules", "lora_init", "expert")
# fields a resume may change, with a warning
_WARN_IF_CHANGED = ("seed", "batch_size", "grad_accum")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed: the message names the file and what is wrong with it."""


# ------------------------------------------------------------------------------ finding checkpoints


def checkpoint_dir(output: str | os.PathLike) -> Path:
    return Path(output) / "checkpoints"


def _step_of(path: Path) -> int | None:
    tail = path.name[len(_PREFIX) :]
    return int(tail) if path.name.startswith(_PREFIX) and tail.isdigit() else None


def list_checkpoints(output: str | os.PathLike) -> list[Path]:
    """The checkpoint folders (``step-N``, complete or damaged), oldest first."""
    root = checkpoint_dir(output)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def resolve_resume(output: str | os.PathLike, resume: str | None, fallback: bool = True) -> Path | None:
    """The verified checkpoint to resume from.

    ``None`` -> no resume. ``"latest"`` -> the newest checkpoint under ``output``, or ``None`` when there is
    none; a damaged one is skipped for the newest valid one with a warning naming it and what is wrong
    (``fallback=False``, ``--no-checkpoint-fallback``: a damaged newest is an error). A folder -> that
    checkpoint, which must be valid (never another).

    Raises:
        CheckpointError: a damaged checkpoint that is not skipped, or no valid one among several.
        FileNotFoundError: ``resume`` is a folder that does not exist.
    """
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume!r}: not a complete checkpoint folder (no such folder)")
        verify(path, option=f"--resume {resume!r}")
        return path
    found = list_checkpoints(output)
    skipped: list[str] = []
    for path in reversed(found):
        try:
            verify(path)
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(
                    f"--resume latest: {e}; pass --resume with an older checkpoint folder, or leave out "
                    "--no-checkpoint-fallback to resume from the newest valid one"
                ) from None
            skipped.append(str(e))
            continue
        if skipped:
            warnings.warn(
                f"--resume latest: skipped {len(skipped)} damaged checkpoint(s) ({'; '.join(skipped)}); "
                f"resuming from {str(path)!r}",
                stacklevel=2,
            )
        return path
    if skipped:
        raise CheckpointError(f"--resume latest: no valid checkpoint in {str(checkpoint_dir(output))!r}: {'; '.join(skipped)}")
    return None


# ------------------------------------------------------------------------------ verifying


def _check_safetensors(file: Path) -> None:
    """The header of a safetensors file parses and the file holds exactly the bytes it describes."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{str(file)!r} is truncated: {size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(
                f"{str(file)!r} is truncated: its header says {n} bytes of metadata, the file has {size - 8} after the length"
            )
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise CheckpointError(f"{str(file)!r} has a damaged safetensors header ({type(e).__name__}: {e})") from None
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise CheckpointError(
            f"{str(file)!r} is truncated: its header describes {expected} bytes, the file has {size}"
        )
    if size > expected:
        raise CheckpointError(
            f"{str(file)!r} is damaged: its header describes {expected} bytes, the file has {size}"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as st:
            st.keys()
    except Exception as e:  # noqa: BLE001 - any reader error is a damaged file
        raise CheckpointError(f"{str(file)!r} is damaged ({type(e).__name__}: {e})") from None


def _check_torch_file(file: Path) -> None:
    """A ``torch.save`` archive is a complete zip whose every member matches its CRC (torch.load does not check)."""
    if file.stat().st_size == 0:
        raise CheckpointError(f"{str(file)!r} is empty (truncated)")
    try:
        with zipfile.ZipFile(file) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{str(file)!r} is truncated or damaged (not a complete torch.save archive: {e})") from None
    if bad is not None:
        raise CheckpointError(f"{str(file)!r} is damaged: its member {bad!r} fails its CRC check")


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``state.json`` of checkpoint ``path``, with its required keys.

    Raises:
        CheckpointError: the file is missing, not a JSON object, or lacks a required key.
    """
    file = Path(path) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it has no {STATE_FILE}")
    try:
        state = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(file)!r} is damaged: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(file)!r} is damaged: a JSON {type(state).__name__}, expected an object")
    missing = [k for k in REQUIRED_STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{str(file)!r} is damaged: it lacks the key(s) {missing}")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"{str(file)!r} is damaged: 'step' is {state['step']!r}, expected an integer >= 0")
    return state


def verify(path: str | os.PathLike, option: str | None = None) -> dict[str, Any]:
    """Check checkpoint ``path`` before it is resumed; returns its state.

    ``state.json`` parses and has :data:`REQUIRED_STATE_KEYS`; the trainer's files are there
    (``trainable.safetensors``, ``lr_scheduler.pt``, and ``optimizer.pt`` or ``deepspeed/``); every
    ``*.safetensors`` file's header matches its size; every ``*.pt`` archive is whole (member CRCs).

    Raises:
        CheckpointError: naming the file and what is wrong (prefixed with ``option`` when given).
    """
    path = Path(path)
    try:
        state = read_state(path)
        deepspeed = state.get("distributed_type") == "DEEPSPEED"
        needed = [TRAINABLE_FILE, SCHEDULER_FILE, DEEPSPEED_DIR if deepspeed else OPTIMIZER_FILE]
        for name in needed:
            if not (path / name).exists():
                raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it has no {name}")
        for file in sorted(path.rglob("*")):
            if not file.is_file():
                continue
            if file.suffix == ".safetensors":
                _check_safetensors(file)
            elif file.suffix == ".pt" and file.parent == path:
                _check_torch_file(file)
    except CheckpointError as e:
        if option is None:
            raise
        raise CheckpointError(f"{option}: {e}") from None
    return state


def torch_load(file: Path, map_location: Any = None) -> Any:
    """``torch.load`` with the file named in any error."""
    import torch

    try:
        return torch.load(file, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - the reader's message alone names no file
        raise CheckpointError(f"cannot load {str(file)!r} ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------ writing


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
    # left by a run killed mid-save, or mid-replace (diffattn.io.replace_path)
    for stale in [*root.glob(".tmp-*"), *root.glob(f".{_PREFIX}*.old-*")]:
        if stale != keep:
            shutil.rmtree(stale, ignore_errors=True)


def begin_staging(staging: Path) -> None:
    """Create an empty shared temp folder (main process, before the others write into it)."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(staging.parent)
    staging.mkdir()


def prune(output: str | os.PathLike, total_limit: int | None) -> None:
    """Remove the oldest checkpoints beyond ``total_limit`` (``None`` or 0: keep all)."""
    if total_limit is not None and total_limit > 0:
        for old in list_checkpoints(output)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def write_checkpoint(
    output: str | os.PathLike,
    step: int,
    write: Any,
    state: dict[str, Any],
    total_limit: int | None = None,
    staging: Path | None = None,
) -> Path:
    """Create ``checkpoints/step-{step}`` atomically, its files with the umask's modes.

    ``write(folder)`` writes the tensors into the temp folder; ``state`` goes to ``state.json`` last.
    ``staging``: a temp folder from :func:`begin_staging` that other processes have already written into
    (else a private one is made). Older checkpoints beyond ``total_limit`` are removed only after the
    new one is in place.
    """
    from diffattn.io import publish_modes, replace_path

    root = checkpoint_dir(output)
    root.mkdir(parents=True, exist_ok=True)
    _clear_stale(root, keep=staging)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = staging if staging is not None else root / f".tmp-{final.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir(exist_ok=staging is not None)
    try:
        write(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
        publish_modes(tmp)
        for folder, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(folder, name), "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(Path(folder))
        replace_path(tmp, final)  # the same step saved by an earlier run is moved aside, never half-replaced
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(output, total_limit)
    return final


# ------------------------------------------------------------------------------ the trainer's state


def identity(cfg: Any) -> dict[str, Any]:
    """The options of run ``cfg`` (a resolved TrainConfig) that a checkpoint must share to be resumed."""
    from .adapters import lora_alpha

    return {
        "model": cfg.model,
        "recipe": cfg.recipe,
        "rank": cfg.rank,
        "lora_alpha": lora_alpha(cfg.rank, cfg.lora_alpha),
        "lora_targets": list(cfg.lora_targets or []),
        "train_modules": list(cfg.train_modules or []),
        "lora_init": cfg.lora_init,
        "expert": cfg.expert,
    }


def check_identity(cfg: Any, state: dict[str, Any], path: Path) -> None:
    """Refuse to resume checkpoint ``path`` with other :data:`IDENTITY` options; warn on another seed or batch."""
    mine = identity(cfg)
    for key in IDENTITY:
        if key in state and state[key] != mine[key]:
            raise ValueError(
                f"--{key.replace('_', '-')} {mine[key]!r} differs from {state[key]!r} in checkpoint "
                f"{str(path)!r}; resume with the same value, or train into a new --output"
            )
    for key in _WARN_IF_CHANGED:
        if key in state and state[key] != getattr(cfg, key):
            warnings.warn(
                f"resuming with --{key.replace('_', '-')} {getattr(cfg, key)} (checkpoint: {state[key]})",
                stacklevel=3,
            )


def training_state(trainer: Any, step: int) -> dict[str, Any]:
    """``state.json`` of ``trainer`` at optimizer step ``step``."""
    acc = trainer.accelerator
    return {
        **identity(trainer.cfg),
        "step": step,
        "seed": trainer.cfg.seed,
        "batch_size": trainer.cfg.batch_size,
        "grad_accum": trainer.cfg.grad_accum,
        "num_processes": acc.num_processes,
        "distributed_type": acc.distributed_type.name,
        "denoiser": type(trainer.family.denoiser).__name__,
        "fixed_loss_start": trainer.fixed_loss_start,
    }


def save(trainer: Any, step: int) -> None:
    """Write ``trainer``'s checkpoint of step ``step`` (every process calls it: gathering shards is a collective)."""
    import torch

    acc = trainer.accelerator
    acc.wait_for_everyone()
    if trainer.sharded or trainer.deepspeed or acc.is_main_process:
        from . import sharding

        tensors = trainer.full_trainable()
        # DeepSpeed's partitioned optimizer is saved by DeepSpeed itself (below)
        optimizer = None if trainer.deepspeed else sharding.full_optimizer_state(trainer.optimizer)
        ema = sharding.full_ema_state(trainer.ema) if trainer.ema is not None else None
    staging = None
    if trainer.deepspeed:  # every process writes its optimizer partition into the one staging folder
        staging = staging_dir(trainer.output, step)
        if acc.is_main_process:
            begin_staging(staging)
        acc.wait_for_everyone()
        trainer.model.save_checkpoint(
            str(staging / DEEPSPEED_DIR), tag="zero", save_latest=False, exclude_frozen_parameters=True
        )
        acc.wait_for_everyone()
    if acc.is_main_process:
        from safetensors.torch import save_file

        def write(folder: Path) -> None:
            save_file(tensors, str(folder / TRAINABLE_FILE))
            if optimizer is not None:
                torch.save(optimizer, folder / OPTIMIZER_FILE)
            torch.save(trainer.lr_scheduler.state_dict(), folder / SCHEDULER_FILE)
            if ema is not None:
                torch.save(ema, folder / EMA_FILE)
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), folder / SCALER_FILE)

        write_checkpoint(
            trainer.output,
            step,
            write,
            training_state(trainer, step),
            trainer.cfg.checkpoints_total_limit,
            staging=staging,
        )
    acc.wait_for_everyone()


def load(trainer: Any, path: Path) -> int:
    """Restore ``trainer`` from checkpoint ``path`` (verified by :func:`resolve_resume`); returns its step."""
    from safetensors.torch import load_file

    from . import sharding

    state = read_state(path)
    written = state.get("distributed_type")
    acc = trainer.accelerator
    if trainer.deepspeed or written == "DEEPSPEED":
        n = acc.num_processes
        if not (trainer.deepspeed and written == "DEEPSPEED" and state.get("num_processes") == n):
            raise ValueError(
                f"checkpoint {str(path)!r} was written by {state.get('num_processes')} process(es) under "
                f"{written}; this run is {n} process(es) under {acc.distributed_type.name}. "
                "A DeepSpeed checkpoint keeps its optimizer in per-process partitions: resume it under "
                "DeepSpeed with the same process count (checkpoints of one process, DDP and FSDP2 resume "
                "in any of those layouts)"
            )
        trainer.model.load_checkpoint(
            str(path / DEEPSPEED_DIR), tag="zero", load_module_strict=False, load_lr_scheduler_states=False
        )
        _load_schedule_and_ema(trainer, path)
        return int(state["step"])
    try:
        tensors = load_file(str(path / TRAINABLE_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors' own message names no file
        raise CheckpointError(f"cannot load {str(path / TRAINABLE_FILE)!r} ({type(e).__name__}: {e})") from None
    named = dict(trainer.family.denoiser.named_parameters())
    missing = sorted(set(trainer.param_names) - set(tensors))
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} lacks {len(missing)} trainable weights (e.g. {missing[0]}); was it made with other options?"
        )
    for n in trainer.param_names:
        if named[n].shape != tensors[n].shape:
            raise ValueError(
                f"checkpoint {str(path)!r}: {n} has shape {tuple(tensors[n].shape)}, the model {tuple(named[n].shape)}"
            )
    sharding.load_parameters(named, {n: tensors[n] for n in trainer.param_names})
    optimizer_state = torch_load(path / OPTIMIZER_FILE, map_location="cpu")
    saved, mine = len(optimizer_state["param_groups"]), len(trainer.optimizer.param_groups)
    if saved != mine:
        raise ValueError(
            f"checkpoint {str(path)!r} has {saved} optimizer parameter group(s), this run {mine}: the recipe's "
            "learning-rate factors differ (roictrl: --option gate_lr_scale; 1 gives the one-group layout of "
            "older checkpoints); resume with the checkpoint's, or train into a new --output"
        )
    sharding.load_optimizer_state(trainer.optimizer, optimizer_state)
    _load_schedule_and_ema(trainer, path)
    return int(state["step"])


def _load_schedule_and_ema(trainer: Any, path: Path) -> None:
    from . import sharding

    trainer.lr_scheduler.load_state_dict(torch_load(path / SCHEDULER_FILE))
    if trainer.ema is not None:
        if not (path / EMA_FILE).is_file():
            raise ValueError(f"--ema is on but checkpoint {str(path)!r} has no EMA state")
        sharding.load_ema_state(trainer.ema, torch_load(path / EMA_FILE), trainer.params)
    scaler = trainer.accelerator.scaler
    if scaler is not None and (path / SCALER_FILE).is_file():
        scaler.load_state_dict(torch_load(path / SCALER_FILE))
