"""The model card written next to every saved LoRA."""

from __future__ import annotations

from typing import Any

from .adapters import lora_alpha


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else ("n/a" if v is None else str(v))


def model_card(cfg: Any, family: Any, num_samples: int, steps: int, metrics: dict[str, Any]) -> str:
    """Markdown with Hub front matter: base model, recipe, data, steps, metrics, how to load."""
    zoo = cfg.model.startswith("zoo:")
    video = getattr(family, "video", False)
    front = [
        "---",
        "library_name: diffusers",
        "tags:",
        "- lora",
        "- diffattn",
        f"- {'text-to-video' if video else 'text-to-image'}",
    ]
    if not zoo:
        front.append(f"base_model: {cfg.model}")
    front.append("---")
    rows = [
        ("base model", cfg.model + (" (diffattn's offline tiny zoo pipeline)" if zoo else "")),
        ("recipe", cfg.recipe),
        ("attention while training", cfg.attention or "the model's own"),
        ("data", f"{cfg.data} ({num_samples} samples)"),
        (
            "resolution",
            f"{cfg.resolution} px"
            + (f", {cfg.num_frames} frames" if video else "")
            + (f" at {cfg.fps} fps" if video and cfg.fps else ""),
        ),
        ("steps", steps),
        ("batch", f"{cfg.batch_size} per process x {cfg.grad_accum} accumulation"),
        ("learning rate", cfg.learning_rate),
        (
            "LoRA",
            f"rank {cfg.rank}, alpha {lora_alpha(cfg.rank, cfg.lora_alpha)}, dropout {cfg.lora_dropout}, init {cfg.lora_init}"
            if cfg.lora_targets
            else "none (whole modules only)",
        ),
        (
            "expert",
            {"low": "low (load with load_into_transformer_2=True)"}.get(cfg.expert, cfg.expert or "n/a"),
        ),
        ("LoRA targets", ", ".join(cfg.lora_targets or []) or "none"),
        ("extra trained modules", ", ".join(cfg.train_modules or []) or "none"),
        ("EMA", f"decay {cfg.ema_decay} (saved weights are the EMA)" if cfg.ema else "off"),
        ("mixed precision", cfg.mixed_precision),
        ("seed", cfg.seed),
    ]
    table = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)
    mtable = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    load = (
        "```python\n"
        "pipe.load_lora_weights(PATH)                 # any diffusers pipeline of the base model\n"
        "from diffattn.lora import load; load(pipe, PATH)  # also loads extra_modules.safetensors\n"
        "```"
    )
    if getattr(cfg, "save_pipeline", False):
        load += (
            "\n\nThe whole trained pipeline is in `pipeline/`: "
            "`DiffusionPipeline.from_pretrained(PATH + '/pipeline')`."
        )
    return (
        "\n".join(front)
        + f"\n\n# {'LoRA' if cfg.lora_targets else 'Trained modules'}: {cfg.recipe} on {cfg.model}\n\n"
        + f"Trained with `diffattn train {cfg.recipe}`.\n\n"
        + "| | |\n|---|---|\n"
        + table
        + "\n\n## Metrics\n\n| metric | value |\n|---|---|\n"
        + mtable
        + "\n\n`fixed_set_loss_*`: the training loss on a fixed set of (sample, timestep, noise) triples, "
        "before and after training.\n\n## Use\n\n" + load + "\n"
    )
