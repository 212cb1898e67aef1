"""The stock diffusers attention processors, re-expressed with a pluggable attention core.

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

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
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
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn

from .layout import TextPosition, TokenLayout

__all__ = [
    "FAMILIES",
    "AttnCall",
    "Family",
    "family_of_processor",
    "get_family",
    "infer_family",
    "stock_processor_for",
]

# Attributes recorded on attention modules (plain python attributes, not buffers: they never reach a state dict).
NAME_ATTR = "_diffattn_name"
FAMILY_ATTR = "_diffattn_family"
TEXT_ONLY_ATTR = "_diffattn_text_only"

# Wan hardcodes the text context length of its I2V cross-attention: the first `len - 512` encoder tokens are
# the image context.
WAN_TEXT_CONTEXT = 512

Attend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout, "torch.Tensor | None"], torch.Tensor
]

SUPPORTED_MODELS = (
    "UNet2DConditionModel / ControlNetModel / PixArtTransformer2DModel / AutoencoderKL (Attention + AttnProcessor2_0), "
    "SD3Transformer2DModel (Attention + JointAttnProcessor2_0), FluxTransformer2DModel (FluxAttention), "
    "WanTransformer3DModel (WanAttention), HunyuanVideoTransformer3DModel (Attention + HunyuanVideoAttnProcessor2_0), "
    "MochiTransformer3DModel (MochiAttention), CogVideoXTransformer3DModel (Attention + CogVideoXAttnProcessor2_0)"
)


@dataclass
class AttnCall:
    """The arguments of one processor call, whatever names the calling module used for them."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    rotary: Any = None  # `image_rotary_emb` (Flux, HunyuanVideo, Mochi, CogVideoX) or `rotary_emb` (Wan)
    temb: torch.Tensor | None = None  # only read by `spatial_norm` in the "sd" family
    text_len: int | None = None  # text tokens at the start of a single-stream Flux sequence


def _head_mask(mask: torch.Tensor | None, batch: int, n_keys: int) -> torch.Tensor | None:
    """What diffusers' native dispatch backend does to a mask before SDPA: (batch, keys) -> (batch, 1, 1, keys)."""
    if mask is not None and mask.ndim == 2 and mask.shape[0] == batch and mask.shape[1] == n_keys:
        return mask.unsqueeze(1).unsqueeze(1)
    return mask


def _valid_key_counts(mask: torch.Tensor | None, batch: int, keys: slice) -> torch.Tensor | None:
    """Per-sample number of keys in ``keys`` that ``mask`` lets through, read from the first query row.

    Only meaningful for key-padding masks (HunyuanVideo's ``(batch, 1, 1, tokens)``, its token refiner's
    ``(batch, 1, tokens, tokens)`` whose first row is the key mask); stays on the mask's device, no sync.
    """
    if mask is None:
        return None
    m = mask
    while m.ndim > 2:
        m = m[:, 0]
    m = m[:, keys]
    valid = m if m.dtype == torch.bool else m == 0  # additive masks: 0 keeps, negative drops
    counts = valid.sum(-1)
    if counts.shape[0] != batch:
        counts = counts.expand(batch) if counts.shape[0] == 1 else counts.reshape(batch, -1)[:, 0]
    return counts


def _to_heads_first(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # dispatch_attention_fn takes (batch, tokens, heads, dim); cores take (batch, heads, tokens, dim).
    return tuple(x.transpose(1, 2) for x in xs)


class Family:
    """One stock processor: its layout, its math with a pluggable core, and how to call the stock one."""

    name: ClassVar[str]
    stock_cls: ClassVar[type]

    def stock_type(self, attn: nn.Module | None = None) -> type:
        """The stock processor class diffusers uses for this family (on ``attn``, when given)."""
        return self.stock_cls

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        raise NotImplementedError

    def run(self, attn: nn.Module, call: AttnCall, layout: TokenLayout, attend: Attend) -> Any:
        raise NotImplementedError

    def call_stock(self, proc: Any, attn: nn.Module, call: AttnCall) -> Any:
        return proc(
            attn,
            call.hidden_states,
            encoder_hidden_states=call.encoder_hidden_states,
            attention_mask=call.attention_mask,
            image_rotary_emb=call.rotary,
        )


def _layer(attn: nn.Module) -> str | None:
    return getattr(attn, NAME_ATTR, None)


def _position(n_text: int, where: TextPosition) -> TextPosition | None:
    # TokenLayout: text_position is None when there is no text run.
    return where if n_text else None


class SDFamily(Family):
    """``AttnProcessor2_0`` (and ``AttnProcessor`` when ``scale_qk=False``) on ``Attention``."""

    name = "sd"
    stock_cls = AttnProcessor2_0

    def stock_type(self, attn: nn.Module | None = None) -> type:
        # Attention picks the classic processor when it must not use SDPA's default 1/sqrt(d) scale.
        if attn is not None and not getattr(attn, "scale_qk", True):
            return AttnProcessor
        return AttnProcessor2_0

    def call_stock(self, proc: Any, attn: nn.Module, call: AttnCall) -> Any:
        return proc(
            attn,
            call.hidden_states,
            encoder_hidden_states=call.encoder_hidden_states,
            attention_mask=call.attention_mask,
            temb=call.temb,
        )

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        hs = call.hidden_states
        if getattr(attn, TEXT_ONLY_ATTR, False) and call.encoder_hidden_states is None:
            # HunyuanVideo's token refiner: self-attention over the prompt tokens only.
            n = hs.shape[1] if hs.ndim == 3 else hs.shape[2] * hs.shape[3]
            valid = _valid_key_counts(call.attention_mask, hs.shape[0], slice(0, n))
            return TokenLayout(
                self.name, n_text=n, text_position=_position(n, "first"), text_valid=valid, layer=_layer(attn)
            )
        return TokenLayout(self.name, is_cross=call.encoder_hidden_states is not None, layer=_layer(attn))

    def run(self, attn: Attention, call: AttnCall, layout: TokenLayout, attend: Attend) -> torch.Tensor:
        # AttnProcessor2_0.__call__ with the SDPA call replaced.
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        attention_mask, temb = call.attention_mask, call.temb

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Cores use SDPA's 1/sqrt(head_dim) scale. A module built with scale_qk=False runs the classic
        # AttnProcessor with scale attn.scale (1.0); rescaling q gives the same logits. Like AttnProcessor2_0,
        # upcast_attention/upcast_softmax are not applied (the core decides its own precision).
        if not attn.scale_qk:
            query = query * (attn.scale * math.sqrt(head_dim))

        hidden_states = attend(query, key, value, layout, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class SD3Family(Family):
    """``JointAttnProcessor2_0``: text tokens appended after the image tokens."""

    name = "sd3"
    stock_cls = JointAttnProcessor2_0

    def call_stock(self, proc: Any, attn: nn.Module, call: AttnCall) -> Any:
        return proc(
            attn,
            call.hidden_states,
            encoder_hidden_states=call.encoder_hidden_states,
            attention_mask=call.attention_mask,
        )

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        if call.encoder_hidden_states is None:  # SD3.5 attn2: plain self-attention over image tokens
            return TokenLayout(self.name, layer=_layer(attn))
        n_text = call.encoder_hidden_states.shape[1]
        return TokenLayout(
            self.name, n_text=n_text, text_position=_position(n_text, "last"), layer=_layer(attn)
        )

    def run(self, attn: Attention, call: AttnCall, layout: TokenLayout, attend: Attend) -> Any:
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:

            def split_heads(x: torch.Tensor) -> torch.Tensor:
                return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

            encoder_query = split_heads(attn.add_q_proj(encoder_hidden_states))
            encoder_key = split_heads(attn.add_k_proj(encoder_hidden_states))
            encoder_value = split_heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=2)
            key = torch.cat([key, encoder_key], dim=2)
            value = torch.cat([value, encoder_value], dim=2)

        # The stock processor ignores attention_mask (SDPA without a mask).
        hidden_states = attend(query, key, value, layout, None)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxFamily(Family):
    """``FluxAttnProcessor``: text first, both in double-stream and single-stream blocks."""

    name = "flux"
    stock_cls = FluxAttnProcessor

    def call_stock(self, proc: Any, attn: nn.Module, call: AttnCall) -> Any:
        # FluxAttention.forward passes these five positionally.
        return proc(attn, call.hidden_states, call.encoder_hidden_states, call.attention_mask, call.rotary)

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        if call.encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            n_text = call.encoder_hidden_states.shape[1]
        else:
            # Single-stream block: hidden_states is already [text; image] and the module cannot tell where
            # the text ends. See CoreAttnProcessor (text_len argument / track_text_len hooks).
            n_text = call.text_len
            if n_text is None:
                raise ValueError(
                    f"single-stream Flux attention {_layer(attn) or ''} needs the number of text tokens: pass "
                    "joint_attention_kwargs={'text_len': n} to the transformer, call "
                    "diffattn.processors.core.track_text_len(transformer) (install_processor does), or build "
                    "CoreAttnProcessor(text_len=n)"
                )
            if not 0 <= n_text <= call.hidden_states.shape[1]:
                raise ValueError(
                    f"text_len={n_text} does not fit a sequence of {call.hidden_states.shape[1]}"
                )
        # Flux masks are arbitrary (batch, heads, q, k) masks (e.g. regional prompting), so no text_valid.
        return TokenLayout(
            self.name, n_text=n_text, text_position=_position(n_text, "first"), layer=_layer(attn)
        )

    def run(self, attn: nn.Module, call: AttnCall, layout: TokenLayout, attend: Attend) -> Any:
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        # Unfused projections always (peft LoRA wraps to_q/to_k/to_v), even when attn.fused_projections.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if call.rotary is not None:
            query = apply_rotary_emb(query, call.rotary, sequence_dim=1)
            key = apply_rotary_emb(key, call.rotary, sequence_dim=1)

        q, k, v = _to_heads_first(query, key, value)
        mask = _head_mask(call.attention_mask, q.shape[0], k.shape[2])
        hidden_states = attend(q, k, v, layout, mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _wan_rotary(
    hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
) -> torch.Tensor:
    # Copy of the closure inside WanAttnProcessor.__call__.
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanFamily(Family):
    """``WanAttnProcessor``: attn1 self-attention over video tokens, attn2 cross-attention (+ I2V image k/v)."""

    name = "wan"
    stock_cls = WanAttnProcessor

    def call_stock(self, proc: Any, attn: nn.Module, call: AttnCall) -> Any:
        # WanAttention.forward passes these five positionally.
        return proc(attn, call.hidden_states, call.encoder_hidden_states, call.attention_mask, call.rotary)

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        return TokenLayout(self.name, is_cross=call.encoder_hidden_states is not None, layer=_layer(attn))

    def run(self, attn: nn.Module, call: AttnCall, layout: TokenLayout, attend: Attend) -> torch.Tensor:
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - WAN_TEXT_CONTEXT
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        kv_source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(kv_source)
        value = attn.to_v(kv_source)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if call.rotary is not None:
            query = _wan_rotary(query, *call.rotary)
            key = _wan_rotary(key, *call.rotary)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img = attn.add_k_proj(encoder_hidden_states_img)
            value_img = attn.add_v_proj(encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))

            # The image-prompt branch is a second cross-attention with the same queries (stock: no mask).
            q, k, v = _to_heads_first(query, key_img, value_img)
            hidden_states_img = attend(q, k, v, layout, None).transpose(1, 2)
            hidden_states_img = hidden_states_img.flatten(2, 3)
            hidden_states_img = hidden_states_img.type_as(query)

        q, k, v = _to_heads_first(query, key, value)
        mask = _head_mask(call.attention_mask, q.shape[0], k.shape[2])
        hidden_states = attend(q, k, v, layout, mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


class HunyuanVideoFamily(Family):
    """``HunyuanVideoAttnProcessor2_0``: text last, dual-stream (add_q_proj) and single-stream blocks."""

    name = "hunyuan-video"
    stock_cls = HunyuanVideoAttnProcessor2_0

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        ehs = call.encoder_hidden_states
        if ehs is None:
            return TokenLayout(self.name, layer=_layer(attn))
        n_text = ehs.shape[1]
        n = call.hidden_states.shape[1] + n_text
        # The model's mask is (batch, 1, 1, tokens): True for visual tokens and the valid prefix of the text.
        valid = _valid_key_counts(call.attention_mask, call.hidden_states.shape[0], slice(n - n_text, n))
        return TokenLayout(
            self.name,
            n_text=n_text,
            text_position=_position(n_text, "last"),
            text_valid=valid,
            layer=_layer(attn),
        )

    def run(self, attn: Attention, call: AttnCall, layout: TokenLayout, attend: Attend) -> Any:
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        image_rotary_emb = call.rotary
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                n_text = encoder_hidden_states.shape[1]
                query = torch.cat(
                    [
                        apply_rotary_emb(query[:, :-n_text], image_rotary_emb, sequence_dim=1),
                        query[:, -n_text:],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :-n_text], image_rotary_emb, sequence_dim=1), key[:, -n_text:]],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        q, k, v = _to_heads_first(query, key, value)
        mask = _head_mask(call.attention_mask, q.shape[0], k.shape[2])
        hidden_states = attend(q, k, v, layout, mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


def _mochi_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Copy of the closure inside MochiAttnProcessor2_0.__call__.
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiFamily(Family):
    """``MochiAttnProcessor2_0``: text last; invalid text tokens are dropped per sample."""

    name = "mochi"
    stock_cls = MochiAttnProcessor2_0

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        # Batch-level layout, used to decide `applies`; the core itself is called once per sample with the
        # invalid text tokens removed (see run).
        n_text = call.encoder_hidden_states.shape[1]
        mask = call.attention_mask
        valid = None if mask is None else (mask.reshape(mask.shape[0], -1) != 0).sum(-1)
        return TokenLayout(
            self.name,
            n_text=n_text,
            text_position=_position(n_text, "last"),
            text_valid=valid,
            layer=_layer(attn),
        )

    def run(self, attn: nn.Module, call: AttnCall, layout: TokenLayout, attend: Attend) -> Any:
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        attention_mask, image_rotary_emb = call.attention_mask, call.rotary

        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))

        if attn.norm_added_q is not None:
            encoder_query = attn.norm_added_q(encoder_query)
        if attn.norm_added_k is not None:
            encoder_key = attn.norm_added_k(encoder_key)

        if image_rotary_emb is not None:
            query = _mochi_rotary(query, *image_rotary_emb)
            key = _mochi_rotary(key, *image_rotary_emb)

        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        encoder_query, encoder_key, encoder_value = (
            encoder_query.transpose(1, 2),
            encoder_key.transpose(1, 2),
            encoder_value.transpose(1, 2),
        )

        sequence_length = query.size(2)
        encoder_sequence_length = encoder_query.size(2)
        total_length = sequence_length + encoder_sequence_length

        batch_size = query.shape[0]
        attn_outputs = []
        for idx in range(batch_size):
            # Same per-sample loop as stock: the core sees only this sample's valid text tokens.
            mask = attention_mask[idx][None, :]
            valid_prompt_token_indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
            n_valid = valid_prompt_token_indices.shape[0]

            valid_query = torch.cat(
                [query[idx : idx + 1], encoder_query[idx : idx + 1, :, valid_prompt_token_indices]], dim=2
            )
            valid_key = torch.cat(
                [key[idx : idx + 1], encoder_key[idx : idx + 1, :, valid_prompt_token_indices]], dim=2
            )
            valid_value = torch.cat(
                [value[idx : idx + 1], encoder_value[idx : idx + 1, :, valid_prompt_token_indices]], dim=2
            )

            sample_layout = replace(
                layout,
                n_text=n_valid,
                text_position=_position(n_valid, "last"),
                text_valid=(mask.reshape(1, -1) != 0).sum(-1),
            )
            attn_output = attend(valid_query, valid_key, valid_value, sample_layout, None)
            valid_sequence_length = attn_output.size(2)
            attn_output = F.pad(attn_output, (0, 0, 0, total_length - valid_sequence_length))
            attn_outputs.append(attn_output)

        hidden_states = torch.cat(attn_outputs, dim=0)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3)

        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
            (sequence_length, encoder_sequence_length), dim=1
        )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        # The last Mochi block (context_pre_only) has no to_add_out: stock returns the raw text output.
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


class CogVideoXFamily(Family):
    """``CogVideoXAttnProcessor2_0``: text first, rotary embeddings on the visual part only."""

    name = "cogvideox"
    stock_cls = CogVideoXAttnProcessor2_0

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        n_text = call.encoder_hidden_states.shape[1]
        return TokenLayout(
            self.name, n_text=n_text, text_position=_position(n_text, "first"), layer=_layer(attn)
        )

    def run(self, attn: Attention, call: AttnCall, layout: TokenLayout, attend: Attend) -> Any:
        encoder_hidden_states, attention_mask, image_rotary_emb = (
            call.encoder_hidden_states,
            call.attention_mask,
            call.rotary,
        )
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, call.hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = attend(query, key, value, layout, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        # Stock has no cast here (SDPA keeps the dtype); a no-op unless a core returns another dtype.
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


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
