"""LaMambaDiffPipeline: sampling from a LaMamba-Diff model with any diffusers scheduler.

Class-conditional (``class_labels``) or text-conditional (``prompt``, with a text encoder and
tokenizer); classifier-free guidance on the noise prediction; latent space through an
``AutoencoderKL`` or pixel space when ``vae`` is None. Learned-sigma models (twice the channels out)
give their noise half to the scheduler, as diffusers' ``DiTPipeline`` does.
"""

from __future__ import annotations

import re
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from diffattn.models.lamamba import LaMambaDiffModel


def labels_from_prompts(prompts: list[str], num_classes: int, allow_null: bool = False) -> list[int]:
    """Class labels read from prompts: the first integer in each (``"3"``, ``"digit 3"``); an empty prompt
    is the null label ``num_classes`` when ``allow_null`` (classifier-free guidance dropout)."""
    labels = []
    for p in prompts:
        if allow_null and not p.strip():
            labels.append(num_classes)
            continue
        m = re.search(r"\d+", p)
        if m is None or int(m.group()) >= num_classes:
            raise ValueError(
                f"prompt {p!r} names no class label in [0, {num_classes}) (a class-conditional model reads "
                "the first integer of a prompt)"
            )
        labels.append(int(m.group()))
    return labels


class LaMambaDiffPipeline(DiffusionPipeline):
    """``pipe(class_labels=[1, 7], num_inference_steps=50, guidance_scale=4.0).images``

    Components: ``transformer`` (a :class:`~diffattn.models.LaMambaDiffModel`), ``scheduler`` (any
    diffusers scheduler), optional ``vae`` (``AutoencoderKL``; None = pixel space, the model's
    ``in_channels`` are image channels in [-1, 1]), optional ``text_encoder`` + ``tokenizer`` (for
    models with ``cross_attention_dim``).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        transformer: LaMambaDiffModel,
        scheduler: Any,
        vae: Any | None = None,
        text_encoder: Any | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
        )
        self.vae_scale_factor = (
            2 ** (len(self.vae.config.block_out_channels) - 1)
            if getattr(self, "vae", None) is not None
            else 1
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def encode_prompt(
        self, prompt: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text-encoder states and attention mask of ``prompt`` (a text-conditional model only)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("prompt needs a text_encoder and a tokenizer in the pipeline")
        tok = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = tok.attention_mask.to(device) if "attention_mask" in tok else None
        emb = self.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
        return emb.to(self.transformer.dtype), mask

    def _labels(self, class_labels: Any, device: torch.device) -> torch.Tensor:
        num_classes = self.transformer.config.num_classes
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class_labels must be in [0, {num_classes}), got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        model: LaMambaDiffModel = self.transformer
        cfg = model.config
        device = self._execution_device
        text_model = cfg.cross_attention_dim is not None
        class_model = cfg.num_classes > 0
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if text_model and prompt is None:
            raise ValueError("this LaMamba-Diff model is text-conditional: pass prompt")
        if prompt is not None and not text_model:
            if class_labels is not None:
                raise ValueError("pass class_labels or prompt to a class-conditional model, not both")
            class_labels = labels_from_prompts(
                [prompt] if isinstance(prompt, str) else list(prompt), cfg.num_classes
            )
        if class_model and class_labels is None and not text_model:
            raise ValueError(f"pass class_labels (ints in [0, {cfg.num_classes}))")
        do_cfg = guidance_scale > 1.0
        if do_cfg and class_model and cfg.class_dropout_prob <= 0 and not text_model:
            raise ValueError(
                "guidance_scale > 1 needs a null class label (class_dropout_prob > 0 in training)"
            )

        labels = self._labels(class_labels, device) if class_labels is not None else None
        text = text_mask = None
        if text_model:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch = len(prompts)
            if labels is not None and labels.numel() != batch:
                raise ValueError(f"class_labels ({labels.numel()}) and prompt ({batch}) lengths differ")
            text, text_mask = self.encode_prompt(prompts, device)
        else:
            batch = labels.numel() if labels is not None else 1
        if labels is not None:
            labels = labels.repeat_interleave(num_images_per_prompt)
        if text is not None:
            text = text.repeat_interleave(num_images_per_prompt, 0)
            text_mask = None if text_mask is None else text_mask.repeat_interleave(num_images_per_prompt, 0)
        batch *= num_images_per_prompt

        if do_cfg:
            if labels is not None:
                labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)])
            if text is not None:
                neg = negative_prompt if negative_prompt is not None else ""
                negs = [neg] * (batch // num_images_per_prompt) if isinstance(neg, str) else list(neg)
                neg_text, neg_mask = self.encode_prompt(negs, device)
                text = torch.cat([text, neg_text.repeat_interleave(num_images_per_prompt, 0)])
                if text_mask is not None:
                    text_mask = torch.cat([text_mask, neg_mask.repeat_interleave(num_images_per_prompt, 0)])

        s = self.vae_scale_factor
        height = height or cfg.sample_size * s
        width = width or cfg.sample_size * s
        if height % s or width % s:
            raise ValueError(
                f"height and width must be multiples of the VAE factor {s}, got {height}x{width}"
            )
        shape = (batch, cfg.in_channels, height // s, width // s)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=model.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = torch.cat([latents, latents]) if do_cfg else latents
            x_in = self.scheduler.scale_model_input(x_in, t)
            out = model(
                x_in,
                t.expand(x_in.shape[0]) if torch.is_tensor(t) else t,
                class_labels=labels,
                encoder_hidden_states=text,
                encoder_attention_mask=text_mask,
            ).sample
            if out.shape[1] == 2 * cfg.in_channels:  # learned sigma: the scheduler takes the noise half
                out = out[:, : cfg.in_channels]
            if do_cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(out, t, latents, generator=generator).prev_sample

        if self.vae is not None:
            scale = getattr(self.vae.config, "scaling_factor", 1.0)
            images = self.vae.decode(latents.to(self.vae.dtype) / scale).sample
        else:
            images = latents
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


# DiffusionPipeline.from_pretrained(folder) looks the pipeline class up in the diffusers namespace;
# importing diffattn.pipelines makes a saved LaMambaDiffPipeline folder load that generic way too.
if not hasattr(diffusers, "LaMambaDiffPipeline"):
    setattr(diffusers, "LaMambaDiffPipeline", LaMambaDiffPipeline)  # noqa: B010

__all__ = ["LaMambaDiffPipeline", "labels_from_prompts"]
