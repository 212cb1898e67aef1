"""Recipe ``lamamba``: full training of a LaMamba-Diff model (from scratch or fine-tuning), not LoRA.

``diffattn train lamamba --model FOLDER --data IMAGES ...`` where ``FOLDER`` is a saved
:class:`~diffattn.pipelines.LaMambaDiffPipeline` (build one with ``LaMambaDiffModel.from_preset`` and
``save_pretrained``). Everything else comes from the shared trainer: accelerate (multi-GPU, mixed
precision), EMA (``--ema``), checkpoints and ``--resume``, tqdm, the loss log, the saved pipeline.

Conditioning: a class-conditional model reads its class label from the caption (the first integer:
``"3"``, ``"digit 3"``; an empty caption, e.g. from ``--caption-dropout``, is the null label used for
classifier-free guidance); a text-conditional model encodes captions with its text encoder. In pixel
space (``vae`` None) images in [-1, 1] are the model input. The noise half of a learned-sigma output
is trained with the MSE objective (the variance half gets no gradient from it).

Recipe ``lamamba-lora``: adapt a pretrained image transformer (Flux, SD3; any model
``diffattn.apply(model, "lamamba")`` supports) to LaMamba attention: the method is applied before
training (``--option key=value`` are its options, e.g. ``window_size=8``), LoRA trains on the attention
projections and the new window / SS2D parameters (the ``processor`` modules: the SS2D branch and its
zero-initialised gate) train in full; they are saved in ``extra_modules.safetensors``. Load the result
with ``diffattn.apply(pipe, "lamamba", **same_options)`` then ``diffattn.lora.adapters.load(pipe, out)``.

The trainer recognises the pipeline's denoiser through ``LaMambaFamily`` in :mod:`diffattn.lora.models`.
"""

from __future__ import annotations

from typing import Any

from .recipe import Recipe


def _apply_lamamba(pipe: Any, cfg: Any) -> None:
    """``prepare`` hook of ``lamamba-lora``: set the LaMamba processors (their parameters) before LoRA."""
    import diffattn

    if cfg.attention and cfg.attention != "none":
        raise ValueError(
            f"recipe 'lamamba-lora' applies 'lamamba' itself; drop --attention {cfg.attention!r}"
        )
    denoiser = next(
        (getattr(pipe, c) for c in ("transformer", "unet") if getattr(pipe, c, None) is not None), None
    )
    if denoiser is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer to adapt")
    diffattn.apply(denoiser, "lamamba", **dict(cfg.attention_options))


RECIPE = Recipe(
    name="lamamba",
    description="train a LaMamba-Diff model in full (class- or text-conditional; from scratch or fine-tuning)",
    data="image",
    lora_targets=(),
    train_modules=("*",),
    defaults={"resolution": 256, "save_pipeline": True},
)
TEXT_RECIPE = Recipe(
    name="lamamba-lora",
    description="adapt a pretrained image transformer to LaMamba attention: LoRA + the new window/SS2D parameters",
    data="image",
    train_modules=("processor",),
    prepare=_apply_lamamba,
    defaults={"resolution": 512},
)
