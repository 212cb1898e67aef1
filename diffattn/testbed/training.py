"""``diffattn testbed train digits-unet|digits-dit|digits-video|digits-lamamba``: train a testbed model.

The run goes through the project's trainer (:mod:`diffattn.lora`, recipe ``full``; ``lamamba`` for
``digits-lamamba``, ``full-video`` for ``digits-video``: every parameter of the denoiser trains, the
whole pipeline is saved):

1. the untrained pipeline (:func:`diffattn.testbed.models.build`, seeded) is saved into
   ``RUN_DIR/init`` and is the trainer's ``--model``;
2. the digits training split is exported to a temporary image folder (``metadata.jsonl`` captions
   ``"a 3"``) and is the trainer's ``--data``;
3. the trainer writes ``RUN_DIR/logs/train_log.csv`` (loss per logged step), checkpoints in
   ``RUN_DIR/checkpoints`` (``resume=True`` continues from the newest) and ``RUN_DIR/pipeline``;
4. that pipeline is written as the testbed folder (``testbed.json`` + the loss log) under a temporary
   name and renamed into place (default: the shipped ``diffattn/testbed/weights/NAME``).

``digits-video`` first runs an image phase (:data:`PRETRAIN`: single frames of the same clips) into
``RUN_DIR/pretrain``; step 3 then starts from that phase's pipeline instead of the untrained one.

Defaults (:data:`RECIPES`) are the shipped models' settings; every key can be overridden
(``max_steps``, ``batch_size``, ``learning_rate``, ... any :class:`~diffattn.lora.TrainConfig` field) and
``model_options`` go to the builder (``block_out_channels`` ...), so tests train a tiny version.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import models
from .data import DigitsDataset, write_image_folder

RUNS_DIR = Path("outputs") / "testbed-runs"  # default run folder (relative to the working directory)

# shared by every testbed model: AdamW with a cosine schedule, caption dropout 0.1 for classifier-free
# guidance (the null label for digits-lamamba), EMA, a checkpoint every 250 steps (two kept)
_COMMON: dict[str, Any] = {
    "batch_size": 32,
    "learning_rate": 1e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 100,
    "weight_decay": 1e-2,
    "caption_dropout": 0.1,
    "ema": True,
    "ema_decay": 0.999,
    "checkpoint_every": 250,
    "checkpoints_total_limit": 2,
    "log_every": 10,
    "eval_samples": 32,
}
_FLOW = {"max_sequence_length": models.TEXT_LENGTH, "timestep_sampling": "logit_normal"}

# per model: TrainConfig fields of the shipped run
RECIPES: dict[str, dict[str, Any]] = {
    "digits-unet": {**_COMMON, "max_steps": 2000},
    "digits-dit": {**_COMMON, **_FLOW, "max_steps": 3000},
    # the video phase, after PRETRAIN's image phase: it starts from a model that draws digits, so a lower
    # rate; 2000 steps, because a short one (350 steps, EMA 0.995) left shapes worse than it found them:
    # single frames drawn by the image phase at 70% fell to 30% after it (51% per frame in videos)
    "digits-video": {**_COMMON, **_FLOW, "max_steps": 2000, "batch_size": 16, "learning_rate": 5e-4,
                     "lr_warmup_steps": 100, "eval_samples": 16, "num_frames": 29},
    # recipe "lamamba" (full training of the LaMambaDiffModel): 3500 steps fit the budget (about
    # 0.35 s per batch-32 step on one thread; see models.LAMAMBA_MODEL)
    "digits-lamamba": {**_COMMON, "max_steps": 3500},
}

# per model: an image phase run before the recipe above, on single frames (num_frames 1) drawn at random
# from the same clips, whose pipeline the video phase starts from. Why: at a 30-minute budget the tiny
# Wan trained on 29-frame clips from scratch never learned digit shapes (1000 steps: chance accuracy),
# while a single-frame step costs a fifth of a clip step and 5000 of them teach the shapes; the video
# phase then only has to learn the motion.
PRETRAIN: dict[str, dict[str, Any]] = {
    "digits-video": {**_COMMON, **_FLOW, "max_steps": 5000, "eval_samples": 16, "num_frames": 1},
}
PRETRAIN_DIR = "pretrain"  # the image phase's trainer output, inside the run folder
PHASE_FILE = "phase.json"  # the image phase's settings, beside its output (a resume checks them)

# per model: (trainer recipe, how its training data is written); images: the digits training split
VIDEO_CLIPS = 4000  # moving-digit clips digits-video trains on (drawn from the training digits)


def _export_data(name: str, folder: Path, num_images: int | None) -> tuple[str, Path, int]:
    from .data import MovingDigitsDataset, write_video_folder

    if name == "digits-video":
        clips = MovingDigitsDataset(num_clips=num_images or VIDEO_CLIPS, split="train", channels=3)
        return "full-video", write_video_folder(clips, folder / "moving", progress=False), len(clips)
    train_set = DigitsDataset("train", channels=3)
    items = train_set if num_images is None else [train_set[i] for i in range(min(num_images, len(train_set)))]
    recipe = "lamamba" if name == "digits-lamamba" else "full"
    return recipe, write_image_folder(items, folder / "digits", progress=False), len(items)


def _write_init(name: str, seed: int, model_options: dict[str, Any], folder: Path) -> None:
    """The untrained pipeline as a ``save_pretrained`` folder (written whole, then renamed)."""
    from diffattn.io import atomic_path

    pipe = models.build(name, seed=seed, **model_options)
    with atomic_path(folder, directory=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "build.json").write_text(json.dumps({"name": name, "seed": seed, "model_options": model_options}) + "\n")


def _folder_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 2)


def _check_settings(settings: dict[str, Any], what: str) -> None:
    from diffattn.lora.trainer import TrainConfig

    bad = sorted(k for k in settings if k not in TrainConfig.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown {what} option(s) {bad}; valid: {', '.join(TrainConfig.__dataclass_fields__)}")


def _last_row(log: Path) -> dict[str, str]:
    with log.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{log} holds no logged step")
    return rows[-1]


def _has_finished(output: Path) -> bool:
    """Whether a trainer run into ``output`` finished: it renames its pipeline into place as its last step."""
    from diffattn.lora.trainer import PIPELINE_DIR

    return (output / PIPELINE_DIR / "model_index.json").is_file()


def _finished_phase(output: Path, settings: dict[str, Any]) -> bool:
    """Whether the phase in ``output`` finished in an earlier call (one that ran with other settings is
    an error); if not, its settings are recorded there before it trains."""
    saved_file = output / PHASE_FILE
    wanted = json.loads(json.dumps(settings))
    if _has_finished(output):
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
        if saved is not None and saved != wanted:
            raise ValueError(
                f"--resume: the finished image phase in {output} ran with {saved}, this call asks "
                f"for {wanted}; use another --run-dir to train a new one"
            )
        return True
    output.mkdir(parents=True, exist_ok=True)
    saved_file.write_text(json.dumps(wanted) + "\n")
    return False


def train_model(
    name: str,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    model_options: dict[str, Any] | None = None,
    num_images: int | None = None,
    threads: int | None = 1,
    pretrain: dict[str, Any] | bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train testbed model ``name`` from scratch on the digits training split; returns the record.

    Args:
        out: the published pipeline folder (default: the shipped ``diffattn/testbed/weights/NAME``).
        seed: seeds the initial weights and every draw of the trainer.
        run_dir: checkpoints, logs and the trainer's output (default ``outputs/testbed-runs/NAME``).
        resume: continue from the newest checkpoint in ``run_dir`` (the same settings are required); a
            finished image phase is not rerun.
        model_options: builder options (``block_out_channels``, ``heads``, ``num_layers`` ...).
        num_images: train on the first N training images (digits-video: N clips) only (tests).
        threads: torch intra-op threads while training (restored after; ``None``: unchanged). One by
            default: these convolutions are small, and on a shared 2-core machine two OpenMP threads
            measured 3-30x slower per step than one (spinning threads wait on each other).
        pretrain: models with an image phase (:data:`PRETRAIN`: ``digits-video``): ``True`` runs it with
            its recipe, a dict overrides its :class:`~diffattn.lora.TrainConfig` fields
            (``{"max_steps": 2}``), ``False`` skips it (the video phase starts from the untrained model).
            The image phase trains into ``RUN_DIR/pretrain``.
        overrides: :class:`~diffattn.lora.TrainConfig` fields (``max_steps``, ``batch_size`` ...) of the
            main (for ``digits-video``: the video) phase.
    """
    from diffattn.lora import checkpoints
    from diffattn.lora.trainer import PIPELINE_DIR, TrainConfig, train

    spec = models.get(name)
    if name not in RECIPES:
        raise ValueError(f"testbed model {name!r} has no training recipe; trainable: {', '.join(RECIPES)}")
    if not isinstance(pretrain, (bool, dict)):
        raise ValueError(f"pretrain must be True, False or a dict of training options, got {pretrain!r}")
    if isinstance(pretrain, dict) and name not in PRETRAIN:
        raise ValueError(f"pretrain: {name!r} has no image phase (only {', '.join(PRETRAIN)} do)")
    out_dir = Path(out) if out is not None else models.weights_dir(name)
    run = Path(run_dir) if run_dir is not None else RUNS_DIR / name
    model_options = dict(model_options or {})
    settings = {**RECIPES[name], **overrides}
    _check_settings(settings, "training")
    pre_settings = None
    if name in PRETRAIN and pretrain is not False:
        pre_settings = {**PRETRAIN[name], **(pretrain if isinstance(pretrain, dict) else {})}
        _check_settings(pre_settings, "pretrain")
    pre_run = run / PRETRAIN_DIR

    # a finished image phase counts even without checkpoints (checkpoint_every=0): a fresh run rebuilds
    # the untrained model, and reusing an image phase trained from another one would be silently stale
    if not resume and (
        checkpoints.list_checkpoints(run) or checkpoints.list_checkpoints(pre_run) or _has_finished(pre_run)
    ):
        raise ValueError(
            f"{run} already holds a training run (checkpoints or a finished image phase); pass --resume to "
            "continue it, or another --run-dir (nothing there is overwritten)"
        )
    init = run / "init"
    build_info = {"name": name, "seed": seed, "model_options": model_options}
    if resume and (init / "build.json").is_file():
        saved = json.loads((init / "build.json").read_text())
        if saved != json.loads(json.dumps(build_info)):
            raise ValueError(f"--resume: {init} was built with {saved}, this run asks for {build_info}")
    else:
        _write_init(name, seed, model_options, init)

    n_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    phases = []  # (output folder, starting model, settings)
    if pre_settings is not None:
        phases.append((pre_run, init, pre_settings))
    phases.append((run, pre_run / PIPELINE_DIR if pre_settings is not None else init, settings))
    results, seconds = [], []
    with tempfile.TemporaryDirectory(prefix="diffattn-digits-") as tmp:
        recipe, data, n_train = _export_data(name, Path(tmp), num_images)
        for output, start_from, phase_settings in phases:
            t_phase = time.perf_counter()
            if output is pre_run and _finished_phase(pre_run, phase_settings):
                results.append(None)
                seconds.append(0.0)
                continue
            config = TrainConfig(
                recipe=recipe,
                model=str(start_from),
                data=str(data),
                output=str(output),
                seed=seed,
                resolution=spec.call_kwargs.get("height", 32),
                resume="latest" if resume and checkpoints.list_checkpoints(output) else None,
                cpu=True,
                save_pipeline=True,
                **phase_settings,
            )
            if threads is not None:
                torch.set_num_threads(max(1, threads))
            try:
                results.append(train(config))
            finally:
                torch.set_num_threads(n_threads)
            seconds.append(round(time.perf_counter() - t_phase, 1))
    elapsed = time.perf_counter() - t0
    result = results[-1]

    pipe = models.load_folder(run / PIPELINE_DIR)
    log = run / "logs" / "train_log.csv"
    record = {
        "name": name,
        "seed": seed,
        "steps": result.steps,
        "train_items": n_train,
        "final_train_loss": result.final_loss,
        "fixed_set_loss_start": result.fixed_loss_start,
        "fixed_set_loss_end": result.fixed_loss_end,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "train_seconds_this_call": round(elapsed, 1),
        "model_options": model_options,
        "train_config": dict(settings),
        "command": f"diffattn testbed train {name} --seed {seed}",
    }
    files = {"train_log.csv": log}
    if pre_settings is not None:
        pre_log = pre_run / "logs" / "train_log.csv"
        # from the log, so a phase finished in an earlier call is reported too
        last = _last_row(pre_log)
        record["pretrain"] = {
            "train_config": dict(pre_settings),
            "steps": int(last["step"]),
            "final_train_loss": float(last["loss"]),
            "train_seconds_logged": float(last["elapsed_s"]),
            "train_seconds_this_call": seconds[0],
        }
        record["train_seconds_video_phase_this_call"] = seconds[-1]
        files["pretrain_log.csv"] = pre_log
    # the loss logs ship beside the weights
    published = models.save(pipe, out_dir, name, extra={"training": record}, files=files)
    record["out"] = str(published)
    record["size_mb"] = _folder_mb(published)
    record["log"] = str(log)
    return record
