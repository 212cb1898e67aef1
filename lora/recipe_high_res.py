"""Recipe ``high-res``: the LoRA bridge of Scale-DiT for Flux (and the testbed DiT).

``diffattn train high-res --model FLUX_FOLDER --data IMAGES --resolution 1024`` trains a LoRA that adapts a
Flux model to the LR-guidance pathway of :class:`~diffattn.pipelines.HighResPipeline`; no high-resolution
data is needed. For every training image at ``--resolution`` the LR image is its bicubic downsampling by
:data:`LR_RATIO` (1024 px -> 256 px), encoded by the VAE and appended, clean, after the noisy image
tokens, with position ids scaled by the ratio (the pipeline's scaled anchors) and the modulation of their
own timestep 0 (:class:`~diffattn.pipelines.high_res.LRModulation`, as in the pipeline). The loss is the
rectified-flow MSE on the image tokens only (the shared trainer: logit-normal timesteps from the
scheduler's objective, accelerate, checkpoints and ``--resume``, multi-GPU without code changes).
Attention during training is ``hilbert_local`` with ``lr_mode="all"``: every HR token sees every LR token
(Scale-DiT's training setting), HR tokens a ``radius`` neighbourhood (``--attention-option radius=N``).

LoRA targets (pass ``--rank 16`` for the reference's rank): attention ``to_q``/``to_k``/``to_v``/``to_out.0``
and the image-token embedding ``x_embedder`` act on every token; the blocks' adaLN norms
(``norm1.linear``, ``norm.linear``) and feed-forward / MLP projections (``ff.net.0.proj``, ``ff.net.2``,
``proj_mlp``, single-block ``proj_out``) act on the LR tokens only (:class:`LRModulation` runs them with
their adapters off for the other tokens), as in the reference. (``proj_out`` also matches the model's
final output projection, whose LoRA acts on every token, like ``x_embedder``'s.) The bridge loads with
``HighResPipeline.load_lora_weights``.

"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .recipe import Recipe

LR_RATIO = 4  # HR/LR side ratio while training (1024 px images, 256 px LR)
_LR_KEY = "lr_hidden_states"
_HOOK_ATTR = "_diffattn_high_res_hooks"


def _pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Append the clean LR tokens (passed as ``lr_hidden_states``) and their scaled position ids."""
    lr = kwargs.pop(_LR_KEY, None)
    modulation = getattr(module, _HOOK_ATTR)[2]
    modulation.n_lr = 0 if lr is None else lr.shape[1]
    if lr is None:
        module._diffattn_n_hr = None
        return args, kwargs
    ratio, lr_h, lr_w = kwargs.pop("lr_grid")
    hidden = kwargs["hidden_states"]
    module._diffattn_n_hr = hidden.shape[1]
    ids = torch.zeros(lr_h, lr_w, 3, device=hidden.device, dtype=kwargs["img_ids"].dtype)
    ids[..., 1] = torch.arange(lr_h, device=hidden.device)[:, None] * ratio
    ids[..., 2] = torch.arange(lr_w, device=hidden.device)[None, :] * ratio
    kwargs["hidden_states"] = torch.cat([hidden, lr.to(hidden.dtype)], dim=1)
    kwargs["img_ids"] = torch.cat([kwargs["img_ids"], ids.reshape(-1, 3)], dim=0)
    return args, kwargs


def _post_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Keep the prediction for the HR tokens only."""
    n = getattr(module, "_diffattn_n_hr", None)
    if n is None:
        return output
    if isinstance(output, tuple):
        return (output[0][:, :n], *output[1:])
    output.sample = output.sample[:, :n]
    return output


def prepare(pipe: Any, config: Any) -> None:
    """Teach the transformer to take ``lr_hidden_states`` (hooks kept for the whole run)."""
    model = pipe.transformer
    if type(model).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"the high-res recipe trains FluxTransformer2DModel pipelines, got {type(model).__name__}")
    if getattr(model, _HOOK_ATTR, None) is None:
        from diffattn.pipelines.high_res import LRModulation

        pre = model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        post = model.register_forward_hook(_post_hook, with_kwargs=True)
        # registered after the hook above, so it sees the LR token count of the call
        setattr(model, _HOOK_ATTR, (pre, post, LRModulation(model, timestep=0.0)))


def lr_latents(pixels: torch.Tensor, family: Any, generators: list[torch.Generator], ratio: int = LR_RATIO) -> torch.Tensor:
    """Packed latents of the bicubic ``1/ratio`` downsampling of ``pixels`` (``(B, 3, H, W)`` in [-1, 1])."""
    b, _, h, w = pixels.shape
    unit = family.pipe.vae_scale_factor * 2
    if h % (ratio * unit) or w % (ratio * unit):
        raise ValueError(
            f"the high-res recipe needs --resolution divisible by {ratio * unit} (LR ratio {ratio} x {unit} px "
            f"per token); got {h}x{w}"
        )
    small = F.interpolate(pixels.float(), size=(h // ratio, w // ratio), mode="bicubic", antialias=True)
    z = family.encode_pixels(small.clamp(-1, 1).to(pixels.dtype), generators).float()
    zb, zc, zh, zw = z.shape
    return family.pipe._pack_latents(z, zb, zc, zh, zw)


def condition(trainer: Any, batch: dict[str, Any], cond: dict[str, Any]) -> dict[str, Any]:
    pixels = batch["pixels"].to(trainer.accelerator.device)
    gens = [torch.Generator().manual_seed(int(i)) for i in batch["index"]]
    lr = lr_latents(pixels, trainer.family, gens)
    unit = trainer.family.pipe.vae_scale_factor * 2
    grid = (LR_RATIO, pixels.shape[2] // LR_RATIO // unit, pixels.shape[3] // LR_RATIO // unit)
    cond = dict(cond)
    cond["model_kwargs"] = {**cond.get("model_kwargs", {}), _LR_KEY: lr, "lr_grid": grid}
    return cond


RECIPE = Recipe(
    name="high-res",
    description="Scale-DiT LoRA bridge: Flux learns to use clean LR tokens (scaled anchors) under hilbert_local",
    data="image",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "x_embedder", "norm1.linear", "norm.linear",
                  "ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out"),
    attention=("hilbert_local", {"radius": 8, "lr_mode": "all"}),
    defaults={"resolution": 1024},
    prepare=prepare,
    condition=condition,
)
