"""A ``WanTransformer3DModel`` whose network predicts the clean video, for pixel-space tokens.

Flow-matching models are trained to output the velocity ``v = noise - x0``. To do that the network
must carry the noise of every input value through to its output, which is free when a token holds a
few values (a VAE latent patch) and hard when it holds about as many values as the model is wide:
``digits-video``'s pixel-space tokens are 4x4 pixels of 4 frames (64 values) in a 128-wide model.
Trained that way, its samples kept per-pixel noise that sampling sharpened into speckle. Li and He
("Back to Basics: Let Denoising Generative Models Denoise", 2025) show the same failure for pixel
transformers with large patches and its fix: let the network predict ``x0``, which lies on a
low-dimensional set, and turn the prediction into a velocity, ``v = (x_t - x0_hat) / sigma`` with
``sigma`` clamped from below, training on the usual velocity loss.

:class:`XPredictionWanTransformer3DModel` is that reparametrisation around stock Wan: its ``forward``
returns a velocity like Wan's, so ``WanPipeline``, its schedulers, diffattn's processors (radial
attention), context hooks and the trainer's Wan family (velocity target) run on it unchanged; only the
meaning of the last layer's output differs.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

# DiffusionPipeline.from_pretrained finds a component's load method by looking its base classes up
# by name in the component's module (model_index.json names this module): keep ModelMixin here
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

__all__ = ["XPredictionWanTransformer3DModel"]


class XPredictionWanTransformer3DModel(WanTransformer3DModel):
    """Stock Wan predicting ``x0``; ``forward`` returns the flow velocity ``(x_t - x0_hat) / max(sigma, min_sigma)``.

    ``sigma = timestep / num_train_timesteps`` (Wan's pipelines pass ``1000 * sigma``). ``min_sigma``
    bounds the division near the end of sampling, where the velocity of an exact ``x0`` would blow up
    (the paper clamps at 0.05). Every other argument is Wan's. Timesteps must be one per sample
    (``(batch,)``): the per-token timesteps of Wan 2.2's TI2V are not handled.
    """

    # Wan's whole signature, not *args / **kwargs: from_pretrained passes a config only the keys that
    # __init__'s signature names
    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        min_sigma: float = 0.05,
        num_train_timesteps: int = 1000,
    ) -> None:
        if not 0 < min_sigma <= 1:
            raise ValueError(f"min_sigma must be in (0, 1], got {min_sigma}")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if in_channels != out_channels:
            raise ValueError(
                f"x0 prediction outputs the input's channels: out_channels must equal in_channels={in_channels}, got {out_channels}"
            )
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        b = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.dim() != 1 or t.shape[0] != b:
            raise ValueError(
                f"timestep must be one value per sample, shape ({b},); got {tuple(t.shape)} "
                "(per-token timesteps, Wan 2.2 TI2V's expand_timesteps, are not supported)"
            )
        x0_hat = super().forward(
            hidden_states,
            timestep=t,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_image=encoder_hidden_states_image,
            return_dict=False,
            attention_kwargs=attention_kwargs,
        )[0]
        sigma = (t.float() / self.config.num_train_timesteps).clamp(min=self.config.min_sigma)
        velocity = (hidden_states.float() - x0_hat.float()) / sigma.view(
            -1, *([1] * (hidden_states.dim() - 1))
        )
        velocity = velocity.to(x0_hat.dtype)
        return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)
