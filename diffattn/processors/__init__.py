"""Diffusers attention processors: the generic core processor and one method family per file.

Importing this package registers the built-in methods.
"""

from . import dense  # noqa: F401  (registers "dense")
from .agent import AgentAttnProcessor, AgentConfig, PooledAgentAttnProcessor  # noqa: F401  (registers "agent")
from .core import CoreAttnProcessor
from .layout import TokenLayout, dense_core
from .radial import RadialAttnProcessor, RadialConfig  # registers "radial"

__all__ = ["CoreAttnProcessor", "RadialAttnProcessor", "RadialConfig", "TokenLayout", "dense_core"]
from .hilbert_local import HilbertLocalAttnProcessor, HilbertLocalConfig  # noqa: E402  (registers "hilbert_local")

__all__ += ["HilbertLocalAttnProcessor", "HilbertLocalConfig"]
from .roi import RegionInstances, RegionMaskAttnProcessor, ROICtrlAttnProcessor, set_instances  # noqa: E402  (registers "roi", "regional_mask")

__all__ += ["RegionInstances", "RegionMaskAttnProcessor", "ROICtrlAttnProcessor", "set_instances"]
from .lamamba import LaMambaAttnProcessor, LaMambaConfig  # noqa: E402  (registers "lamamba")

__all__ += ["LaMambaAttnProcessor", "LaMambaConfig"]
