"""New nn.Modules (LaMamba blocks, ROI adapter)."""

from .agent_attention import AgentAttention

__all__ = ["AgentAttention"]
