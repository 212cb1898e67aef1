"""New nn.Modules (LaMamba blocks, ROI adapter)."""

from .agent_attention import AgentAttention

__all__ = ["AgentAttention"]
from .roictrl import ROICtrlAdapter  # noqa: E402

__all__ += ["ROICtrlAdapter"]
from .lamamba import LaMambaBlock, LaMambaDiffModel  # noqa: E402
from .ss2d import SS2D  # noqa: E402
from .window_attention import WindowAttention  # noqa: E402

__all__ += ["LaMambaBlock", "LaMambaDiffModel", "SS2D", "WindowAttention"]
