"""``FluxAttnProcessor`` on ``FluxAttention``: Flux double- and single-stream blocks."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
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
)


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
                    f"single-stream Flux attention {layer_name(attn) or ''} needs the number of text tokens: pass "
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
            self.name, n_text=n_text, text_position=text_run_position(n_text, "first"), layer=layer_name(attn)
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

        q, k, v = to_heads_first(query, key, value)
        mask = head_mask(call.attention_mask, q.shape[0], k.shape[2])
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
