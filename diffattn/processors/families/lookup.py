"""Family lookup: the stock diffusers attention processors, re-expressed with a pluggable attention core.

Every supported stock processor is one :class:`Family`: ``layout`` says where the text tokens of a call sit,
``run`` repeats the stock math line for line (same projections through ``attn.to_q``/... so that peft LoRA
layers apply, same qk norms, rotary embeddings, concatenation order, output projections and return values)
and only replaces the ``scaled_dot_product_attention``/``dispatch_attention_fn`` product by ``attend``, and
``call_stock`` calls the stock processor with the arguments it expects.

Family inference rules (:func:`infer_family`), first match wins:

1. the module carries a recorded family (``_diffattn_family``, set by ``set_processor_names`` from the stock
   processor it had, or cached by ``CoreAttnProcessor`` on the first call);
2. the module's current processor is a stock processor -> its family (:func:`family_of_processor`);
3. class ``WanAttention`` -> ``"wan"``, ``FluxAttention`` -> ``"flux"``, ``MochiAttention`` -> ``"mochi"``;
4. class ``Attention`` (shared by SD/SDXL/PixArt/ControlNet/VAE, SD3, HunyuanVideo and CogVideoX):

   - ``add_q_proj`` present (joint text/visual projections): ``"sd3"`` when there is no qk norm or
     ``context_pre_only`` is True (HunyuanVideo's dual-stream blocks always have both an RMS qk norm and
     ``context_pre_only=False``). Otherwise SD3.5 joint blocks and HunyuanVideo dual-stream blocks are built
     with identical arguments; the call decides: HunyuanVideo always passes rotary embeddings, SD3 never does
     (``has_rotary``). Without that hint the module is ambiguous and a ``ValueError`` is raised.
   - ``add_k_proj`` without ``add_q_proj`` (``AttnAddedKVProcessor`` models, UnCLIP/Kandinsky) -> unsupported.
   - ``pre_only`` (no output projection) -> ``"hunyuan-video"`` single-stream block.
   - ``is_cross_attention`` -> ``"sd"`` (cross-attention).
   - qk norm ``nn.LayerNorm`` over ``head_dim`` -> ``"cogvideox"``; diffusers ``RMSNorm`` over ``head_dim``
     -> ``"sd3"`` (SD3.5 ``attn2`` of the dual-attention blocks); no qk norm -> ``"sd"``. This also makes the
     HunyuanVideo token refiner ``"sd"``: it really runs ``AttnProcessor2_0``. It attends over text tokens
     only; modules tagged text-only by ``set_processor_names`` get a layout with every token marked as text.
"""

from __future__ import annotations

from typing import Any

from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    AttnProcessorNPU,
    CogVideoXAttnProcessor2_0,
    FusedAttnProcessor2_0,
    FusedCogVideoXAttnProcessor2_0,
    FusedJointAttnProcessor2_0,
    JointAttnProcessor2_0,
    MochiAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
    XFormersJointAttnProcessor,
)
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn

from .base import FAMILY_ATTR, SUPPORTED_MODELS, Family
from .cogvideox import CogVideoXFamily
from .flux import FluxFamily
from .hunyuan_video import HunyuanVideoFamily
from .mochi import MochiFamily
from .sd import SDFamily
from .sd3 import SD3Family
from .wan import WanFamily

# Stateless family objects, looked up by name.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        SDFamily(),
        SD3Family(),
        FluxFamily(),
        WanFamily(),
        HunyuanVideoFamily(),
        MochiFamily(),
        CogVideoXFamily(),
    )
}

_STOCK_FAMILIES: dict[type, str] = {
    AttnProcessor2_0: "sd",
    AttnProcessor: "sd",
    JointAttnProcessor2_0: "sd3",
    FluxAttnProcessor: "flux",
    WanAttnProcessor: "wan",
    HunyuanVideoAttnProcessor2_0: "hunyuan-video",
    MochiAttnProcessor2_0: "mochi",
    CogVideoXAttnProcessor2_0: "cogvideox",
    # Same math with fused q/k/v weights (`fuse_qkv_projections`) or another kernel (xformers, slicing,
    # NPU). They name the family; CoreAttnProcessor itself always uses the unfused to_q/to_k/to_v and falls
    # back to the canonical stock processor above, which matches these up to rounding.
    FusedAttnProcessor2_0: "sd",
    XFormersAttnProcessor: "sd",
    SlicedAttnProcessor: "sd",
    AttnProcessorNPU: "sd",
    FusedJointAttnProcessor2_0: "sd3",
    XFormersJointAttnProcessor: "sd3",
    FusedCogVideoXAttnProcessor2_0: "cogvideox",
}


def get_family(name: str) -> Family:
    """The :class:`Family` called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown attention family {name!r}; known: {sorted(FAMILIES)}") from None


def stock_processor_for(family: str, attn: nn.Module | None = None) -> Any:
    """A fresh stock diffusers processor of ``family`` (for ``"sd"``, ``AttnProcessor`` if ``attn.scale_qk`` is False)."""
    return get_family(family).stock_type(attn)()


def family_of_processor(proc: Any) -> str | None:
    """The family of a stock processor instance or class (or of a processor with an explicit ``family``)."""
    cls = proc if isinstance(proc, type) else type(proc)
    fam = _STOCK_FAMILIES.get(cls)
    if fam is not None:
        return fam
    explicit = getattr(proc, "family", None) if not isinstance(proc, type) else None
    return explicit if isinstance(explicit, str) and explicit in FAMILIES else None


def _head_dim(attn: nn.Module) -> int:
    return attn.inner_dim // attn.heads


def _norm_over_head_dim(norm: nn.Module, cls: type, head_dim: int) -> bool:
    # Exact type: FP32LayerNorm subclasses nn.LayerNorm but belongs to other models. The "across heads"
    # variants (LTX, Lumina) normalise heads * head_dim features and are not ours either.
    if type(norm) is not cls:
        return False
    shape = norm.normalized_shape if isinstance(norm, nn.LayerNorm) else norm.dim
    return tuple(shape) == (head_dim,)


def infer_family(attn: nn.Module, *, has_rotary: bool | None = None) -> str:
    """The stock processor family of attention module ``attn`` (rules in the module docstring).

    ``has_rotary`` (whether the call carries rotary embeddings) is only needed to tell an SD3.5 joint block
    from a HunyuanVideo dual-stream block, which diffusers builds with identical arguments.
    """
    recorded = getattr(attn, FAMILY_ATTR, None)
    if isinstance(recorded, str) and recorded in FAMILIES:
        return recorded
    proc = getattr(attn, "processor", None)
    if proc is not None:
        fam = family_of_processor(proc)
        if fam is not None:
            return fam

    cls_name = type(attn).__name__
    by_class = {"WanAttention": "wan", "FluxAttention": "flux", "MochiAttention": "mochi"}
    if cls_name in by_class:
        return by_class[cls_name]

    if isinstance(attn, Attention):
        head_dim = _head_dim(attn)
        # add_q_proj is not even set when added_kv_proj_dim is given without context_pre_only.
        if getattr(attn, "add_q_proj", None) is not None:
            if attn.norm_q is None or attn.context_pre_only:
                return "sd3"
            if has_rotary is not None:
                return "hunyuan-video" if has_rotary else "sd3"
            raise ValueError(
                "ambiguous joint attention module: SD3(.5) and HunyuanVideo dual-stream blocks are built "
                "identically; pass has_rotary, install_processor()/set_processor_names() while the stock "
                "processor is still set, or give CoreAttnProcessor an explicit family"
            )
        if attn.add_k_proj is not None:
            raise ValueError(
                "Attention with added k/v projections but no added query (AttnAddedKVProcessor models) is "
                f"not supported; supported: {SUPPORTED_MODELS}"
            )
        if attn.pre_only:
            return "hunyuan-video"
        if attn.is_cross_attention:
            return "sd"
        if attn.norm_q is None:
            return "sd"
        if _norm_over_head_dim(attn.norm_q, nn.LayerNorm, head_dim):
            return "cogvideox"
        if _norm_over_head_dim(attn.norm_q, RMSNorm, head_dim):
            return "sd3"

    raise ValueError(
        f"cannot infer the attention family of {cls_name}; supported models: {SUPPORTED_MODELS}. "
        "Pass family=... to CoreAttnProcessor for other modules whose stock processor is one of these."
    )
