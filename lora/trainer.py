"""The training loop: one accelerate + peft trainer for every recipe.

Determinism is designed in, not hoped for:

- The data order of epoch ``e`` is a permutation seeded by ``(seed, e)``.  Each optimizer step takes
  one global batch (``batch_size x processes x grad_accum`` samples) and cuts it into micro-batches of
  ``batch_size``; process ``r`` runs micro-batches ``r, r + P, r + 2P, ...``.  So 2 processes with
  accumulation A run the same micro-batches as 1 process with accumulation 2A.
- Everything random about a sample (crop, VAE posterior draw, caption dropout, timestep, noise) comes
  from generators seeded by ``(seed, epoch, sample index)``; LoRA dropout is seeded per micro-batch
  from ``(seed, epoch, first sample index)``.  No per-process generator is ever used, so neither the
  process split nor a resume changes any draw.
- Checkpoints hold the trainable weights, optimizer, LR schedule, EMA and step; the data position is a
  function of the step, so resuming from a checkpoint continues exactly where the run was.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffattn.io import atomic_text

from . import adapters, checkpoints, sharding
from .data import DataError, build_dataset, collate, parse_buckets
from .models import Family, family_for
from .objectives import objective_from_scheduler
from .recipes import get_recipe

_FIXED_SEED = 20240607  # the fixed (timestep, noise) evaluation set does not depend on --seed


@dataclass
class TrainConfig:
    """Everything a run needs; the command line maps one option to one field (``--max-steps`` ...)."""

    recipe: str
    model: str
    data: str
    output: str
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 1  # per process and micro-step
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    ema: bool = False
    ema_decay: float = 0.999
    rank: int = 4
    lora_alpha: float | None = None  # default: rank
    lora_dropout: float = 0.0
    lora_init: str = "default"  # default | gaussian | pissa | olora | ... (peft init_lora_weights)
    lora_targets: list[str] | None = None  # default: the recipe's
    train_modules: list[str] | None = None  # default: the recipe's
    attention: str | None = None  # default: the recipe's; "none" forces the model's own
    attention_options: dict[str, Any] = field(default_factory=dict)
    resolution: int | None = None
    crop: str = "center"
    expert: str | None = None  # two-expert models (Wan 2.2): "high" or "low"
    buckets: str | None = None  # None | "auto" | "HxW,HxW,..." (size bucketing by aspect ratio)
    num_frames: int | None = None
    fps: float | None = None
    default_caption: str | None = None
    caption_dropout: float = 0.0
    max_sequence_length: int | None = None
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    checkpoint_every: int = 0
    checkpoints_total_limit: int | None = None
    resume: str | None = None  # None | "latest" | a checkpoint folder
    no_checkpoint_fallback: bool = False  # --resume latest: a damaged newest checkpoint is an error, not skipped
    validation_every: int = 0
    validation_prompt: list[str] | None = None  # default: the first caption
    validation_inference_steps: int | None = None
    log_every: int = 1
    eval_samples: int = 8  # samples in the fixed-(timestep, noise) loss; 0 turns it off
    num_workers: int = 0
    push_to_hub: str | None = None
    cpu: bool = False
    save_pipeline: bool | None = None  # default: the recipe's (else False); writes output/pipeline/

    def resolved(self) -> TrainConfig:
        """A copy with the recipe's defaults filled in where the user gave nothing."""
        recipe = get_recipe(self.recipe)
        cfg = dataclasses.replace(self)
        for key, value in recipe.defaults.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.lora_targets is None:
            cfg.lora_targets = list(recipe.lora_targets)
        if cfg.train_modules is None:
            cfg.train_modules = list(recipe.train_modules)
        if cfg.save_pipeline is None:
            cfg.save_pipeline = False
        if cfg.attention is None and recipe.attention is not None:
            cfg.attention, opts = recipe.attention
            cfg.attention_options = {**opts, **cfg.attention_options}
        return cfg


@dataclass
class TrainResult:
    """What a finished run produced: the output folder, steps, losses and the checkpoint it resumed from."""

    output: Path
    steps: int
    final_loss: float | None
    fixed_loss_start: float | None
    fixed_loss_end: float | None
    resumed_from: Path | None


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (run seed, epoch, sample index, stream)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
        >> np.uint64(1)
    )


def _gen(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(*parts))


# streams of per-sample randomness
_S_NOISE, _S_DATA, _S_DROPOUT, _S_ORDER, _S_VAE, _S_INIT = range(6)


class Schedule:
    """Which samples each process sees at each step (a pure function of seed, step and world size).

    ``groups`` (size buckets) partitions the sample indices; a micro-batch never mixes groups.  Each
    epoch every group is shuffled and cut into micro-batches (an incomplete one is dropped), the
    micro-batches of all groups are shuffled together, and consecutive ``grad_accum x world`` of them
    make one optimizer step.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        batch_size: int,
        grad_accum: int,
        world: int,
        groups: list[list[int]] | None = None,
    ) -> None:
        self.n, self.seed, self.bs, self.accum, self.world = n, seed, batch_size, grad_accum, world
        self.groups = [list(g) for g in groups] if groups else None
        self.global_batch = batch_size * grad_accum * world
        per_step = grad_accum * world
        micro = sum(len(g) // batch_size for g in self.groups) if self.groups else n // batch_size
        self.steps_per_epoch = micro // per_step  # incomplete last steps are dropped every epoch
        if self.steps_per_epoch == 0:
            where = (
                f" in {len(self.groups)} size buckets (sizes {[len(g) for g in self.groups]})"
                if self.groups
                else ""
            )
            raise DataError(
                f"the dataset has {n} samples{where}, fewer than one global batch of {self.global_batch} "
                f"(--batch-size {batch_size} x --grad-accum {grad_accum} x {world} processes)"
            )
        self._cache: tuple[int, list[list[int]]] | None = None

    def _micro(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            g = _gen(self.seed, epoch, 0, _S_ORDER)
            if self.groups is None:
                order = torch.randperm(self.n, generator=g).tolist()
                micro = [order[i : i + self.bs] for i in range(0, self.n - self.bs + 1, self.bs)]
            else:
                micro = []
                for grp in self.groups:
                    order = [grp[i] for i in torch.randperm(len(grp), generator=g).tolist()]
                    micro += [order[i : i + self.bs] for i in range(0, len(order) - self.bs + 1, self.bs)]
                micro = [micro[i] for i in torch.randperm(len(micro), generator=g).tolist()]
            self._cache = (epoch, micro)
        return self._cache[1]

    def micro_batches(self, step: int, rank: int) -> tuple[int, list[list[int]]]:
        """(epoch, this rank's ``grad_accum`` micro-batches of sample indices) for optimizer step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        per_step = self.accum * self.world
        chunks = self._micro(epoch)[k * per_step : (k + 1) * per_step]
        return epoch, chunks[rank :: self.world]


class _StepData(torch.utils.data.Dataset):
    """Micro-batches of one rank from ``start`` on, so a DataLoader can prefetch them in workers."""

    def __init__(self, dataset: Any, schedule: Schedule, seed: int, rank: int, start: int, stop: int) -> None:
        self.dataset, self.schedule, self.seed, self.rank = dataset, schedule, seed, rank
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return (self.stop - self.start) * self.schedule.accum

    def __getitem__(self, i: int) -> dict[str, Any]:
        step, j = divmod(i, self.schedule.accum)
        epoch, mbs = self.schedule.micro_batches(self.start + step, self.rank)
        samples = [self.dataset.load(idx, _gen(self.seed, epoch, idx, _S_DATA)) for idx in mbs[j]]
        batch = collate(samples)
        batch["epoch"] = epoch
        return batch


class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`train` runs it."""

    def __init__(self, config: TrainConfig) -> None:
        from accelerate import Accelerator

        self.cfg = cfg = config.resolved()
        self.recipe = get_recipe(cfg.recipe)
        self.output = Path(cfg.output)
        self._check_options()
        # data first: a bad folder fails before any model is loaded
        self.dataset = build_dataset(
            self.recipe.data,
            cfg.data,
            resolution=cfg.resolution,
            crop=cfg.crop,
            num_frames=cfg.num_frames,
            fps=cfg.fps,
            default_caption=cfg.default_caption,
            buckets=parse_buckets(cfg.buckets, cfg.resolution) if cfg.buckets else None,
        )
        self.resume_from = checkpoints.resolve_resume(self.output, cfg.resume, fallback=not cfg.no_checkpoint_fallback)
        if self.resume_from is None and (
            checkpoints.list_checkpoints(self.output)
            or any((self.output / f).exists() for f in (adapters.LORA_FILE, adapters.EXTRA_FILE))
        ):
            raise ValueError(
                f"--output {str(self.output)!r} already holds a training run (checkpoints or a saved LoRA); pass "
                "--resume latest to continue it, or choose a new --output (nothing there is overwritten)"
            )
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != cfg.mixed_precision:
            # a second run in this process (notebook, tests) with another precision: accelerate keeps
            # its state in a singleton; the process group (PartialState) is kept
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            cpu=cfg.cpu,
        )
        state = self.accelerator.state
        kind = self.accelerator.distributed_type.name
        fsdp = getattr(state, "fsdp_plugin", None)
        ds = getattr(state, "deepspeed_plugin", None) if kind == "DEEPSPEED" else None
        zero = ds.deepspeed_config.get("zero_optimization", {}).get("stage") if ds is not None else None
        sharding.check_supported(kind, getattr(fsdp, "fsdp_version", None), zero)
        # FSDP2: parameters are DTensor shards; every process joins gathers and sharded forwards
        self.sharded = kind == "FSDP"
        # DeepSpeed ZeRO: the fp32 masters and Adam state in partitions (stage 3: the weights too)
        self.deepspeed = kind == "DEEPSPEED"
        if self.deepspeed:
            if cfg.ema and zero == 3:
                raise ValueError(
                    "--ema under DeepSpeed ZeRO-3: the weights are partitioned and there is no whole copy to "
                    "average; use ZeRO-2 or FSDP2 (whose shards the EMA follows)"
                )
            if cfg.ema and cfg.mixed_precision != "no":
                raise ValueError(
                    "--ema under DeepSpeed needs --mixed-precision no: DeepSpeed keeps the module's weights "
                    "in bf16/fp16, too coarse for an average of small updates (or use FSDP2 or DDP)"
                )
            sharding.configure_deepspeed(
                ds.deepspeed_config, cfg.batch_size, cfg.grad_accum, self.accelerator.num_processes, cfg.max_grad_norm
            )
        if self.resume_from is not None:
            checkpoints.check_identity(cfg, checkpoints.read_state(self.resume_from), self.resume_from)
        groups = self.dataset.groups() if hasattr(self.dataset, "groups") else None
        self.schedule = Schedule(
            len(self.dataset),
            cfg.seed,
            cfg.batch_size,
            cfg.grad_accum,
            self.accelerator.num_processes,
            groups,
        )
        self._build_model()

    # ---------------------------------------------------------------- setup
    def _check_options(self) -> None:
        cfg = self.cfg
        for name in ("max_steps", "batch_size", "grad_accum", "rank"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
        if cfg.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16, got {cfg.mixed_precision!r}")
        if not 0.0 <= cfg.caption_dropout <= 1.0:
            raise ValueError(f"--caption-dropout must be in [0, 1], got {cfg.caption_dropout}")
        if cfg.push_to_hub:
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise ValueError(
                    f"--push-to-hub {cfg.push_to_hub!r}: the Hugging Face Hub is unreachable in offline mode "
                    "(HF_HUB_OFFLINE=1); train without --push-to-hub and upload the output folder later"
                )

    def _build_model(self) -> None:
        import diffattn
        from diffattn.loading import ZOO_PREFIX, load_pipeline

        cfg, acc = self.cfg, self.accelerator
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            cfg.mixed_precision
        ]
        self.pipe = load_pipeline(cfg.model, dtype=weight_dtype, device=str(acc.device))
        text_kwargs: dict[str, Any] = {}
        if cfg.model.startswith(ZOO_PREFIX):  # the zoo's tiny text encoders need short sequences
            from diffattn import zoo

            zoo_kw = zoo.default_call_kwargs(cfg.model[len(ZOO_PREFIX) :])
            text_kwargs = {k: zoo_kw[k] for k in ("max_sequence_length", "prompt_template") if k in zoo_kw}
        if cfg.max_sequence_length is not None:
            text_kwargs["max_sequence_length"] = cfg.max_sequence_length
        self.family: Family = family_for(self.pipe, text_kwargs, cfg.expert)
        if self.family.video != (self.recipe.data == "video"):
            kind = "video" if self.family.video else "image"
            raise ValueError(
                f"recipe {cfg.recipe!r} trains on {self.recipe.data} data but --model {cfg.model!r} is a {kind} model"
            )
        self.objective = objective_from_scheduler(
            self.pipe.scheduler, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std
        )
        self.objective.t_range = self.family.t_range
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        torch.manual_seed(sample_seed(cfg.seed, _S_INIT))  # new modules and LoRA A: init follows --seed only
        if self.recipe.prepare is not None:
            self.recipe.prepare(self.pipe, cfg)
        model = self.family.denoiser
        init: str | bool = True if cfg.lora_init == "default" else cfg.lora_init
        self.has_lora = bool(cfg.lora_targets)
        if self.has_lora:
            adapters.add_lora(model, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, init, cfg.lora_targets)
        elif not cfg.train_modules:
            raise ValueError("nothing to train: no --lora-targets and no --train-modules")
        self.extra = adapters.mark_extra_trainable(model, cfg.train_modules or [])
        # trainable weights stay fp32 under mixed precision; the frozen base is in weight_dtype
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.patch = None
        if cfg.attention and cfg.attention != "none":
            self.patch = diffattn.apply(model, cfg.attention, **cfg.attention_options)
        if cfg.save_pipeline and (self.has_lora or self.patch is not None):
            raise ValueError(
                "--save-pipeline saves a stock pipeline: use it without LoRA targets and without --attention "
                "(train whole modules, e.g. the 'full' recipe)"
            )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self._param_groups(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        from diffusers.optimization import get_scheduler

        # stepped by hand once per optimizer step: accelerate's prepared scheduler steps once per
        # process, which would make the schedule depend on the process count
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_steps,
        )
        model.train()
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # FSDP2 replaces every parameter by a DTensor shard (accelerate re-points the optimizer at them)
        named = dict(model.named_parameters())
        self.params = [named[n] for n in self.param_names]
        self.ema = None
        if cfg.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=cfg.ema_decay)

    def _param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups by the recipe's ``lr_scale``: the unscaled group first (the log's ``lr``, when it has any),
        then one group per other factor, each in parameter order (a checkpoint's index-keyed optimizer state
        follows this order)."""
        scale = self.recipe.lr_scale
        if scale is None:
            return [{"params": self.params}]
        by_factor: dict[float, list[torch.nn.Parameter]] = {1.0: []}
        for name, p in zip(self.param_names, self.params):
            factor = float(scale(name, self.cfg))
            if not factor > 0:
                raise ValueError(
                    f"recipe {self.recipe.name!r} gives parameter {name!r} learning-rate factor {factor}; need > 0"
                )
            by_factor.setdefault(factor, []).append(p)
        return [{"params": ps, "lr": self.cfg.learning_rate * f} for f, ps in by_factor.items() if ps]

    # ---------------------------------------------------------------- one loss
    def _conditioning(self, captions: list[str], gens: list[torch.Generator]) -> dict[str, Any]:
        if self.cfg.caption_dropout > 0:
            captions = [
                "" if float(torch.rand(1, generator=g)) < self.cfg.caption_dropout else c
                for c, g in zip(captions, gens)
            ]
        return self.family.encode_text(captions, self.accelerator.device)

    def loss_on(self, model: Any, batch: dict[str, Any], epoch: int, fixed: bool = False) -> torch.Tensor:
        """Mean-squared error of one micro-batch with per-sample seeded timesteps and noise."""
        idx = batch["index"]
        seed = (_FIXED_SEED, 0) if fixed else (self.cfg.seed, epoch)
        gens = [_gen(*seed, i, _S_NOISE) for i in idx]
        cond = (
            self._conditioning(batch["caption"], gens)
            if not fixed
            else self.family.encode_text(batch["caption"], self.accelerator.device)
        )
        latents = self.family.encode_pixels(batch["pixels"], [_gen(*seed, i, _S_VAE) for i in idx]).float()
        cond = self.family.condition_on_pixels(batch["pixels"], cond)
        t_list = [self.objective.timestep(self.objective.sample_u(g)) for g in gens]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in gens]).to(latents)
        t = torch.tensor(t_list, device=latents.device, dtype=torch.float32)
        if self.objective.kind != "flow":
            t = t.long()
        if self.recipe.condition is not None:
            cond = self.recipe.condition(self, batch, cond)
        noisy, target = self.objective.noisy_and_target(latents, noise, t)
        # the frozen base's dtype; a fully trained denoiser is fp32 (autocast handles mixed precision)
        dtype = next((p.dtype for p in self.family.denoiser.parameters() if not p.requires_grad), torch.float32)
        pred = self.family.predict(model, noisy.to(dtype), t, cond)
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def fixed_loss(self) -> float | None:
        """Loss on a fixed set of (sample, timestep, noise) triples, independent of --seed; eval mode."""
        n = min(self.cfg.eval_samples, len(self.dataset))
        if n <= 0:
            return None
        model = self.family.denoiser
        was = model.training
        model.eval()
        try:
            losses = []
            for i in range(n):
                batch = collate([self.dataset.load(i, None)])
                with self.accelerator.autocast():
                    losses.append(float(self.loss_on(model, batch, 0, fixed=True)))
        finally:
            model.train(was)
            sharding.reshard(model)
        return float(np.mean(losses))

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int) -> None:
        """Write the checkpoint of step ``step`` (see :func:`diffattn.lora.checkpoints.save`)."""
        checkpoints.save(self, step)

    def full_trainable(self) -> dict[str, torch.Tensor]:
        """The trainable weights, whole, on CPU (a collective under FSDP and DeepSpeed); under
        DeepSpeed the fp32 masters from its optimizer partitions, not the module's own copies."""
        named = dict(self.family.denoiser.named_parameters())
        if self.deepspeed:
            return sharding.deepspeed_full_parameters(named, self.param_names)
        return sharding.full_parameters(named, self.param_names)

    def load_checkpoint(self, path: Path) -> int:
        """Restore the run from checkpoint ``path``; returns its step (see :func:`diffattn.lora.checkpoints.load`)."""
        return checkpoints.load(self, path)

    # ---------------------------------------------------------------- logging, samples
    def _log_path(self) -> Path:
        return self.output / "logs" / "train_log.csv"

    def _trim_log(self, step: int) -> None:
        """On resume, drop log rows after the checkpoint so the CSV reads as one run."""
        path = self._log_path()
        if not path.is_file():
            return
        rows = list(csv.reader(path.read_text().splitlines()))
        keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        buf = io.StringIO()
        csv.writer(buf).writerows(keep)
        atomic_text(path, buf.getvalue())

    def _log(self, row: dict[str, Any]) -> None:
        path = self._log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self._tb.add_scalar(f"train/{k}", v, row["step"])

    @torch.no_grad()
    def validate(self, step: int) -> list[Path]:
        """Sample each validation prompt with the current weights (same seed every time).

        Images go into one PNG row ``samples/step-N.png``; videos into ``samples/step-N[_i].gif``.
        """
        from diffattn.io import save_frames, save_images
        from diffattn.loading import ZOO_PREFIX

        cfg = self.cfg
        first = (
            self.dataset.items[0].caption
            if hasattr(self.dataset, "items")
            else self.dataset.rows[0]["_caption"]
        )
        prompts = list(cfg.validation_prompt or [first])
        call: dict[str, Any] = {}
        if cfg.model.startswith(ZOO_PREFIX):
            from diffattn import zoo

            call.update(zoo.default_call_kwargs(cfg.model[len(ZOO_PREFIX) :]))
        size = self.dataset.size
        call.update(self.family.validation_kwargs(size[0], size[1], cfg.num_frames))
        call.update(self.family.validation_extra(self.dataset))
        if cfg.validation_inference_steps:
            call["num_inference_steps"] = cfg.validation_inference_steps
        call["output_type"] = "np"
        model = self.family.denoiser
        model.eval()
        outs = []
        try:
            for prompt in prompts:  # one call per prompt: a fixed seed per prompt, any pipeline's batching
                generator = torch.Generator("cpu").manual_seed(cfg.seed)
                with self.accelerator.autocast():  # frozen weights in bf16/fp16, LoRA in fp32
                    outs.append(self.pipe(**{**call, "prompt": prompt, "generator": generator}))
        finally:
            model.train()
            sharding.reshard(model)
        if not self.accelerator.is_main_process:  # an FSDP process that joined the sharded forwards
            return []
        folder = self.output / "samples"
        if getattr(outs[0], "frames", None) is not None:
            names = (
                [f"step-{step:06d}.gif"]
                if len(outs) == 1
                else [f"step-{step:06d}_{i}.gif" for i in range(len(outs))]
            )
            return [save_frames(o.frames[0], folder / n)[0] for o, n in zip(outs, names)]
        grid = np.concatenate([np.asarray(o.images)[0] for o in outs], axis=1)  # one row, a prompt per column
        return save_images([grid], folder / f"step-{step:06d}.png")

    # ---------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        """Run (or resume) the training loop to ``max_steps``: checkpoints, validation, the final save."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        start = 0
        self.fixed_loss_start: float | None = None
        if self.resume_from is not None:
            start = self.load_checkpoint(self.resume_from)
            self.fixed_loss_start = checkpoints.read_state(self.resume_from).get("fixed_loss_start")
            if acc.is_main_process:
                print(f"resumed from {self.resume_from} at step {start}", file=sys.stderr)
        self._tb = None
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            atomic_text(
                self.output / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
            )
            if start:
                self._trim_log(start)
            self._tb = _tensorboard(self.output / "logs")
        # under FSDP the forward passes are collective: every process evaluates, the main one writes
        # (under DeepSpeed too, so that every process applies the EMA before the weights are gathered)
        evaluates = self.sharded or self.deepspeed or acc.is_main_process
        if start == 0:
            self.fixed_loss_start = self.fixed_loss() if evaluates else None
        fixed_start = self.fixed_loss_start
        loader = torch.utils.data.DataLoader(
            _StepData(self.dataset, self.schedule, cfg.seed, acc.process_index, start, cfg.max_steps),
            batch_size=None,
            num_workers=cfg.num_workers,
        )
        it = iter(loader)
        bar = tqdm(
            total=cfg.max_steps, initial=start, disable=not acc.is_main_process, desc=f"train {cfg.recipe}"
        )
        t0, loss_value = time.perf_counter(), None
        for step in range(start, cfg.max_steps):
            losses = []
            for j in range(cfg.grad_accum):
                batch = next(it)
                epoch = batch["epoch"]
                # dropout seeded per micro-batch (same micro-batch -> same mask on any process)
                torch.manual_seed(sample_seed(cfg.seed, epoch, batch["index"][0], _S_DROPOUT))
                with acc.accumulate(self.model):
                    with acc.autocast():
                        loss = self.loss_on(self.model, batch, epoch)
                    acc.backward(loss)
                    if j == cfg.grad_accum - 1:
                        if not acc.sync_gradients:  # pragma: no cover - accelerate contract
                            raise RuntimeError("gradient accumulation out of step with accelerate")
                        grad_norm = (
                            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                            if cfg.max_grad_norm > 0
                            else None
                        )
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.step(self.params)
            loss_value = float(acc.reduce(torch.stack(losses).mean().to(acc.device), reduction="mean"))
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.max_steps):
                self._log(
                    {
                        "step": done,
                        "epoch": epoch,
                        "loss": loss_value,
                        "lr": float(self.lr_scheduler.get_last_lr()[0]),
                        "grad_norm": float(grad_norm) if grad_norm is not None else "",
                        "samples": done * self.schedule.global_batch,
                        "elapsed_s": round(time.perf_counter() - t0, 3),
                    }
                )
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                self.save_checkpoint(done)
            if cfg.validation_every and done % cfg.validation_every == 0 and evaluates:
                self.validate(done)
        bar.close()
        acc.wait_for_everyone()
        fixed_end = None
        if evaluates:
            if self.ema is not None:
                self.ema.copy_to(self.params)  # the saved LoRA is the EMA of the weights
            fixed_end = self.fixed_loss()
        full = self._full_state() if self.sharded or self.deepspeed else None
        if acc.is_main_process:
            self.save_final(cfg.max_steps, loss_value, fixed_start, fixed_end, full)
            if self._tb is not None:
                self._tb.close()
        acc.wait_for_everyone()
        result = TrainResult(self.output, cfg.max_steps, loss_value, fixed_start, fixed_end, self.resume_from)
        if cfg.push_to_hub and acc.is_main_process:
            push_to_hub(self.output, cfg.push_to_hub)
        return result

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The denoiser's whole state as full CPU tensors: the trainable weights, and with
        ``--save-pipeline`` the frozen ones too (a collective under FSDP and DeepSpeed)."""
        model = self.family.denoiser
        # under DeepSpeed (ZeRO 0-2 with EMA) the EMA was copied into the whole module parameters, not
        # into the masters
        if self.deepspeed and self.ema is not None:
            trainable = sharding.full_parameters(dict(model.named_parameters()), self.param_names)
        else:
            trainable = self.full_trainable()
        if self.cfg.save_pipeline:
            with sharding.gathered(model, self.deepspeed):
                frozen = {n: sharding.full_tensor(t) for n, t in model.state_dict().items()}
            return {**frozen, **trainable}
        return trainable

    def save_final(
        self,
        steps: int,
        loss: float | None,
        fixed_start: float | None,
        fixed_end: float | None,
        full: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """LoRA (diffusers format), extra modules and the model card, each file renamed into place.

        ``full``: the denoiser's gathered state under FSDP or DeepSpeed (else read from the model).
        """
        from diffattn.io import publish_modes, replace_path

        from .card import model_card

        tmp = self.output / f".tmp-final-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            model = self.family.denoiser
            if self.has_lora:
                adapters.save_lora(type(self.pipe), self.family.lora_component, model, tmp, state=full)
            if self.extra:
                adapters.save_extra(self.family.component, model, tmp, self.extra, tensors=full)
            metrics = {
                "final_train_loss": loss,
                "fixed_set_loss_start": fixed_start,
                "fixed_set_loss_end": fixed_end,
            }
            (tmp / "README.md").write_text(
                model_card(self.cfg, self.family, len(self.dataset), steps, metrics)
            )
            if self.cfg.save_pipeline:
                self.save_pipeline(tmp / PIPELINE_DIR, full)
            publish_modes(tmp)  # each file renamed into place with the umask's mode
            for f in tmp.iterdir():
                replace_path(f, self.output / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_pipeline(self, folder: Path, full: dict[str, torch.Tensor] | None = None) -> Path:
        """The whole pipeline with the trained denoiser (``save_pretrained``, safetensors) into ``folder``.

        With ``full`` (the gathered state of a sharded denoiser) the denoiser saved is a fresh copy from
        its config holding those tensors; the sharded one cannot be serialized by one process.
        """
        pipe = self.pipe
        if full is not None:
            model = self.family.denoiser
            fresh = type(model).from_config(model.config)
            fresh.load_state_dict(full, strict=True)
            pipe = type(pipe)(**{**pipe.components, self.family.component: fresh})
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder


PIPELINE_DIR = "pipeline"  # --save-pipeline: output/pipeline/ loads with DiffusionPipeline.from_pretrained


def _tensorboard(folder: Path) -> Any:
    """A TensorBoard writer when tensorboard is installed, else ``None``."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(folder))


def push_to_hub(folder: Path, repo_id: str) -> None:
    """Upload the LoRA, model card and samples; fails with a clear message when the Hub is unreachable."""
    try:
        from huggingface_hub import create_repo, upload_folder

        create_repo(repo_id, exist_ok=True)
        upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=["*.safetensors", "README.md", "samples/*", "train_config.json"],
            ignore_patterns=["checkpoints/*", ".tmp-*"],
        )
    except Exception as e:
        raise RuntimeError(
            f"--push-to-hub {repo_id!r} failed ({type(e).__name__}: {e}); the trained LoRA is saved in "
            f"{str(folder)!r} and can be uploaded later with `huggingface-cli upload {repo_id} {folder}`"
        ) from e


def train(config: TrainConfig) -> TrainResult:
    """Run one training job (on every process of an ``accelerate launch`` / ``torchrun`` group)."""
    return Trainer(config).train()


__all__ = ["TrainConfig", "TrainResult", "Trainer", "push_to_hub", "sample_seed", "train"]
