"""Testbed diffusion models: their definitions, the registry of names, saving and loading.

Both are stock diffusers pipelines in pixel space (32x32 RGB), so every processor, scheduler and the
trainer's SD / Flux code paths apply unchanged:

=============  ======================================================================================
name           what it is
=============  ======================================================================================
digits-unet    ``StableDiffusionPipeline``: class-conditional ``UNet2DConditionModel`` (1.0 M; self- and
               cross-attention at 16x16 and 8x8 plus the mid block; captions ``"a 3"`` through a
               tiny frozen CLIP text encoder), ``DDIMScheduler`` (cosine betas, v-prediction) — the
               Stable Diffusion stand-in.
digits-dit     ``FluxPipeline``: tiny ``FluxTransformer2DModel`` (0.5 M; 2 double + 2 single blocks, rotary
               positions, joint text/image attention: 2x2-packed pixels -> 16x16 tokens at 32 px;
               runs at other sizes), tiny frozen CLIP + T5, ``FlowMatchEulerDiscreteScheduler`` —
               the DiT stand-in.
=============  ======================================================================================

(``digits-video`` is a tiny ``WanPipeline`` on moving-digit clips, see :func:`build_digits_video`.)
``digits-lamamba`` is this project's ``LaMambaDiffPipeline`` (class-conditional ``LaMambaDiffModel``:
window attention + Mamba, no dense attention, so attention processors do not apply to it; no text
encoder and no autoencoder: prompts ``"a 3"`` name the class, ``vae`` is None), see
:func:`build_digits_lamamba`.

The autoencoder of the stock ones is :class:`PixelSpaceVAE`, the identity: latents are the pixels in
``[-1, 1]`` (``scaling_factor`` 1, ``shift_factor`` 0, ``vae_scale_factor`` 1). Text encoders are
random, frozen and deterministic: distinct captions give distinct embeddings, and only the denoiser
trains. Use classifier-free guidance (train with caption dropout to ``""``).

:func:`build` gives the untrained pipeline (the trainer's starting point); :func:`save` writes a
pipeline folder atomically with a ``testbed.json`` (name, default call, captions); :func:`load` /
:func:`load_folder` read one back and name the missing file or wrong class when a folder is broken.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from transformers import CLIPTextModel, T5EncoderModel, UMT5Config, UMT5EncoderModel

from ..io import atomic_path
from .data import NUM_CLASSES, caption_for

# imported here, not lazily: from_pretrained loads digits-video's denoiser only from an imported module
from .xpred_wan import XPredictionWanTransformer3DModel

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TESTBED_FILE = "testbed.json"
TEXT_LENGTH = 16  # tokens per caption ("a 3, a 7 and a 1" is 11 CLIP tokens with BOS/EOS)


class PixelSpaceVAE(AutoencoderKL):
    """The identity autoencoder: lets stock latent pipelines (SD, Flux) run in pixel space.

    An ``AutoencoderKL`` by type (the type SD and Flux pipelines declare for ``vae``, so they build it
    without a warning) that builds none of its layers.

    ``encode(x).latent_dist`` is a deterministic distribution at ``x`` and ``decode(z).sample`` is ``z``;
    the config carries what pipelines read (``block_out_channels`` of length 1 -> ``vae_scale_factor``
    1, ``latent_channels``, ``scaling_factor`` 1, ``shift_factor`` 0).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 3,
        block_out_channels: tuple[int, ...] = (3,),
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        sample_size: int = 32,
        force_upcast: bool = False,
    ) -> None:
        ModelMixin.__init__(self)  # not AutoencoderKL's: no encoder or decoder
        if in_channels != latent_channels:
            raise ValueError(f"identity VAE needs in_channels == latent_channels, got {in_channels}, {latent_channels}")
        # one scalar so .dtype / .device / save_pretrained behave like any other model
        self.register_buffer("anchor", torch.zeros(()), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        dist = DiagonalGaussianDistribution(torch.cat([x, torch.zeros_like(x)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> DecoderOutput | tuple:
        return DecoderOutput(sample=z) if return_dict else (z,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        return self.decode(sample, return_dict=return_dict)


class PixelSpaceVideoVAE(AutoencoderKLWan):
    """A lossless "video autoencoder" in pixel space with Wan's causal time layout, for ``WanPipeline``.

    An ``AutoencoderKLWan`` by type (what ``WanPipeline`` declares for ``vae``) that builds none of its layers.

    Like Wan's VAE, frame 0 is a latent frame of its own and every following group of
    ``scale_factor_temporal`` frames is one latent frame; the group's frames are stacked along channels
    instead of being compressed, so ``z_dim = in_channels * scale_factor_temporal`` and ``decode``
    inverts ``encode`` exactly (frame 0 is stored ``scale_factor_temporal`` times; decoding averages the
    copies). Space is untouched (``scale_factor_spatial`` 1); ``latents_mean`` 0 / ``latents_std`` 1,
    so the pipeline's latent normalisation is the identity. Videos need ``1 + k * scale_factor_temporal``
    frames, which ``WanPipeline`` already enforces. With ``latent_channels=1`` a frame is stored as the
    mean of its channels and decoded to ``in_channels`` equal channels: lossless on grey videos (the
    moving digits), with a third of the latent values.
    """

    # nothing to tile or slice in pixel space: AutoencoderKLWan's switches would reach for layers this class
    # never builds (long_video_decoding then says it leaves the VAE unchanged)
    enable_tiling = None
    disable_tiling = None
    enable_slicing = None
    disable_slicing = None

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        scale_factor_temporal: int = 4,
        scale_factor_spatial: int = 1,
        z_dim: int = 12,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        latent_channels: int | None = None,
    ) -> None:
        ModelMixin.__init__(self)  # not AutoencoderKLWan's: no encoder or decoder
        if scale_factor_spatial != 1:
            raise ValueError(f"PixelSpaceVideoVAE works in pixel space: scale_factor_spatial must be 1, got {scale_factor_spatial}")
        lc = in_channels if latent_channels is None else latent_channels
        if lc not in (1, in_channels):
            raise ValueError(f"latent_channels must be 1 (grey) or in_channels={in_channels}, got {latent_channels}")
        if z_dim != lc * scale_factor_temporal:
            raise ValueError(
                f"z_dim must be latent_channels * scale_factor_temporal = {lc * scale_factor_temporal}, got {z_dim}"
            )
        self.register_to_config(latent_channels=lc)
        if latents_mean is None or latents_std is None:  # what the pipeline reads; stored in the config
            self.register_to_config(latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)
        self.register_buffer("anchor", torch.zeros(()), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        r, c = self.config.scale_factor_temporal, self.config.in_channels
        if x.dim() != 5 or x.shape[1] != c:
            raise ValueError(f"expected a video (batch, {c}, frames, height, width), got {tuple(x.shape)}")
        b, _, t, h, w = x.shape
        if (t - 1) % r:
            raise ValueError(f"the video has {t} frames; PixelSpaceVideoVAE needs 1 + k * {r} frames")
        if self.config.latent_channels != c:
            x, c = x.mean(dim=1, keepdim=True), 1
        groups = torch.cat([x[:, :, :1].expand(-1, -1, r, -1, -1), x[:, :, 1:]], dim=2)
        z = groups.reshape(b, c, -1, r, h, w).permute(0, 3, 1, 2, 4, 5).reshape(b, r * c, -1, h, w)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> DecoderOutput | tuple:
        r, c = self.config.scale_factor_temporal, self.config.latent_channels
        if z.dim() != 5 or z.shape[1] != r * c:
            raise ValueError(f"expected latents (batch, {r * c}, latent_frames, height, width), got {tuple(z.shape)}")
        b, _, n, h, w = z.shape
        groups = z.reshape(b, r, c, n, h, w).permute(0, 2, 3, 1, 4, 5)  # (b, c, n, r, h, w)
        first = groups[:, :, :1].mean(dim=3)  # the r copies of frame 0
        video = torch.cat([first, groups[:, :, 1:].reshape(b, c, (n - 1) * r, h, w)], dim=2)
        if c != self.config.in_channels:
            video = video.expand(-1, self.config.in_channels, -1, -1, -1).contiguous()
        return DecoderOutput(sample=video) if return_dict else (video,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)


# --------------------------------------------------------------------------------------------------
# Builders (random weights, deterministic given the seed)
# --------------------------------------------------------------------------------------------------


def _seed(seed: int, k: int) -> None:
    torch.manual_seed(seed * 1000 + k)  # a distinct stream per component


def _clip(seed: int) -> tuple[Any, CLIPTextModel]:
    from ..zoo import tiny_clip_config, tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(model_max_length=TEXT_LENGTH)
    _seed(seed, 1)
    return tok, CLIPTextModel(tiny_clip_config(tok, hidden=32, projection_dim=32)).eval().requires_grad_(False)


def _t5(seed: int) -> tuple[Any, T5EncoderModel]:
    from ..zoo import tiny_t5_config, tiny_t5_tokenizer

    tok = tiny_t5_tokenizer(model_max_length=TEXT_LENGTH)
    _seed(seed, 2)
    return tok, T5EncoderModel(tiny_t5_config(tok, d_model=32)).eval().requires_grad_(False)


def build_digits_unet(
    seed: int = 0, block_out_channels: tuple[int, ...] = (16, 32, 64), heads: tuple[int, ...] = (1, 2, 4)
) -> StableDiffusionPipeline:
    """Untrained ``digits-unet``: pixel-space class-conditional UNet2DConditionModel (~1.0 M parameters).

    The default width is sized for the issue's budget (retraining in <= 30 min on 2 CPU cores: a
    batch-32 training step is well under a second); ``block_out_channels`` / ``heads`` scale it.
    """
    tok, text_encoder = _clip(seed)
    _seed(seed, 0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        # attention at 16x16 (256 tokens) and 8x8 plus the mid block; the 32x32 level has none, like
        # SDXL's first level, which keeps CPU training within its budget
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=tuple(heads),  # diffusers naming quirk: the number of heads (head dim 16)
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",  # cosine: the usual choice for small pixel-space images
        # v: well conditioned at the cosine schedule's near-zero SNR end, where epsilon is not (and
        # StableDiffusionPipeline forces clip_sample off, so x0 clipping cannot rescue epsilon)
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="trailing",  # sampling starts at t=999, the noise level training ends at
    )
    return StableDiffusionPipeline(
        vae=PixelSpaceVAE(),
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_digits_dit(
    seed: int = 0, num_layers: int = 2, num_single_layers: int = 2, heads: int = 4
) -> FluxPipeline:
    """Untrained ``digits-dit``: tiny pixel-space FluxTransformer2DModel (~0.5 M parameters, width 64).

    Sized like ``digits-unet`` for CPU retraining; ``num_layers`` (double-stream blocks),
    ``num_single_layers`` and ``heads`` (of dim 16) scale it.
    """
    tok, text_encoder = _clip(seed)
    tok_2, text_encoder_2 = _t5(seed)
    _seed(seed, 0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=12,  # 3 pixel channels packed 2x2 by the pipeline
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size
        guidance_embeds=False,  # real classifier-free guidance (true_cfg_scale), not distilled
        axes_dims_rope=(4, 6, 6),  # (text/frame, row, column); sums to the head dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=PixelSpaceVAE(),
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        transformer=transformer,
    )


def build_digits_video(
    seed: int = 0,
    num_layers: int = 4,
    heads: int = 8,
    patch: int = 4,
    flow_shift: float = 3.0,
    head_dim: int = 16,
    grey: bool = True,
    x_prediction: bool = True,
) -> WanPipeline:
    """Untrained ``digits-video``: a tiny pixel-space ``WanTransformer3DModel`` (~1.2 M parameters).

    Frames are 32x32 (a 16 px digit, 2x the scikit-learn 8x8, moving on them); a grey
    :class:`PixelSpaceVideoVAE` stacks 4 frames per latent frame (29 frames -> 8 latent frames of 4
    channels) and 4x4 patches give 64 tokens per latent frame, so a token carries 4 x 4 x 4 = 64 values
    into width 128 (a stock Wan, predicting the velocity, must pass that much noise through; the
    width has to exceed it). A batch-16 training step takes about a second on one CPU thread.
    ``num_layers``, ``heads`` (of dim 16), ``patch``, ``flow_shift`` (UniPC's, and the training
    timesteps') and ``grey`` (RGB latents: 3x the values) scale it. ``x_prediction`` (default) makes
    the denoiser a :class:`~diffattn.testbed.xpred_wan.XPredictionWanTransformer3DModel`: stock Wan
    whose network predicts the clean video and returns its velocity, without which a model this narrow
    leaves its tokens' noise in the samples.
    """
    from ..zoo import tiny_t5_config, tiny_t5_tokenizer

    tok = tiny_t5_tokenizer(model_max_length=TEXT_LENGTH)
    _seed(seed, 2)
    text_encoder = UMT5EncoderModel(tiny_t5_config(tok, d_model=32, cls=UMT5Config)).eval().requires_grad_(False)
    vae = PixelSpaceVideoVAE(z_dim=4, latent_channels=1) if grey else PixelSpaceVideoVAE()
    _seed(seed, 0)
    transformer = (XPredictionWanTransformer3DModel if x_prediction else WanTransformer3DModel)(
        patch_size=(1, patch, patch),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=vae.config.z_dim,
        out_channels=vae.config.z_dim,
        text_dim=32,
        freq_dim=64,
        ffn_dim=4 * heads * head_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )
    # Wan's own sampler: UniPC on flow sigmas with a shift of 3
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    return WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer)


# digits-lamamba's LaMambaDiffModel config. Sized for the 30-min / 2-core budget from a profile of one
# batch-32 training step on one thread: the SS2D expansion (ssm_ratio 2 -> 1) and the decoder's extra
# block per stage (1 -> 0) were most of the time (1.84 s -> 0.48 s per step at patch 2; 4.0 M -> 2.5 M
# parameters). Patch 4 with 3 stages at width 64 costs about 0.6x that: the digits are 8x8 images
# upscaled to 32x32, so a 4x4 patch is one source pixel; the width must stay >= 48 (= 4 * 4 * 3 patch
# values), or the model cannot carry per-pixel noise and its samples stay noisy (width 32 did).
LAMAMBA_MODEL: dict[str, Any] = dict(
    sample_size=32,
    in_channels=3,
    learn_sigma=False,
    patch_size=4,
    embed_dim=64,  # stage widths 64, 128, 128 at 8x8, 4x4, 4x4 tokens
    num_heads=4,
    depths=(1, 1, 1),
    bottleneck_depth=1,
    decoder_extra_blocks=0,
    window_size=4,  # 4x4 windows on the 8x8 grid: local, never global attention
    ssm_ratio=1.0,
    num_classes=10,
    class_dropout_prob=0.1,  # the null label for classifier-free guidance
)


def build_digits_lamamba(seed: int = 0, **model_options: Any) -> DiffusionPipeline:
    """Untrained ``digits-lamamba``: a class-conditional pixel-space LaMamba-Diff U-Net (~2.5 M parameters).

    No text encoder and no autoencoder (``vae=None``: pixel space); prompts ``"a 3"`` name the class
    (the pipeline reads the first integer). The digits-unet's cosine v-prediction DDIM scheduler.
    ``model_options`` override :data:`LAMAMBA_MODEL` (``embed_dim``, ``depths`` ...).
    """
    from ..models import LaMambaDiffModel
    from ..pipelines import LaMambaDiffPipeline

    _seed(seed, 0)
    model = LaMambaDiffModel(**{**LAMAMBA_MODEL, **model_options})
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="trailing",
    )
    return LaMambaDiffPipeline(transformer=model, scheduler=scheduler, vae=None)


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedModel:
    """A testbed model: how to build it untrained, and how to call it.

    Attributes:
        name: registry name (also the folder name under ``diffattn/testbed/weights``).
        pipeline_class: the diffusers pipeline class its folder must hold.
        denoiser: the denoiser component and its class (or the classes it may be).
        build: ``(seed, **options) -> pipeline`` with random weights.
        call_kwargs: default generation keywords (25 steps, guidance); ``prompt`` / ``generator`` excluded.
        num_classes: digit classes (captions ``caption_for(label)``); 0 for models without classes.
    """

    __test__ = False  # not a pytest test class despite the name

    name: str
    description: str
    pipeline_class: str
    denoiser: tuple[str, str | tuple[str, ...]]
    build: Callable[..., DiffusionPipeline]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = NUM_CLASSES

    def captions(self) -> list[str]:
        return [caption_for(c) for c in range(self.num_classes)]


_IMAGE_CALL = {"height": 32, "width": 32, "num_inference_steps": 25, "output_type": "np"}

MODELS: dict[str, TestbedModel] = {
    m.name: m
    for m in (
        TestbedModel(
            name="digits-unet",
            description="class-conditional pixel-space UNet2DConditionModel on 32x32 digits (SD stand-in)",
            pipeline_class="StableDiffusionPipeline",
            denoiser=("unet", "UNet2DConditionModel"),
            build=build_digits_unet,
            call_kwargs={**_IMAGE_CALL, "guidance_scale": 3.0},
        ),
        TestbedModel(
            name="digits-dit",
            description="class-conditional tiny pixel-space FluxTransformer2DModel on 32x32 digits (DiT stand-in)",
            pipeline_class="FluxPipeline",
            denoiser=("transformer", "FluxTransformer2DModel"),
            build=build_digits_dit,
            call_kwargs={**_IMAGE_CALL, "true_cfg_scale": 3.0, "negative_prompt": "", "max_sequence_length": TEXT_LENGTH},
        ),
        TestbedModel(
            name="digits-video",
            description="class-conditional tiny pixel-space WanTransformer3DModel on 32x32 moving-digit clips, 29 frames",
            pipeline_class="WanPipeline",
            # build_digits_video(x_prediction=False) gives the stock class
            denoiser=("transformer", ("XPredictionWanTransformer3DModel", "WanTransformer3DModel")),
            build=build_digits_video,
            call_kwargs={
                **_IMAGE_CALL,
                "height": 32,
                "width": 32,
                "num_frames": 29,  # 8 latent frames
                "guidance_scale": 3.0,
                "negative_prompt": "",
                "max_sequence_length": TEXT_LENGTH,
            },
        ),
        TestbedModel(
            name="digits-lamamba",
            description="class-conditional pixel-space LaMamba-Diff U-Net on 32x32 digits (window attention + Mamba, no dense attention)",
            pipeline_class="LaMambaDiffPipeline",
            denoiser=("transformer", "LaMambaDiffModel"),
            build=build_digits_lamamba,
            call_kwargs={**_IMAGE_CALL, "guidance_scale": 3.0},
        ),
    )
}


def names() -> list[str]:
    """Names of the testbed models."""
    return list(MODELS)


def get(name: str) -> TestbedModel:
    """The registry entry for ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    if name not in MODELS:
        raise ValueError(f"unknown testbed model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name]


def build(name: str, seed: int = 0, **options: Any) -> DiffusionPipeline:
    """The untrained pipeline ``name`` (random weights from ``seed``; global RNG state untouched).

    ``options`` go to the builder (e.g. ``block_out_channels`` for ``digits-unet``).
    """
    spec = get(name)
    with torch.random.fork_rng(devices=[]):
        pipe = spec.build(seed, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_call_kwargs(name: str) -> dict[str, Any]:
    """A fresh copy of the default generation keywords of ``name`` (no prompt, no generator)."""
    return dict(get(name).call_kwargs)


def prompt_kwargs(call_kwargs: dict[str, Any], prompts: list[str], generators: list[torch.Generator]) -> dict[str, Any]:
    """``call_kwargs`` for a batch: the prompts, one generator per sample, and a negative prompt per
    prompt (pipelines want ``negative_prompt`` to match ``prompt`` in type and length)."""
    kw = dict(call_kwargs)
    kw["prompt"], kw["generator"] = list(prompts), list(generators)
    if isinstance(kw.get("negative_prompt"), str):
        kw["negative_prompt"] = [kw["negative_prompt"]] * len(prompts)
    return kw


def weights_dir(name: str) -> Path:
    """Where the shipped folder of ``name`` lives inside the package."""
    return WEIGHTS_DIR / get(name).name


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------


def save(
    pipe: DiffusionPipeline,
    out_dir: str | os.PathLike,
    name: str,
    extra: dict[str, Any] | None = None,
    files: dict[str, str | os.PathLike] | None = None,
) -> Path:
    """Write ``pipe`` as a diffusers folder plus ``testbed.json``, under a temp name then renamed.

    ``files`` (``{name in the folder: source path}``) are copied in before the rename (a loss log ...).
    """
    spec = get(name)
    if type(pipe).__name__ != spec.pipeline_class:
        raise ValueError(f"{name} is a {spec.pipeline_class}, got a {type(pipe).__name__}")
    out = Path(out_dir)
    with atomic_path(out, directory=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        info = {
            "name": spec.name,
            "pipeline_class": spec.pipeline_class,
            "call_kwargs": spec.call_kwargs,
            "captions": spec.captions(),
            **(extra or {}),
        }
        (tmp / TESTBED_FILE).write_text(json.dumps(info, indent=2) + "\n")
        for dest, src in (files or {}).items():
            shutil.copyfile(src, tmp / dest)
    return out


def read_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``testbed.json`` of a pipeline folder, or ``None`` for folders that are not testbed models."""
    path = Path(folder) / TESTBED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_folder(folder: str | os.PathLike, name: str | None = None) -> None:
    """Raise naming the missing file or the wrong class when ``folder`` is not a loadable pipeline.

    With ``name`` (or a ``testbed.json`` in the folder) the pipeline and denoiser classes are checked
    against that testbed model.
    """
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing: not a diffusers pipeline folder")
    model_index = json.loads(index.read_text())
    if name is None:
        info = read_info(folder)
        name = info.get("name") if info else None
    spec = get(name) if name is not None else None
    if spec is not None and model_index.get("_class_name") != spec.pipeline_class:
        raise ValueError(f"{index} holds a {model_index.get('_class_name')!r}; {spec.name} expects {spec.pipeline_class!r}")
    for comp, entry in model_index.items():
        if comp.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        sub = folder / comp
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub} is missing ({entry[1]} from {entry[0]})")
        if entry[1].endswith("Tokenizer") or entry[1].endswith("TokenizerFast"):
            continue
        cfg_name = "scheduler_config.json" if "Scheduler" in entry[1] else "config.json"
        if not (sub / cfg_name).is_file():
            raise FileNotFoundError(f"{sub / cfg_name} is missing (expected a {entry[1]} config)")
        if "Scheduler" not in entry[1] and not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
            raise FileNotFoundError(f"{sub} has no weights file (expected {entry[1]} safetensors)")
    if spec is not None:
        comp, cls = spec.denoiser
        accepted = (cls,) if isinstance(cls, str) else tuple(cls)
        entry = model_index.get(comp)
        if not isinstance(entry, list) or entry[1] not in accepted:
            raise ValueError(f"{index}: component {comp!r} is {entry!r}; {spec.name} expects {' or '.join(accepted)}")


def load_folder(
    folder: str | os.PathLike, name: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> DiffusionPipeline:
    """Load a (testbed) pipeline folder after :func:`check_folder`."""
    check_folder(folder, name)
    from ..pipelines import lamamba_diff  # noqa: F401  (registers LaMambaDiffPipeline with diffusers)

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    # cast after loading: the from_pretrained dtype keyword was renamed across diffusers versions
    return pipe.to(device=device, dtype=dtype) if dtype != torch.float32 else pipe.to(device)


def load(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> DiffusionPipeline:
    """The shipped trained pipeline ``name``."""
    folder = weights_dir(name)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"testbed model {name!r} has no shipped weights at {folder}; train it with "
            f"`diffattn testbed train {name}` (diffattn.lora's trainer)"
        )
    return load_folder(folder, name, dtype=dtype, device=device)
