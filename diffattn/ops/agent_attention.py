"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention").

A small set of agent tokens ``A`` sits between queries and keys::

    O = softmax(Q A^T * s2) @ (softmax(A K^T * s1) @ V) + k_shortcut * V

which costs O(N n) for n agents instead of O(N^2). Pure tensor math: the processors in
:mod:`diffattn.processors.agent` and the trainable :class:`diffattn.models.AgentAttention` both call it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _to_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    scale: float | None = None,
    agent_scale: float | None = None,
    shortcut: float = 0.0,
    key_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Agent attention on ``(batch, heads, tokens, head_dim)`` tensors.

    ``softmax(q agents^T * agent_scale + query_bias) @ (softmax(agents k^T * scale + key_bias) @ v)
    + shortcut * v``.

    Args:
        q: ``(B, H, M, d)`` queries; k, v: ``(B, H, N, d)``; agents: ``(B, H, n, d)``.
        scale: agent-key scale, default ``d ** -0.5``; agent_scale: query-agent scale, default ``scale``.
        shortcut: weight of ``v`` added to the output (needs ``M == N``).
        key_bias: additive ``(.., n, N)`` bias of the agent-key logits; query_bias: ``(.., M, n)``.
        key_mask: boolean (True keeps) or additive mask of the keys, broadcast over the agents.
        upcast: compute both stages in float32 when inputs are float16/bfloat16. Off by default: SDPA's
            fused kernels keep the softmax statistics in fp32 already, and on GPU fp32 inputs leave the
            fast fp16 kernels (an H200 took 2.7 ms instead of under 1 ms for the two stages at 1024 px).
    """
    if shortcut and q.shape[-2] != v.shape[-2]:
        raise ValueError(f"shortcut needs as many queries as values, got {q.shape[-2]} and {v.shape[-2]}")
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v, agents = q.float(), k.float(), v.float(), agents.float()
    work = q.dtype
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    agent_scale = scale if agent_scale is None else agent_scale
    mask1 = _to_additive(key_mask, work) if key_bias is not None else key_mask
    if key_bias is not None:
        mask1 = key_bias.to(work) if mask1 is None else key_bias.to(work) + mask1
    mask2 = None if query_bias is None else query_bias.to(work)
    # Both stages are ordinary softmax attention: SDPA's fused kernels never build the logits in full.
    agent_v = F.scaled_dot_product_attention(agents, k, v, attn_mask=mask1, scale=scale)
    out = F.scaled_dot_product_attention(q, agents, agent_v, attn_mask=mask2, scale=agent_scale)
    if shortcut:
        out = out + shortcut * v
    return out.to(dtype)


def agent_grid(grid: tuple[int, int, int], num_agents: int, agent_frames: int | None = None) -> tuple[int, int, int]:
    """The ``(frames, height, width)`` agent grid for a token grid: about ``num_agents`` per frame, with
    the token grid's aspect ratio, never larger than the token grid."""
    f, h, w = grid
    af = f if agent_frames is None else min(agent_frames, f)
    ah = max(1, min(h, round(math.sqrt(num_agents * h / w))))
    aw = max(1, min(w, num_agents // ah))
    return (af, ah, aw)


def pool_agents(q: torch.Tensor, grid: tuple[int, int, int], agents: tuple[int, int, int]) -> torch.Tensor:
    """Adaptive average pooling of visual queries ``(B, H, f*h*w, d)`` to ``(B, H, af*ah*aw, d)``."""
    b, heads, n, d = q.shape
    f, h, w = grid
    if f * h * w != n:
        raise ValueError(f"grid {grid} has {f * h * w} tokens, the queries have {n}")
    x = q.reshape(b * heads, f, h, w, d).permute(0, 4, 1, 2, 3)
    x = F.adaptive_avg_pool3d(x, agents)
    # contiguous: SDPA's fused CPU kernel needs a unit stride on head_dim (else it takes the math path)
    return x.flatten(2).transpose(1, 2).reshape(b, heads, -1, d).contiguous()
