"""``AttnProcessor2_0`` on diffusers ``Attention``: SD 1.x/2.x/SDXL UNets, ControlNet, PixArt, VAEs."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
)
from torch import nn

from ..layout import TokenLayout
from .base import (
    TEXT_ONLY_ATTR,
    Attend,
    AttnCall,
    Family,
    layer_name,
    text_run_position,
    valid_key_counts,
)


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
            valid = valid_key_counts(call.attention_mask, hs.shape[0], slice(0, n))
            return TokenLayout(
                self.name, n_text=n, text_position=text_run_position(n, "first"), text_valid=valid, layer=layer_name(attn)
            )
        return TokenLayout(self.name, is_cross=call.encoder_hidden_states is not None, layer=layer_name(attn))

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
