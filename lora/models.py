"""What the trainer needs from each model family: encode captions and pixels, call the denoiser.

A :class:`Family` hides the differences between pipelines (SD's UNet takes ``encoder_hidden_states``,
Flux packs latents into 2x2 patches and takes timesteps in [0, 1], Wan normalises latents per
channel ...).  The trainer itself only sees latents, timesteps and a dict of conditioning tensors.

Supported now: ``sd`` (UNet2DConditionModel: SD 1.x/2.x, ControlNet pipelines' UNet), ``sdxl``,
``sd3``, ``flux`` and ``wan`` (text-to-video).  Others raise an error naming the supported ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn


class Family:
    """Base class; subclasses fill in the three model-specific steps."""

    name = "base"
    component = "unet"  # the pipeline attribute that holds the denoiser
    video = False

    def __init__(self, pipe: Any, max_sequence_length: int | None = None) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.component)

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _vae_scale(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (latents - shift) * cfg.scaling_factor

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents, sampling the VAE posterior with per-sample generators."""
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
        latents = dist.mean + dist.std * noise.to(dist.mean)
        return self._vae_scale(latents)

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        """Model output with the shape of ``noisy``; ``model`` may be the DDP/FSDP-wrapped denoiser."""
        raise NotImplementedError

    def validation_kwargs(self, height: int, width: int, num_frames: int | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"height": height, "width": width}
        if self.max_sequence_length is not None:
            kw["max_sequence_length"] = self.max_sequence_length
        if self.video and num_frames:
            kw["num_frames"] = num_frames
        return kw


class SDFamily(Family):
    name = "sd"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        emb, _ = self.pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": emb}

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return model(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


class SDXLFamily(Family):
    name = "sdxl"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        emb, _, pooled, _ = self.pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": emb, "text_embeds": pooled}

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        h, w = noisy.shape[-2] * self.pipe.vae_scale_factor, noisy.shape[-1] * self.pipe.vae_scale_factor
        # original size, crop top-left, target size: the image was resized and center-cropped to (h, w)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=noisy.device, dtype=noisy.dtype).repeat(len(noisy), 1)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return model(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]


class SD3Family(Family):
    name = "sd3"
    component = "transformer"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        emb, _, pooled, _ = self.pipe.encode_prompt(captions, None, None, device=device, do_classifier_free_guidance=False, **kw)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]


class FluxFamily(Family):
    name = "flux"
    component = "transformer"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        emb, pooled, text_ids = self.pipe.encode_prompt(captions, None, device=device, **kw)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled, "txt_ids": text_ids}

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        b, c, h, w = noisy.shape
        packed = self.pipe._pack_latents(noisy, b, c, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), 1.0, device=noisy.device, dtype=noisy.dtype)
        out = model(
            hidden_states=packed,
            timestep=timesteps / 1000,  # FluxPipeline passes sigmas, not 0-1000 timesteps
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=cond["txt_ids"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
        vsf = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, h * vsf, w * vsf, vsf)


class WanFamily(Family):
    name = "wan"
    component = "transformer"
    video = True

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        emb, _ = self.pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device, **kw)
        return {"encoder_hidden_states": emb}

    def _vae_scale(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(latents)
        std = torch.tensor(cfg.latents_std).view(shape).to(latents)
        return (latents - mean) / std  # the inverse of WanPipeline's decode

    def predict(self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        return model(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False
        )[0]


SUPPORTED = {"sd": SDFamily, "sdxl": SDXLFamily, "sd3": SD3Family, "flux": FluxFamily, "wan": WanFamily}


def family_for(pipe: Any, max_sequence_length: int | None = None) -> Family:
    """The :class:`Family` of a pipeline, from its denoiser's class."""
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    name = None
    if unet is not None and type(unet).__name__ == "UNet2DConditionModel":
        name = "sdxl" if unet.config.addition_embed_type == "text_time" else "sd"
    elif transformer is not None:
        cls = type(transformer).__name__
        name = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "WanTransformer3DModel": "wan"}.get(cls)
        if name == "wan" and (getattr(pipe, "transformer_2", None) is not None or transformer.config.image_dim):
            name = None  # Wan 2.2 (two experts) and image-to-video need their own conditioning
    if name is None:
        model = type(unet or transformer).__name__
        raise NotImplementedError(
            f"training {type(pipe).__name__} (denoiser {model}) is not supported yet; supported families: "
            f"{', '.join(SUPPORTED)} (SD/SDXL UNets, SD3, Flux, Wan text-to-video)"
        )
    return SUPPORTED[name](pipe, max_sequence_length)
