"""The trainable agent attention module of the paper (Han et al., "Agent Attention"), for 2D token grids.

    attn = AgentAttention(dim=320, num_heads=8, num_agents=64)
    out = attn(x, height=64, width=64)                 # x: (batch, 64 * 64, 320)

    block.attn1 = AgentAttention.from_attention(block.attn1)   # from a pretrained diffusers Attention

Agents are the queries average-pooled to a ``sqrt(num_agents)`` square; agent-key and query-agent
logits get learned position biases (a ``bias_size x bias_size`` map per agent, bilinearly resized to
the token grid, plus per-row and per-column terms stored at ``window`` positions and linearly
resized), and a depthwise ``kernel x kernel`` convolution of ``V`` over the grid restores the local
detail agents average away. Projections are named like diffusers' ``Attention`` (``to_q``, ``to_k``,
``to_v``, ``to_out.0``) so peft LoRA recipes target them unchanged; the biases and the convolution are
ordinary parameters to train alongside (or to list in ``modules_to_save``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..ops.agent_attention import agent_attention, pool_agents

__all__ = ["AgentAttention"]


def _resize_1d(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linearly resize dimension ``dim`` of ``t`` to ``size`` (identity when it already has that size)."""
    if t.shape[dim] == size:
        return t
    moved = t.movedim(dim, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    out = F.interpolate(flat, size=size, mode="linear", align_corners=False)
    return out.reshape(*moved.shape[:-1], size).movedim(-1, dim)


class AgentAttention(ModelMixin, ConfigMixin):
    """Self-attention through ``num_agents`` pooled agent tokens, with agent biases and a depthwise conv.

    Args:
        dim: channels of the tokens.
        num_heads: attention heads (``dim`` must be divisible by it).
        num_agents: agent tokens, a perfect square (pooled to ``sqrt x sqrt``).
        qkv_bias: bias in ``to_q``/``to_k``/``to_v``; out_bias: bias in ``to_out.0``.
        bias_size: side of the per-agent 2D position-bias maps.
        window: positions at which the per-row / per-column biases are stored.
        kernel_size: of the depthwise convolution on ``V`` (odd).
        dropout: after the output projection.
    """

    @register_to_config
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        num_agents: int = 64,
        qkv_bias: bool = False,
        out_bias: bool = True,
        bias_size: int = 7,
        window: int = 16,
        kernel_size: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        side = math.isqrt(num_agents)
        if num_agents < 1 or side * side != num_agents:
            raise ValueError(f"num_agents must be a perfect square (agents are pooled to a square), got {num_agents}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if bias_size < 1 or window < 1:
            raise ValueError(f"bias_size and window must be >= 1, got {bias_size} and {window}")
        self.heads = num_heads
        self.agent_side = side
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=out_bias), nn.Dropout(dropout)])
        self.dwc = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        h, n = num_heads, num_agents
        # agent -> key biases (stage 1) and query -> agent biases (stage 2)
        self.an_bias = nn.Parameter(torch.zeros(h, n, bias_size, bias_size))
        self.ah_bias = nn.Parameter(torch.zeros(1, h, n, window, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, h, n, 1, window))
        self.na_bias = nn.Parameter(torch.zeros(h, n, bias_size, bias_size))
        self.ha_bias = nn.Parameter(torch.zeros(1, h, window, 1, n))
        self.wa_bias = nn.Parameter(torch.zeros(1, h, 1, window, n))
        for p in self._bias_parameters():
            nn.init.trunc_normal_(p, std=0.02)

    def _bias_parameters(self) -> list[nn.Parameter]:
        return [self.an_bias, self.ah_bias, self.aw_bias, self.na_bias, self.ha_bias, self.wa_bias]

    @classmethod
    def from_attention(cls, attn: nn.Module, num_agents: int = 64, **kwargs: Any) -> AgentAttention:
        """An ``AgentAttention`` with the projections of a diffusers self-attention ``Attention``.

        Biases and the depthwise convolution start at zero, so the new module computes plain agent
        attention with the pretrained projections; fine-tuning (e.g. LoRA on ``to_q``/``to_k``/
        ``to_v``/``to_out.0`` plus these parameters) adapts the model to it.
        """
        if getattr(attn, "is_cross_attention", False):
            raise ValueError("from_attention needs a self-attention module (this one is cross-attention)")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "group_norm", None) is not None:
            raise ValueError("from_attention does not carry over qk norms or group norms")
        dim = attn.to_q.in_features
        if attn.to_q.out_features != dim or attn.to_out[0].out_features != dim:
            raise ValueError("from_attention needs an Attention whose inner dim equals its query dim")
        module = cls(
            dim,
            num_heads=attn.heads,
            num_agents=num_agents,
            qkv_bias=attn.to_q.bias is not None,
            out_bias=attn.to_out[0].bias is not None,
            **kwargs,
        )
        module.to_q.load_state_dict(attn.to_q.state_dict())
        module.to_k.load_state_dict(attn.to_k.state_dict())
        module.to_v.load_state_dict(attn.to_v.state_dict())
        module.to_out[0].load_state_dict(attn.to_out[0].state_dict())
        with torch.no_grad():
            for p in module._bias_parameters():
                p.zero_()
            module.dwc.weight.zero_()
            module.dwc.bias.zero_()
        return module.to(device=attn.to_q.weight.device, dtype=attn.to_q.weight.dtype)

    def position_biases(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key_bias (1, heads, agents, h*w), query_bias (1, heads, h*w, agents))`` at a grid size."""
        heads, n = self.an_bias.shape[:2]
        an = F.interpolate(self.an_bias, size=(height, width), mode="bilinear", align_corners=False)
        ah = _resize_1d(self.ah_bias, height, 3)
        aw = _resize_1d(self.aw_bias, width, 4)
        key_bias = an.reshape(1, heads, n, -1) + (ah + aw).reshape(1, heads, n, -1)
        na = F.interpolate(self.na_bias, size=(height, width), mode="bilinear", align_corners=False)
        ha = _resize_1d(self.ha_bias, height, 2)
        wa = _resize_1d(self.wa_bias, width, 3)
        query_bias = na.reshape(1, heads, n, -1).transpose(-1, -2) + (ha + wa).reshape(1, heads, -1, n)
        return key_bias, query_bias

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``(batch, height * width, dim)`` -> same shape. Without ``height``/``width`` the grid is a square.

        ``encoder_hidden_states`` and ``attention_mask`` exist so the module can replace a diffusers
        ``attn1``; both must be ``None`` (agent attention here is self-attention over an image grid).
        """
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("AgentAttention is unmasked self-attention: encoder_hidden_states/attention_mask must be None")
        b, n, c = hidden_states.shape
        if height is None or width is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} tokens are not a square grid: pass height= and width=")
            height = width = side
        if height * width != n:
            raise ValueError(f"height x width = {height} x {width} does not match {n} tokens")
        d = c // self.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d).transpose(1, 2)

        q, k, v = heads(self.to_q(hidden_states)), heads(self.to_k(hidden_states)), heads(self.to_v(hidden_states))
        # adaptive pooling also works on grids smaller than the agent grid (agents then repeat tokens)
        agents = pool_agents(q, (1, height, width), (1, self.agent_side, self.agent_side))
        key_bias, query_bias = self.position_biases(height, width)
        out = agent_attention(q, k, v, agents, key_bias=key_bias, query_bias=query_bias)
        out = out.transpose(1, 2).reshape(b, n, c)
        v_img = v.transpose(1, 2).reshape(b, height, width, c).permute(0, 3, 1, 2)
        out = out + self.dwc(v_img).permute(0, 2, 3, 1).reshape(b, n, c)
        out = self.to_out[0](out)
        return self.to_out[1](out)
