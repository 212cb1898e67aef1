"""``CogVideoXAttnProcessor2_0``: CogVideoX joint attention (text first)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    CogVideoXAttnProcessor2_0,
)
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from ..layout import TokenLayout
from .base import (
    Attend,
    AttnCall,
    Family,
    layer_name,
    text_run_position,
)


class CogVideoXFamily(Family):
    """``CogVideoXAttnProcessor2_0``: text first, rotary embeddings on the visual part only."""

    name = "cogvideox"
    stock_cls = CogVideoXAttnProcessor2_0

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        n_text = call.encoder_hidden_states.shape[1]
        return TokenLayout(
            self.name, n_text=n_text, text_position=text_run_position(n_text, "first"), layer=layer_name(attn)
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
