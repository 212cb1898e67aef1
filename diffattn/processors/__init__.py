"""Diffusers attention processors: the generic core processor and one method family per file.

Importing this package registers the built-in methods.
"""

from . import dense  # noqa: F401  (registers "dense")
from .agent import AgentAttnProcessor, AgentConfig, PooledAgentAttnProcessor  # noqa: F401  (registers "agent")
from .core import CoreAttnProcessor
from .layout import TokenLayout, dense_core
from .radial import RadialAttnProcessor, RadialConfig  # registers "radial"

__all__ = ["CoreAttnProcessor", "RadialAttnProcessor", "RadialConfig", "TokenLayout", "dense_core"]
