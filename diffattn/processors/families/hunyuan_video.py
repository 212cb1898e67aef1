"""``HunyuanVideoAttnProcessor2_0``: HunyuanVideo dual- and single-stream blocks."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
)
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from torch import nn

from ..layout import TokenLayout
from .base import (
    Attend,
    AttnCall,
    Family,
    head_mask,
    layer_name,
    text_run_position,
    to_heads_first,
    valid_key_counts,
)


class HunyuanVideoFamily(Family):
    """``HunyuanVideoAttnProcessor2_0``: text last, dual-stream (add_q_proj) and single-stream blocks."""

    name = "hunyuan-video"
    stock_cls = HunyuanVideoAttnProcessor2_0

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        ehs = call.encoder_hidden_states
        if ehs is None:
            return TokenLayout(self.name, layer=layer_name(attn))
        n_text = ehs.shape[1]
        n = call.hidden_states.shape[1] + n_text
        # The model's mask is (batch, 1, 1, tokens): True for visual tokens and the valid prefix of the text.
        valid = valid_key_counts(call.attention_mask, call.hidden_states.shape[0], slice(n - n_text, n))
        return TokenLayout(
            self.name,
            n_text=n_text,
            text_position=text_run_position(n_text, "last"),
            text_valid=valid,
            layer=layer_name(attn),
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

        q, k, v = to_heads_first(query, key, value)
        mask = head_mask(call.attention_mask, q.shape[0], k.shape[2])
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
