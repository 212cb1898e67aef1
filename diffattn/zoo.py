"""Tiny diffusers pipelines with random weights, built offline in well under a second.

Every pipeline is assembled from tiny models (hidden sizes 16-64, 1-3 layers) and tokenizers whose
vocabularies (~300-850 ids: bytes/characters plus one token per common prompt word) are generated in
memory, so nothing is downloaded.  Weights are deterministic given ``seed`` and the pipelines survive
``save_pretrained`` / ``DiffusionPipeline.from_pretrained``.

=============  ==============================================================================
name           what it builds (default call: 2 steps, 32x32 px)
=============  ==============================================================================
sd             UNet (attention at levels 1-2 + mid), AutoencoderKL (x2), CLIP
sdxl           UNet without attention at level 1 (like SDXL), 2 CLIP encoders, text_time embeds
sd3            SD3Transformer2DModel (patch 2), 2 CLIP + T5 (joint seq: 77 CLIP + 16 T5 tokens)
pixart         PixArtTransformer2DModel (ada_norm_single, patch 2) + T5
flux           FluxTransformer2DModel (2 double + 2 single blocks, guidance embeds), CLIP + T5
wan            WanTransformer3DModel + AutoencoderKLWan (x8 space, x4 time) + UMT5; 9 frames
wan-i2v        as wan, 36 input channels, CLIPVisionModel image encoder, added k/v projections
wan22          as wan with ``transformer`` (t >= 875) and ``transformer_2`` (boundary_ratio 0.875)
hunyuan-video  HunyuanVideoTransformer3DModel (patch 2) + its VAE, Llama + CLIP; 9 frames
mochi          MochiTransformer3DModel + AutoencoderKLMochi (x8 space, x6 time) + T5; 7 frames
cogvideox      CogVideoXTransformer3DModel (1.0, sincos pos.) + its VAE + T5 (226 tokens); 9 frames
sd-controlnet  ``sd`` plus a ControlNetModel (zero convs randomised so the control image matters)
=============  ==============================================================================

Every video default gives the transformer at least 2 latent frames x 2x2 tokens (3x2x2 for
wan/hunyuan/cogvideox, 2x2x2 for mochi); larger ``height``/``width``/``num_frames`` also work.

Quirks worth knowing: ``wan-i2v`` must run with ``max_sequence_length=512`` (diffusers'
``WanAttnProcessor`` splits image from text context assuming 512 text tokens); ``cogvideox``
needs ``max_sequence_length == 226`` (its positional table); ``hunyuan-video`` defaults to
``prompt_template={"template": "{}", "crop_start": 0}`` (the stock template is tuned for the real
Llama tokenizer, though it also runs).

>>> from diffattn import zoo
>>> pipe = zoo.load("flux")
>>> out = pipe(**zoo.default_call_kwargs("flux"))  # out.images: (1, 32, 32, 3) numpy
"""

from __future__ import annotations

import copy
import importlib.util
import string
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    MochiPipeline,
    MochiTransformer3DModel,
    ModelMixin,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

try:  # transformers>=5 without torchvision: the PIL backend, imported directly to avoid a warning
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

__all__ = ["names", "load", "default_call_kwargs"]


def _patch_wan_i2v_ftfy() -> None:
    """diffusers' WanImageToVideoPipeline calls ``ftfy.fix_text`` even when ftfy is not installed
    (WanPipeline guards it).  Without ftfy, give that module an identity ``fix_text``."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v

    if not hasattr(wan_i2v, "ftfy") and importlib.util.find_spec("ftfy") is None:
        wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)


_patch_wan_i2v_ftfy()

# --------------------------------------------------------------------------------------------------
# In-memory tokenizers
# --------------------------------------------------------------------------------------------------

_WORDS = (
    "a an the of and in on with at to is are by from for this that dance dancing monkey cat dog bird "
    "astronaut horse riding photo painting portrait city street night day sunset sunrise forest mountain "
    "river sea ocean beach snow rain red blue green yellow white black orange purple man woman girl boy "
    "child people car boat house tree flower sky cloud water fire light dark beautiful high quality "
    "detailed video walking running flying jumping camera slow motion close up view background style "
    "cinematic realistic render anime art negative blurry low bad worst ugly"
).split()

_VOCAB_SIZE = 1000  # embedding rows of every text encoder; each tokenizer uses fewer ids


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges (lowest rank first) to one word."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _word_merges(words: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges (appended to ``vocab``) that turn each word, given as its initial symbols, into one token.

    Shorter words go first; a new merge has the lowest priority, so words already handled stay whole.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for symbols in sorted(words, key=lambda w: (len(w), w)):
        pieces = _bpe(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    return merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Byte-level BPE CLIP tokenizer: 256 bytes (+ ``</w>`` forms), merges making each of ``_WORDS`` one
    token, and the two specials."""
    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab[c] = len(vocab)
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges = _word_merges([[*w[:-1], w[-1] + "</w>"] for w in _WORDS], vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) <= _VOCAB_SIZE
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """Unigram T5 tokenizer over printable ASCII and a few whole words (no sentinel tokens)."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -6.0) for c in chars] + [("▁" + c, -6.5) for c in chars]
    pieces += [("▁" + w, -2.0) for w in _WORDS if len(w) > 1]
    assert len(pieces) <= _VOCAB_SIZE
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _llama_tokenizer(model_max_length: int = 2048) -> LlamaTokenizer:
    """SentencePiece-style BPE Llama tokenizer with byte fallback, a ``<pad>`` token and word merges."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
    merges = _word_merges([["▁", *w] for w in _WORDS], vocab)
    assert len(vocab) <= _VOCAB_SIZE
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token="<pad>",
        add_bos_token=True,
        padding_side="right",  # HunyuanVideo crops the template from the left
        model_max_length=model_max_length,
    )


# --------------------------------------------------------------------------------------------------
# Tiny text / image encoders
# --------------------------------------------------------------------------------------------------


def tiny_clip_config(tok: CLIPTokenizer, hidden: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    """A tiny CLIP text-encoder config over :func:`tiny_clip_tokenizer`'s vocabulary."""
    return CLIPTextConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,  # != 2, so the pooled token is found by id, not by argmax
        pad_token_id=tok.pad_token_id,
    )


def tiny_t5_config(tok: T5Tokenizer, d_model: int = 32, cls: type = T5Config) -> T5Config:
    """A tiny T5 (or ``cls``: UMT5) encoder config over :func:`tiny_t5_tokenizer`'s vocabulary."""
    return cls(
        vocab_size=_VOCAB_SIZE,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )


def _seed(seed: int, k: int) -> None:
    """Reseed before building component ``k`` (distinct streams so twin models differ)."""
    torch.manual_seed(seed * 1000 + k)


def _vae_kl(latent_channels: int, **kw: Any) -> AutoencoderKL:
    """Two-level AutoencoderKL (spatial factor 2) with a mid-block attention."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kw,
    )


def _sd_unet(seed: int, k: int) -> UNet2DConditionModel:
    _seed(seed, k)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),  # diffusers naming quirk: this is the number of heads (head dim 8)
        cross_attention_dim=32,
        norm_num_groups=8,
    )


def _sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _sd_parts(seed: int) -> dict[str, Any]:
    tok = tiny_clip_tokenizer()
    _seed(seed, 1)
    text_encoder = CLIPTextModel(tiny_clip_config(tok))
    _seed(seed, 2)
    vae = _vae_kl(4, scaling_factor=0.18215)
    return {
        "unet": _sd_unet(seed, 0),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tok,
        "scheduler": _sd_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def _build_sd(seed: int) -> DiffusionPipeline:
    return StableDiffusionPipeline(**_sd_parts(seed), image_encoder=None)


def _build_sd_controlnet(seed: int) -> DiffusionPipeline:
    parts = _sd_parts(seed)
    _seed(seed, 3)
    controlnet = ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(8, 16))
    # ControlNet's output convs are zero-initialised; give them small random weights so the control
    # image actually changes the result.
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convs.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0.0, 0.05)
            conv.bias.zero_()
    return StableDiffusionControlNetPipeline(**parts, controlnet=controlnet, image_encoder=None)


def _build_sdxl(seed: int) -> DiffusionPipeline:
    tok, tok_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    _seed(seed, 0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        # like SDXL: no attention at the first (highest-resolution) level
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),  # number of heads (head dim 8)
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (32)
        cross_attention_dim=64,  # 32 (text_encoder) + 32 (text_encoder_2)
        norm_num_groups=8,
    )
    _seed(seed, 1)
    text_encoder = CLIPTextModel(tiny_clip_config(tok))
    _seed(seed, 2)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tok_2))
    _seed(seed, 3)
    vae = _vae_kl(4, scaling_factor=0.13025, force_upcast=False)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def _build_sd3(seed: int) -> DiffusionPipeline:
    tok, tok_2, tok_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    _seed(seed, 0)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5 d_model; CLIP (32 + 32) is padded to it
        caption_projection_dim=32,  # = inner dim
        pooled_projection_dim=64,  # pooled CLIP 32 + 32
        pos_embed_max_size=32,
    )
    _seed(seed, 1)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_config(tok))
    _seed(seed, 2)
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(tok_2))
    _seed(seed, 3)
    text_encoder_3 = T5EncoderModel(tiny_t5_config(tok_3, d_model=64))
    _seed(seed, 4)
    vae = _vae_kl(
        16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok_3,
    )


def _build_pixart(seed: int) -> DiffusionPipeline:
    tok = tiny_t5_tokenizer()
    _seed(seed, 0)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=32,
        out_channels=8,  # learned sigma
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    _seed(seed, 1)
    text_encoder = T5EncoderModel(tiny_t5_config(tok, d_model=32))
    _seed(seed, 2)
    vae = _vae_kl(4, scaling_factor=0.18215)
    return PixArtAlphaPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _build_flux(seed: int) -> DiffusionPipeline:
    tok, tok_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    _seed(seed, 0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP pooled
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    _seed(seed, 1)
    text_encoder = CLIPTextModel(tiny_clip_config(tok))
    _seed(seed, 2)
    text_encoder_2 = T5EncoderModel(tiny_t5_config(tok_2, d_model=32))
    _seed(seed, 3)
    vae = _vae_kl(
        16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        transformer=transformer,
    )


def _wan_vae(seed: int, k: int) -> AutoencoderKLWan:
    _seed(seed, k)
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )  # spatial factor 8, temporal factor 4


def _wan_transformer(seed: int, k: int, **kw: Any) -> WanTransformer3DModel:
    _seed(seed, k)
    cfg: dict[str, Any] = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 64,
        "ffn_dim": 64,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    }
    cfg.update(kw)
    return WanTransformer3DModel(**cfg)


def _wan_text(seed: int, k: int) -> tuple[T5Tokenizer, UMT5EncoderModel]:
    tok = tiny_t5_tokenizer()
    _seed(seed, k)
    return tok, UMT5EncoderModel(tiny_t5_config(tok, d_model=32, cls=UMT5Config))


def _wan_scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _build_wan(seed: int) -> DiffusionPipeline:
    tok, text_encoder = _wan_text(seed, 1)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=_wan_vae(seed, 2),
        scheduler=_wan_scheduler(),
        transformer=_wan_transformer(seed, 0),
    )


def _build_wan22(seed: int) -> DiffusionPipeline:
    tok, text_encoder = _wan_text(seed, 1)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=_wan_vae(seed, 2),
        scheduler=_wan_scheduler(),
        transformer=_wan_transformer(seed, 0),  # high-noise expert: t >= boundary_ratio * 1000
        transformer_2=_wan_transformer(seed, 3),  # low-noise expert
        boundary_ratio=0.875,
    )


def _build_wan_i2v(seed: int) -> DiffusionPipeline:
    tok, text_encoder = _wan_text(seed, 1)
    _seed(seed, 3)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=4,  # 8x8 patches + CLS = 65 image-context tokens
        )
    )
    image_processor = _CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})
    return WanImageToVideoPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=_wan_vae(seed, 2),
        scheduler=_wan_scheduler(),
        image_processor=image_processor,
        image_encoder=image_encoder,
        # 16 noise + 4 mask + 16 image-latent channels; image_dim adds the image embedder and
        # added_kv_proj_dim (= inner dim, as in Wan2.1-I2V) the add_k/add_v projections in cross-attention
        transformer=_wan_transformer(seed, 0, in_channels=36, image_dim=32, added_kv_proj_dim=32),
    )


def _build_hunyuan_video(seed: int) -> DiffusionPipeline:
    tok, tok_2 = _llama_tokenizer(), tiny_clip_tokenizer()
    _seed(seed, 0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=32,  # Llama hidden size
        pooled_projection_dim=32,  # CLIP pooled
        rope_axes_dim=(4, 6, 6),
    )
    _seed(seed, 1)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    _seed(seed, 2)
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-3]
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    _seed(seed, 3)
    text_encoder_2 = CLIPTextModel(tiny_clip_config(tok_2))
    return HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
    )


def _build_mochi(seed: int) -> DiffusionPipeline:
    tok = tiny_t5_tokenizer()
    _seed(seed, 0)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        qk_norm="rms_norm",
        text_embed_dim=32,
        time_embed_dim=16,
        activation_fn="swiglu",
        max_sequence_length=256,
    )
    with torch.no_grad():  # learned RoPE frequencies start at zero (identity RoPE); make them non-trivial
        transformer.pos_frequencies.normal_(0.0, 0.5)
    _seed(seed, 1)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )  # spatial factor 8, temporal factor 6
    _seed(seed, 2)
    text_encoder = T5EncoderModel(tiny_t5_config(tok, d_model=32))
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )


def _build_cogvideox(seed: int) -> DiffusionPipeline:
    tok = tiny_t5_tokenizer()
    _seed(seed, 0)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=4,  # latent 4x4 -> 32x32 px
        sample_height=4,
        sample_frames=9,  # 3 latent frames
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,  # must equal the pipeline's max_sequence_length (its default)
    )
    _seed(seed, 1)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    _seed(seed, 2)
    text_encoder = T5EncoderModel(tiny_t5_config(tok, d_model=32))
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
    )
    return CogVideoXPipeline(
        tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "pixart": _build_pixart,
    "flux": _build_flux,
    "wan": _build_wan,
    "wan-i2v": _build_wan_i2v,
    "wan22": _build_wan22,
    "hunyuan-video": _build_hunyuan_video,
    "mochi": _build_mochi,
    "cogvideox": _build_cogvideox,
    "sd-controlnet": _build_sd_controlnet,
}

# --------------------------------------------------------------------------------------------------
# Call kwargs
# --------------------------------------------------------------------------------------------------

_PROMPT = "an astronaut riding a horse"
_NEGATIVE = "blurry low quality"

_IMAGE_KW: dict[str, Any] = {
    "prompt": _PROMPT,
    "height": 32,
    "width": 32,
    "num_inference_steps": 2,
    "output_type": "np",
}
_VIDEO_KW: dict[str, Any] = {**_IMAGE_KW, "prompt": "a cat dancing on the beach", "max_sequence_length": 16}

_CALL_KWARGS: dict[str, dict[str, Any]] = {
    "sd": {**_IMAGE_KW, "negative_prompt": _NEGATIVE, "guidance_scale": 7.5},
    "sd-controlnet": {**_IMAGE_KW, "negative_prompt": _NEGATIVE, "guidance_scale": 7.5},
    "sdxl": {**_IMAGE_KW, "negative_prompt": _NEGATIVE, "guidance_scale": 5.0},
    "sd3": {**_IMAGE_KW, "negative_prompt": _NEGATIVE, "guidance_scale": 5.0, "max_sequence_length": 16},
    "pixart": {
        **_IMAGE_KW,
        "negative_prompt": _NEGATIVE,
        "guidance_scale": 4.5,
        "max_sequence_length": 16,
        "use_resolution_binning": False,
        "clean_caption": False,
    },
    "flux": {**_IMAGE_KW, "guidance_scale": 3.5, "max_sequence_length": 16},
    "wan": {**_VIDEO_KW, "negative_prompt": _NEGATIVE, "num_frames": 9, "guidance_scale": 5.0},
    "wan-i2v": {
        **_VIDEO_KW,
        "negative_prompt": _NEGATIVE,
        "num_frames": 9,
        "guidance_scale": 5.0,
        # WanAttnProcessor assumes exactly 512 text tokens to split image from text context
        "max_sequence_length": 512,
    },
    "wan22": {
        **_VIDEO_KW,
        "negative_prompt": _NEGATIVE,
        "num_frames": 9,
        "guidance_scale": 4.0,
        "guidance_scale_2": 3.0,
    },
    "hunyuan-video": {
        **_VIDEO_KW,
        "num_frames": 9,
        "guidance_scale": 6.0,
        # the default template is tuned for the real Llama tokenizer (crop_start=95)
        "prompt_template": {"template": "{}", "crop_start": 0},
    },
    "mochi": {**_VIDEO_KW, "negative_prompt": _NEGATIVE, "num_frames": 7, "guidance_scale": 4.5},
    "cogvideox": {
        **{k: v for k, v in _VIDEO_KW.items() if k != "max_sequence_length"},
        "negative_prompt": _NEGATIVE,
        "num_frames": 9,
        "guidance_scale": 6.0,
    },
}


def _test_image(size: int = 32) -> Image.Image:
    """Deterministic RGB test image: gradients plus a square."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.stack([x, y, 1.0 - x * y], axis=-1)
    q = size // 4
    img[q : 3 * q, q : 3 * q] = 1.0 - img[q : 3 * q, q : 3 * q]
    return Image.fromarray((img * 255).round().astype(np.uint8))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def names() -> list[str]:
    """Names of the available tiny pipelines."""
    return list(_BUILDERS)


def _check(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown zoo pipeline {name!r}; valid names: {', '.join(_BUILDERS)}")


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters/buffers to ``dtype`` the way ``from_pretrained(torch_dtype=...)`` does:
    a model's ``_keep_in_fp32_modules`` stay float32 (in transformers only for float16, plus
    ``_keep_in_fp32_modules_strict`` for float16/bfloat16)."""
    if isinstance(model, ModelMixin):
        keep = set(model._keep_in_fp32_modules or [])
    else:
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
        if dtype in (torch.float16, torch.bfloat16):
            keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if keep & set(name.split(".")) else dtype)


def load(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Build the tiny pipeline ``name`` with random weights determined by ``seed``, cast to ``dtype``.

    The global torch RNG state is left untouched.
    """
    _check(name)
    with torch.random.fork_rng(devices=[]):
        pipe = _BUILDERS[name](seed)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    if dtype != torch.float32:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                _cast(module, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_call_kwargs(name: str) -> dict[str, Any]:
    """Small, fast keyword arguments for ``pipe(**kwargs)`` (2 steps, tiny sizes, a seeded generator).

    Images come back as ``output.images`` (N, H, W, 3), videos as ``output.frames`` (N, F, H, W, 3),
    both numpy (``output_type="np"``).  A fresh dict (and generator) is returned on every call.
    """
    _check(name)
    kwargs = copy.deepcopy(_CALL_KWARGS[name])
    kwargs["generator"] = torch.Generator("cpu").manual_seed(0)
    if name in ("sd-controlnet", "wan-i2v"):  # control image / first frame
        kwargs["image"] = _test_image(kwargs["height"])
    return kwargs
