"""What the trainer needs from each model family: encode captions and pixels, call the denoiser.

A :class:`Family` hides the differences between pipelines (SD's UNet takes ``encoder_hidden_states``,
Flux packs latents into 2x2 patches and takes timesteps in [0, 1], Wan normalises latents per
channel ...).  The trainer itself only sees latents, timesteps and a dict of conditioning tensors.

Supported now: ``sd`` (UNet2DConditionModel: SD 1.x/2.x, ControlNet pipelines' UNet), ``sdxl``,
``sd3``, ``flux``, ``wan`` (text-to-video), ``wan-i2v`` (2.1 image-to-video), ``wan22`` (one expert
per run), ``hunyuan-video``, ``cogvideox``, ``mochi`` and ``lamamba`` (LaMamba-Diff, full training).  Others (Wan 2.2 image-to-video; PixArt,
which has no LoRA loader in diffusers) raise an error naming the supported ones.
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
    # the part of the noise schedule this denoiser serves, as fractions of num_train_timesteps
    t_range: tuple[float, float] = (0.0, 1.0)

    @property
    def lora_component(self) -> str:
        """The ``*_lora_layers`` name the LoRA is saved under (diffusers' loaders know no other)."""
        return self.component

    def __init__(self, pipe: Any, text_kwargs: dict[str, Any] | None = None) -> None:
        self.pipe = pipe
        # prompt-encoding options shared by training and validation (max_sequence_length, prompt_template)
        self.text_kwargs = dict(text_kwargs or {})

    @property
    def max_sequence_length(self) -> int | None:
        return self.text_kwargs.get("max_sequence_length")

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

    @torch.no_grad()
    def condition_on_pixels(self, pixels: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        """Add what the model reads from the sample itself (image-to-video: its first frame) to ``cond``."""
        return cond

    def validation_extra(self, dataset: Any) -> dict[str, Any]:
        """Pipeline-call inputs a validation sample needs besides the prompt (image-to-video: an image)."""
        return {}

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        """Model output with the shape of ``noisy``; ``model`` may be the DDP/FSDP-wrapped denoiser.

        ``cond["model_kwargs"]`` (set by a recipe's ``condition`` hook) is passed on to the model call.
        """
        raise NotImplementedError

    def validation_kwargs(self, height: int, width: int, num_frames: int | None) -> dict[str, Any]:
        kw: dict[str, Any] = {"height": height, "width": width, **self.text_kwargs}
        if self.video and num_frames:
            kw["num_frames"] = num_frames
        return kw


class SDFamily(Family):
    name = "sd"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        emb, _ = self.pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": emb}

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        return model(
            noisy,
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
            **cond.get("model_kwargs", {}),
        )[0]


class SDXLFamily(Family):
    name = "sdxl"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        emb, _, pooled, _ = self.pipe.encode_prompt(
            captions, device=device, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": emb, "text_embeds": pooled}

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        h, w = noisy.shape[-2] * self.pipe.vae_scale_factor, noisy.shape[-1] * self.pipe.vae_scale_factor
        # original size, crop top-left, target size: the image was resized and center-cropped to (h, w)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=noisy.device, dtype=noisy.dtype).repeat(
            len(noisy), 1
        )
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return model(
            noisy,
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
            **cond.get("model_kwargs", {}),
        )[0]


class SD3Family(Family):
    name = "sd3"
    component = "transformer"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        emb, _, pooled, _ = self.pipe.encode_prompt(
            captions, None, None, device=device, do_classifier_free_guidance=False, **kw
        )
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        return model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
            **cond.get("model_kwargs", {}),
        )[0]


class FluxFamily(Family):
    name = "flux"
    component = "transformer"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        emb, pooled, text_ids = self.pipe.encode_prompt(captions, None, device=device, **kw)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled, "txt_ids": text_ids}

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
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
            **cond.get("model_kwargs", {}),
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

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        return model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
            **cond.get("model_kwargs", {}),
        )[0]


def _first_frames_pil(pixels: torch.Tensor) -> list[Any]:
    from PIL import Image

    arr = ((pixels[:, :, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


class WanI2VFamily(WanFamily):
    """Wan 2.1 image-to-video: the first frame conditions every sample, as ``WanImageToVideoPipeline`` does.

    The condition is the VAE latent of ``[first frame, zeros...]`` with a 4-channel mask marking the
    first latent frame, concatenated to the noisy latents along channels (16 + 4 + 16 = 36 input
    channels), plus the CLIP image embedding (the image encoder's penultimate hidden states) for
    cross-attention when the transformer has an image embedder.
    """

    name = "wan-i2v"

    @torch.no_grad()
    def condition_on_pixels(self, pixels: torch.Tensor, cond: dict[str, Any]) -> dict[str, Any]:
        pipe, vae = self.pipe, self.pipe.vae
        video = torch.cat([pixels[:, :, :1], torch.zeros_like(pixels[:, :, 1:])], dim=2)
        # the pipeline encodes the condition with the posterior mode ("argmax"), not a sample
        latent = self._vae_scale(vae.encode(video.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode())
        b, _, n, h, w = latent.shape
        mask = torch.zeros(b, pipe.vae_scale_factor_temporal, n, h, w, device=latent.device, dtype=latent.dtype)
        mask[:, :, 0] = 1.0
        cond = {**cond, "i2v_condition": torch.cat([mask, latent], dim=1)}
        if self.denoiser.config.image_dim is not None:
            cond["image_embeds"] = pipe.encode_image(_first_frames_pil(pixels), latent.device)
        return cond

    def validation_extra(self, dataset: Any) -> dict[str, Any]:
        return {"image": _first_frames_pil(dataset.load(0, None)["pixels"][None])[0]}

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        extra = {"encoder_hidden_states_image": cond["image_embeds"].to(noisy)} if "image_embeds" in cond else {}
        return model(
            hidden_states=torch.cat([noisy, cond["i2v_condition"].to(noisy)], dim=1),
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            return_dict=False,
            **extra,
            **cond.get("model_kwargs", {}),
        )[0]


class Wan22Family(WanFamily):
    """Wan 2.2: two experts split the schedule at ``boundary_ratio``; a run trains one of them.

    ``high`` is ``transformer`` (t >= boundary), ``low`` is ``transformer_2``.  Both save as
    ``transformer`` LoRA layers, as diffusers expects: load a ``low`` LoRA with
    ``pipe.load_lora_weights(path, load_into_transformer_2=True)``.
    """

    name = "wan22"

    def __init__(
        self, pipe: Any, text_kwargs: dict[str, Any] | None = None, expert: str | None = None
    ) -> None:
        super().__init__(pipe, text_kwargs)
        boundary = pipe.config.boundary_ratio
        if expert not in ("high", "low"):
            raise ValueError(
                f"--expert: {type(pipe).__name__} has two experts, 'high' (transformer, t >= {boundary} of the "
                f"schedule) and 'low' (transformer_2, below); pass --expert high or --expert low (got {expert!r})"
            )
        self.expert = expert
        self.component = "transformer" if expert == "high" else "transformer_2"
        self.t_range = (boundary, 1.0) if expert == "high" else (0.0, boundary)

    @property
    def lora_component(self) -> str:
        return "transformer"


class HunyuanVideoFamily(Family):
    name = "hunyuan-video"
    component = "transformer"
    video = True

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        emb, pooled, mask = self.pipe.encode_prompt(captions, None, device=device, **self.text_kwargs)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled, "encoder_attention_mask": mask}

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        guidance = None
        if getattr(self.denoiser.config, "guidance_embeds", False):
            # distilled guidance at scale 1 (the pipeline passes scale x 1000)
            guidance = torch.full((len(noisy),), 1000.0, device=noisy.device, dtype=noisy.dtype)
        return model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            pooled_projections=cond["pooled_projections"],
            guidance=guidance,
            return_dict=False,
            **cond.get("model_kwargs", {}),
        )[0]


class CogVideoXFamily(Family):
    name = "cogvideox"
    component = "transformer"
    video = True

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        emb, _ = self.pipe.encode_prompt(captions, do_classifier_free_guidance=False, device=device, **kw)
        return {"encoder_hidden_states": emb}

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        x = noisy.permute(0, 2, 1, 3, 4)  # CogVideoX takes (B, F, C, H, W)
        rotary = None
        if self.denoiser.config.use_rotary_positional_embeddings:
            vsf = self.pipe.vae_scale_factor_spatial
            rotary = self.pipe._prepare_rotary_positional_embeddings(
                x.shape[-2] * vsf, x.shape[-1] * vsf, x.shape[1], x.device
            )
        out = model(
            hidden_states=x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timesteps,
            image_rotary_emb=rotary,
            return_dict=False,
            **cond.get("model_kwargs", {}),
        )[0]
        return out.permute(0, 2, 1, 3, 4)


class MochiFamily(Family):
    """With ``invert_sigmas`` in its scheduler config (genmo's release) Mochi counts time the other way:
    the model sees ``1000 - t`` and predicts ``x0 - noise``; both are flipped here to fit the flow
    objective.  Without it (the zoo's scheduler) the convention is the usual one."""

    name = "mochi"
    component = "transformer"
    video = True

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        kw = {"max_sequence_length": self.max_sequence_length} if self.max_sequence_length else {}
        emb, mask, _, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, device=device, **kw
        )
        return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}

    def _vae_scale(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        c = latents.shape[1]
        mean = torch.tensor(cfg.latents_mean).view(1, c, 1, 1, 1).to(latents)
        std = torch.tensor(cfg.latents_std).view(1, c, 1, 1, 1).to(latents)
        return (latents - mean) * cfg.scaling_factor / std  # the inverse of MochiPipeline's decode

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        inverted = bool(self.pipe.scheduler.config.get("invert_sigmas", False))
        out = model(
            hidden_states=noisy,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=1000 - timesteps if inverted else timesteps,
            encoder_attention_mask=cond["encoder_attention_mask"],
            return_dict=False,
            **cond.get("model_kwargs", {}),
        )[0]
        return -out if inverted else out


class LaMambaFamily(Family):
    """A :class:`~diffattn.pipelines.LaMambaDiffPipeline` with its ``LaMambaDiffModel``."""

    name = "lamamba"
    component = "transformer"

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        cfg = self.denoiser.config
        cond: dict[str, Any] = {}
        if cfg.cross_attention_dim is not None:
            emb, mask = self.pipe.encode_prompt(list(captions), device)
            cond["encoder_hidden_states"] = emb
            if mask is not None:
                cond["encoder_attention_mask"] = mask
        elif cfg.num_classes > 0:
            from diffattn.pipelines.lamamba_diff import labels_from_prompts

            labels = labels_from_prompts(
                list(captions), cfg.num_classes, allow_null=cfg.class_dropout_prob > 0
            )
            cond["class_labels"] = torch.tensor(labels, device=device, dtype=torch.long)
        return cond

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        if self.pipe.vae is None:  # pixel space
            return pixels.to(self.denoiser.device)
        return super().encode_pixels(pixels, generators)

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, Any]
    ) -> torch.Tensor:
        kwargs = {k: v for k, v in cond.items() if k != "model_kwargs"}
        out = model(noisy, timesteps, return_dict=False, **kwargs, **cond.get("model_kwargs", {}))[0]
        return out[:, : noisy.shape[1]]  # learned sigma: the noise (or velocity) half

    def validation_kwargs(self, height: int, width: int, num_frames: int | None) -> dict[str, Any]:
        return {"height": height, "width": width, "guidance_scale": 1.0}


SUPPORTED = {
    "sd": SDFamily,
    "sdxl": SDXLFamily,
    "sd3": SD3Family,
    "flux": FluxFamily,
    "wan": WanFamily,
    "wan-i2v": WanI2VFamily,
    "hunyuan-video": HunyuanVideoFamily,
    "cogvideox": CogVideoXFamily,
    "mochi": MochiFamily,
    "lamamba": LaMambaFamily,
}
_TRANSFORMERS = {
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuan-video",
    "CogVideoXTransformer3DModel": "cogvideox",
    "MochiTransformer3DModel": "mochi",
    "LaMambaDiffModel": "lamamba",
}


def family_for(pipe: Any, text_kwargs: dict[str, Any] | None = None, expert: str | None = None) -> Family:
    """The :class:`Family` of a pipeline, from its denoiser's class; ``expert`` picks a Wan 2.2 expert."""
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    name = None
    if unet is not None and type(unet).__name__ == "UNet2DConditionModel":
        name = "sdxl" if unet.config.addition_embed_type == "text_time" else "sd"
    elif transformer is not None:
        # by the first known class in the MRO: a subclass of a supported denoiser trains like it
        name = next((_TRANSFORMERS[c.__name__] for c in type(transformer).__mro__ if c.__name__ in _TRANSFORMERS), None)
        if name == "wan" and type(pipe).__name__ == "WanImageToVideoPipeline":
            # Wan 2.1 I2V; Wan 2.2's two-expert I2V and its 5B TI2V (expand_timesteps) are not handled
            two = getattr(pipe, "transformer_2", None) is not None or pipe.config.expand_timesteps
            name = None if two else "wan-i2v"
        elif name == "wan" and getattr(pipe, "transformer_2", None) is not None:
            return Wan22Family(pipe, text_kwargs, expert)
    if name is None:
        model = type(unet or transformer).__name__
        raise NotImplementedError(
            f"training {type(pipe).__name__} (denoiser {model}) is not supported yet; supported families: "
            f"{', '.join(SUPPORTED)}, wan22"
        )
    if expert is not None:
        raise ValueError(
            f"--expert applies to two-expert models (Wan 2.2); {type(pipe).__name__} has one denoiser"
        )
    return SUPPORTED[name](pipe, text_kwargs)
