"""Diffusers attention processors: the generic core processor and one method per file.

Each method file defines its config, its processor and a ``Method`` record; :mod:`diffattn.api` registers
the built-in ones.
"""

from .agent import AgentAttnProcessor, AgentConfig, PooledAgentAttnProcessor
from .core import CoreAttnProcessor
from .hilbert_local import HilbertLocalAttnProcessor, HilbertLocalConfig
from .lamamba import LaMambaAttnProcessor, LaMambaConfig
from .layout import TokenLayout, dense_core
from .radial import RadialAttnProcessor, RadialConfig
from .roi import RegionInstances, RegionMaskAttnProcessor, ROICtrlAttnProcessor, set_instances

__all__ = [
    "AgentAttnProcessor",
    "AgentConfig",
    "CoreAttnProcessor",
    "HilbertLocalAttnProcessor",
    "HilbertLocalConfig",
    "LaMambaAttnProcessor",
    "LaMambaConfig",
    "PooledAgentAttnProcessor",
    "ROICtrlAttnProcessor",
    "RadialAttnProcessor",
    "RadialConfig",
    "RegionInstances",
    "RegionMaskAttnProcessor",
    "TokenLayout",
    "dense_core",
    "set_instances",
]
