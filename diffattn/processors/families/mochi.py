"""``MochiAttnProcessor2_0`` on ``MochiAttention``: Mochi's joint attention with per-sample text padding."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    MochiAttnProcessor2_0,
)
from torch import nn

from ..layout import TokenLayout
from .base import (
    Attend,
    AttnCall,
    Family,
    layer_name,
    text_run_position,
)


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
            text_position=text_run_position(n_text, "last"),
            text_valid=valid,
            layer=layer_name(attn),
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
                text_position=text_run_position(n_valid, "last"),
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
