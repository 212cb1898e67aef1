"""CoreAttnProcessor against the stock diffusers processors on tiny randomly initialised models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    MochiTransformer3DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
)
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from torch import nn

from diffattn.processors.core import (
    CoreAttnProcessor,
    attention_modules,
    install_processor,
    set_processor_names,
    track_text_len,
)
from diffattn.processors.families import (
    FAMILIES,
    family_of_processor,
    infer_family,
    stock_processor_for,
)
from diffattn.processors.layout import TokenLayout, dense_core

B = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


@dataclass
class Case:
    """A tiny model, its inputs and the layouts each attention layer must see (one entry per core call)."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    expected: Callable[
        [str], list[tuple]
    ]  # layer name -> [(family, is_cross, n_text, text_position, text_valid)]


def _unet() -> nn.Module:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def _unet_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return dict(
        sample=_randn(g, B, 4, 8, 8),
        timestep=torch.tensor([10, 20]),
        encoder_hidden_states=_randn(g, B, 5, 12),
    )


def _sd_expected(name: str) -> list[tuple]:
    return [("sd", name.endswith("attn2"), 0, None, None)]


def _sd3() -> nn.Module:
    # Two blocks: the last one is context_pre_only; block 0 has the SD3.5 dual attention (attn2).
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=10,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _sd3_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=_randn(g, B, 4, 8, 8),
        encoder_hidden_states=_randn(g, B, 5, 12),
        pooled_projections=_randn(g, B, 10),
        timestep=torch.tensor([10, 20]),
    )


def _sd3_expected(name: str) -> list[tuple]:
    if name.endswith("attn2"):
        return [("sd3", False, 0, None, None)]
    return [("sd3", False, 5, "last", None)]


def _pixart() -> nn.Module:
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        norm_num_groups=4,
    )


def _pixart_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, 5)
    mask[1, 3:] = 0  # exercises prepare_attention_mask on the cross-attention
    return dict(
        hidden_states=_randn(g, B, 4, 8, 8),
        encoder_hidden_states=_randn(g, B, 5, 12),
        encoder_attention_mask=mask,
        timestep=torch.tensor([10, 20]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


FLUX_TEXT = 5


def _flux() -> nn.Module:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        axes_dims_rope=(2, 2, 4),
    )


def _flux_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    h = w = 4
    img_ids = torch.zeros(h * w, 3)
    img_ids[:, 1] = torch.arange(h).repeat_interleave(w)
    img_ids[:, 2] = torch.arange(w).repeat(h)
    return dict(
        hidden_states=_randn(g, B, h * w, 8),
        encoder_hidden_states=_randn(g, B, FLUX_TEXT, 12),
        pooled_projections=_randn(g, B, 10),
        timestep=torch.tensor([0.1, 0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(FLUX_TEXT, 3),
    )


def _wan(image_dim: int | None = None) -> nn.Module:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=12,
        freq_dim=8,
        ffn_dim=16,
        num_layers=1,
        rope_max_seq_len=32,
        image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 16,
    )


def _wan_inputs(i2v: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=_randn(g, B, 4, 3, 8, 8), timestep=torch.tensor([10, 20]))
    if i2v:
        # Wan's I2V cross-attention hardcodes 512 text tokens after the image-context tokens.
        kw.update(encoder_hidden_states=_randn(g, B, 512, 12), encoder_hidden_states_image=_randn(g, B, 6, 6))
    else:
        kw.update(encoder_hidden_states=_randn(g, B, 7, 12))
    return kw


def _wan_expected(name: str, i2v: bool = False) -> list[tuple]:
    if name.endswith("attn2"):
        return [("wan", True, 0, None, None)] * (2 if i2v else 1)  # I2V: image branch, then text
    return [("wan", False, 0, None, None)]


HUNYUAN_TEXT = 6


def _hunyuan() -> nn.Module:
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=12,
        pooled_projection_dim=10,
        rope_axes_dim=(2, 2, 4),
        guidance_embeds=False,
    )


def _hunyuan_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, HUNYUAN_TEXT, dtype=torch.long)
    mask[1, 4:] = 0  # sample 1 pads its last two prompt tokens
    return dict(
        hidden_states=_randn(g, B, 4, 3, 8, 8),
        timestep=torch.tensor([10, 20]),
        encoder_hidden_states=_randn(g, B, HUNYUAN_TEXT, 12),
        encoder_attention_mask=mask,
        pooled_projections=_randn(g, B, 10),
    )


def _hunyuan_expected(name: str) -> list[tuple]:
    if "token_refiner" in name:  # AttnProcessor2_0 over the prompt tokens only
        return [("sd", False, HUNYUAN_TEXT, "first", [6, 4])]
    return [("hunyuan-video", False, HUNYUAN_TEXT, "last", [6, 4])]


def _mochi() -> nn.Module:
    # Two blocks: the last one is context_pre_only (no to_add_out).
    return MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=12,
        in_channels=4,
        text_embed_dim=16,
        time_embed_dim=4,
        max_sequence_length=8,
    )


def _mochi_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(B, 6, dtype=torch.bool)
    mask[1, 3:] = False  # stock drops these text tokens of sample 1
    return dict(
        hidden_states=_randn(g, B, 4, 3, 8, 8),
        encoder_hidden_states=_randn(g, B, 6, 16),
        timestep=torch.tensor([10, 20]),
        encoder_attention_mask=mask,
    )


def _mochi_expected(name: str) -> list[tuple]:
    return [("mochi", False, 6, "last", [6]), ("mochi", False, 3, "last", [3])]  # one core call per sample


def _cogvideox() -> nn.Module:
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=4,
        text_embed_dim=12,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
        use_rotary_positional_embeddings=True,
    )


def _cogvideox_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    rotary = get_3d_rotary_pos_embed(
        embed_dim=16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=3
    )
    return dict(
        hidden_states=_randn(g, B, 3, 4, 8, 8),
        encoder_hidden_states=_randn(g, B, 5, 12),
        timestep=torch.tensor([10, 20]),
        image_rotary_emb=rotary,
    )


def _vae() -> nn.Module:
    # Mid-block attention: 4D input, group_norm, residual_connection, rescale_output_factor.
    return AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )


def _vae_inputs() -> dict[str, Any]:
    return dict(sample=_randn(torch.Generator().manual_seed(1), B, 3, 8, 8))


CASES: dict[str, Case] = {
    "unet": Case(_unet, _unet_inputs, _sd_expected),
    "sd3": Case(_sd3, _sd3_inputs, _sd3_expected),
    "pixart": Case(_pixart, _pixart_inputs, _sd_expected),
    "flux": Case(_flux, _flux_inputs, lambda name: [("flux", False, FLUX_TEXT, "first", None)]),
    "wan": Case(_wan, _wan_inputs, _wan_expected),
    "wan_i2v": Case(lambda: _wan(image_dim=6), lambda: _wan_inputs(True), lambda n: _wan_expected(n, True)),
    "hunyuan_video": Case(_hunyuan, _hunyuan_inputs, _hunyuan_expected),
    "mochi": Case(_mochi, _mochi_inputs, _mochi_expected),
    "cogvideox": Case(_cogvideox, _cogvideox_inputs, lambda name: [("cogvideox", False, 5, "first", None)]),
    "vae": Case(_vae, _vae_inputs, lambda name: [("sd", False, 0, None, None)]),
}


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.build().eval()


@torch.no_grad()
def _run(model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    out = model(**kwargs, return_dict=False)[0]
    return out.sample if hasattr(out, "sample") else out


def _set_processor(model: nn.Module, proc: Any) -> None:
    """diffusers' own set_attn_processor where the model has one; MochiTransformer3DModel lacks it."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(proc)
    else:
        for module in attention_modules(model).values():
            module.processor = proc


def _stock_and_model(name: str) -> tuple[nn.Module, dict[str, Any], torch.Tensor]:
    case = CASES[name]
    model = _build(case)
    kwargs = case.inputs()
    return model, kwargs, _run(model, kwargs)


class Recorder:
    """A dense core that records (layer, layout) for every call."""

    def __init__(self, scale: float = 1.0) -> None:
        self.calls: list[tuple[str | None, TokenLayout, tuple, tuple]] = []
        self.scale = scale

    def __call__(self, q, k, v, layout, attn_mask):
        self.calls.append((layout.layer, layout, tuple(q.shape), tuple(k.shape)))
        return dense_core(q, k, v, layout, attn_mask) * self.scale


def _summary(layout: TokenLayout) -> tuple:
    valid = None if layout.text_valid is None else layout.text_valid.tolist()
    return (layout.family, layout.is_cross, layout.n_text, layout.text_position, valid)


# ----- whole models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_no_core_is_bit_identical_to_stock(name: str) -> None:
    model, kwargs, ref = _stock_and_model(name)
    # Plain diffusers installation: the family is inferred from each module alone (plus the rotary hint).
    extra = {"joint_attention_kwargs": {"text_len": FLUX_TEXT}} if name == "flux" else {}
    _set_processor(model, CoreAttnProcessor())
    assert torch.equal(_run(model, {**kwargs, **extra}), ref)


@pytest.mark.parametrize("name", list(CASES))
def test_dense_core_matches_stock(name: str) -> None:
    model, kwargs, ref = _stock_and_model(name)
    install_processor(model, CoreAttnProcessor(core=dense_core))
    out = _run(model, kwargs)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_layouts_seen_by_the_core(name: str) -> None:
    model, kwargs, _ = _stock_and_model(name)
    rec = Recorder()
    names = install_processor(model, CoreAttnProcessor(core=rec))
    _run(model, kwargs)

    expected = [(layer, want) for layer in names for want in CASES[name].expected(layer)]
    got = [(layer, _summary(layout)) for layer, layout, _, _ in rec.calls]
    assert sorted(got, key=str) == sorted(expected, key=str)
    for _, layout, q_shape, k_shape in rec.calls:
        assert layout.n_text <= k_shape[2]
        if not layout.is_cross:
            assert q_shape[2] == k_shape[2]  # joint sequences: text inside the same token axis


@pytest.mark.parametrize("name", list(CASES))
def test_core_used_only_where_applies(name: str) -> None:
    model, kwargs, ref = _stock_and_model(name)
    names = sorted(attention_modules(model))
    chosen = set(names[::2])  # every other attention layer
    rec = Recorder(scale=1.5)  # perturbs the attention output
    proc = CoreAttnProcessor(core=rec, applies=lambda attn, layout: layout.layer in chosen)
    install_processor(model, proc)
    out = _run(model, kwargs)
    assert {layer for layer, *_ in rec.calls} == chosen
    assert not torch.allclose(out, ref, atol=1e-4)

    # A core that applies nowhere is the stock processor, bit for bit.
    install_processor(model, CoreAttnProcessor(core=rec, applies=lambda attn, layout: False))
    assert torch.equal(_run(model, kwargs), ref)


@pytest.mark.parametrize("name", ["sd3", "hunyuan_video", "flux", "wan_i2v", "mochi", "cogvideox", "unet"])
def test_infer_family_from_module_alone(name: str) -> None:
    model = _build(CASES[name])
    truth = {n: family_of_processor(m.processor) for n, m in attention_modules(model).items()}
    assert all(truth.values())
    _set_processor(model, CoreAttnProcessor())  # the stock processors are gone now
    for layer, module in attention_modules(model).items():
        rotary = truth[layer] == "hunyuan-video"  # only needed for SD3.5 vs HunyuanVideo joint blocks
        assert infer_family(module, has_rotary=rotary) == truth[layer], layer


def test_infer_family_ambiguous_and_unsupported() -> None:
    sd3 = _build(CASES["sd3"])
    joint = sd3.transformer_blocks[0].attn
    joint.set_processor(CoreAttnProcessor())
    with pytest.raises(ValueError, match="ambiguous"):
        infer_family(joint)
    assert infer_family(joint, has_rotary=False) == "sd3"
    assert infer_family(sd3.transformer_blocks[1].attn) == "sd3"  # context_pre_only: only SD3 has it

    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        infer_family(nn.Linear(2, 2))
    added_kv = Attention(query_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6, processor=CoreAttnProcessor())
    with pytest.raises(ValueError, match="not supported"):
        infer_family(added_kv)


def test_stock_processor_registry() -> None:
    for family in FAMILIES:
        proc = stock_processor_for(family)
        assert family_of_processor(proc) == family
        assert family_of_processor(type(proc)) == family
    assert family_of_processor(CoreAttnProcessor(family="wan")) == "wan"
    assert family_of_processor(CoreAttnProcessor()) is None
    with pytest.raises(ValueError):
        CoreAttnProcessor(family="nope")


# ----- single-stream Flux text length ---------------------------------------------------------------------


def test_flux_single_stream_text_len_sources() -> None:
    model, kwargs, ref = _stock_and_model("flux")
    rec = Recorder()
    model.set_attn_processor(CoreAttnProcessor(core=rec))
    with pytest.raises(ValueError, match="text_len"):
        _run(model, kwargs)

    rec.calls.clear()  # 1. per call, through joint_attention_kwargs
    out = _run(model, {**kwargs, "joint_attention_kwargs": {"text_len": FLUX_TEXT}})
    assert [layout.n_text for _, layout, _, _ in rec.calls] == [FLUX_TEXT, FLUX_TEXT]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    rec.calls.clear()  # 2. fixed at construction
    model.set_attn_processor(CoreAttnProcessor(core=rec, text_len=FLUX_TEXT))
    _run(model, kwargs)
    assert [layout.n_text for _, layout, _, _ in rec.calls] == [FLUX_TEXT, FLUX_TEXT]

    rec.calls.clear()  # 3. hooks on the single-stream blocks, also under gradient checkpointing (positional)
    model.set_attn_processor(CoreAttnProcessor(core=rec))
    handles = track_text_len(model)
    assert len(handles) == 1 and track_text_len(model) == []
    model.enable_gradient_checkpointing()
    model.train()
    out = model(**kwargs, return_dict=False)[0]
    out.square().mean().backward()
    assert all(layout.n_text == FLUX_TEXT for _, layout, _, _ in rec.calls)
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=0)
    for handle in handles:
        handle.remove()


def test_without_names_refiner_is_plain_self_attention() -> None:
    model, kwargs, ref = _stock_and_model("hunyuan_video")
    rec = Recorder()
    model.set_attn_processor(CoreAttnProcessor(core=rec))
    torch.testing.assert_close(_run(model, kwargs), ref, atol=1e-5, rtol=0)
    summaries = sorted(_summary(layout) for _, layout, _, _ in rec.calls)
    # Without set_processor_names the refiner (AttnProcessor2_0) looks like any SD self-attention.
    assert summaries == sorted(
        [("sd", False, 0, None, None)] + [("hunyuan-video", False, HUNYUAN_TEXT, "last", [6, 4])] * 2
    )
    assert all(layer is None for layer, *_ in rec.calls)


# ----- AttnProcessor2_0 features on a bare Attention --------------------------------------------------------


def _attention_cases() -> dict[str, tuple[Callable[[], Attention], Callable[[], dict[str, Any]]]]:
    def args(**extra: Any) -> Callable[[], dict[str, Any]]:
        def make() -> dict[str, Any]:
            g = torch.Generator().manual_seed(3)
            out = {}
            for key, value in extra.items():
                out[key] = _randn(g, *value) if isinstance(value, tuple) else value
            return out

        return make

    mask = torch.zeros(B, 1, 5)
    mask[1, :, 3:] = -10000.0  # additive cross-attention mask as UNets build it
    return {
        "spatial_norm_4d_residual": (
            lambda: Attention(
                query_dim=32,
                heads=2,
                dim_head=8,
                spatial_norm_dim=3,
                residual_connection=True,
                rescale_output_factor=2.0,
            ),  # SpatialNorm's GroupNorm has 32 groups
            args(hidden_states=(B, 32, 4, 4), temb=(B, 3, 2, 2)),
        ),
        "group_norm": (
            lambda: Attention(query_dim=8, heads=2, dim_head=4, norm_num_groups=4, bias=True),
            args(hidden_states=(B, 9, 8)),
        ),
        "norm_cross_layer_norm_masked": (
            lambda: Attention(
                query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, cross_attention_norm="layer_norm"
            ),
            args(hidden_states=(B, 9, 8), encoder_hidden_states=(B, 5, 6), attention_mask=mask),
        ),
        "norm_cross_group_norm": (
            lambda: Attention(
                query_dim=8,
                cross_attention_dim=6,
                heads=2,
                dim_head=4,
                cross_attention_norm="group_norm",
                cross_attention_norm_num_groups=2,
            ),
            args(hidden_states=(B, 9, 8), encoder_hidden_states=(B, 5, 6)),
        ),
        "scale_qk_false": (  # diffusers uses the classic AttnProcessor here (scale 1)
            lambda: Attention(query_dim=8, heads=2, dim_head=4, scale_qk=False),
            args(hidden_states=(B, 9, 8)),
        ),
    }


@pytest.mark.parametrize("name", list(_attention_cases()))
def test_sd_family_features(name: str) -> None:
    build, make_args = _attention_cases()[name]
    torch.manual_seed(0)
    attn = build()
    kwargs = make_args()
    with torch.no_grad():
        ref = attn(**kwargs)
        stock_cls = type(attn.processor)
        assert stock_cls is (AttnProcessor if name == "scale_qk_false" else AttnProcessor2_0)

        attn.set_processor(CoreAttnProcessor())
        assert torch.equal(attn(**kwargs), ref)

        rec = Recorder()
        attn.set_processor(CoreAttnProcessor(core=rec))
        torch.testing.assert_close(attn(**kwargs), ref, atol=1e-5, rtol=0)
        assert [_summary(layout) for _, layout, _, _ in rec.calls] == [
            ("sd", "encoder_hidden_states" in kwargs, 0, None, None)
        ]


# ----- subclassing and dtype ---------------------------------------------------------------------------------


class _ShiftedProcessor(CoreAttnProcessor):
    """A method written as a subclass: `core` and `applies` as methods."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[str | None] = []

    def core(self, q, k, v, layout, attn_mask):
        self.layers.append(layout.layer)
        return dense_core(q, k, v, layout, attn_mask) + 0.1

    def applies(self, attn: nn.Module, layout: TokenLayout) -> bool:
        return not layout.is_cross


def test_subclass_overrides() -> None:
    model, kwargs, ref = _stock_and_model("wan")
    proc = _ShiftedProcessor()
    install_processor(model, proc)
    out = _run(model, kwargs)
    assert proc.layers == ["blocks.0.attn1"]  # attn2 (cross) ran stock
    assert not torch.allclose(out, ref, atol=1e-4)

    class Dense(CoreAttnProcessor):  # overriding `attention` alone also takes the core path
        def attention(self, q, k, v, layout, attn_mask):
            return super().attention(q, k, v, layout, attn_mask)

    assert Dense().has_core and not CoreAttnProcessor().has_core
    install_processor(model, Dense())
    torch.testing.assert_close(_run(model, kwargs), ref, atol=1e-5, rtol=0)


def test_follows_input_dtype() -> None:
    model, kwargs, _ = _stock_and_model("flux")
    model = model.to(torch.bfloat16)
    kwargs = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }
    ref = _run(model, kwargs)
    seen: list[torch.dtype] = []

    def core(q, k, v, layout, attn_mask):
        seen.append(q.dtype)
        return dense_core(q, k, v, layout, attn_mask)

    install_processor(model, CoreAttnProcessor(core=core))
    out = _run(model, kwargs)
    assert out.dtype == torch.bfloat16 and seen == [torch.bfloat16, torch.bfloat16]
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_set_processor_names_records_stock_family() -> None:
    model = _build(CASES["hunyuan_video"])
    names = set_processor_names(model)
    modules = attention_modules(model)
    assert names == list(modules)
    fams = {n: m._diffattn_family for n, m in modules.items()}
    assert fams == {
        "context_embedder.token_refiner.refiner_blocks.0.attn": "sd",
        "transformer_blocks.0.attn": "hunyuan-video",
        "single_transformer_blocks.0.attn": "hunyuan-video",
    }


def test_install_keeps_unsupported_processors() -> None:
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "plain": Attention(query_dim=8, heads=2, dim_head=4),
            "added_kv": Attention(
                query_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6, processor=AttnAddedKVProcessor()
            ),
        }
    )
    assert install_processor(model, CoreAttnProcessor()) == ["plain"]
    assert isinstance(model["added_kv"].processor, AttnAddedKVProcessor)
    assert model["plain"]._diffattn_name == "plain"


def test_peft_lora_layers_are_used() -> None:
    from peft import LoraConfig

    model, kwargs, base = _stock_and_model("flux")
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    torch.manual_seed(1)
    # init_lora_weights=False: random A and B, so the adapter really changes the output.
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    ref = _run(model, kwargs)
    assert not torch.allclose(ref, base, atol=1e-4)
    install_processor(model, CoreAttnProcessor(core=dense_core))
    torch.testing.assert_close(_run(model, kwargs), ref, atol=1e-5, rtol=0)


def test_fused_projection_models() -> None:
    # fuse_qkv_projections swaps in FusedAttnProcessor2_0: still the "sd" family. The core path keeps using
    # the unfused to_q/to_k/to_v (which peft LoRA wraps), equal to the fused weights up to rounding.
    model, kwargs, ref = _stock_and_model("unet")
    model.fuse_qkv_projections()
    fused = _run(model, kwargs)
    assert {family_of_processor(p) for p in model.attn_processors.values()} == {"sd"}
    assert install_processor(model, CoreAttnProcessor(core=dense_core)) == list(attention_modules(model))
    torch.testing.assert_close(_run(model, kwargs), fused, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=0)
