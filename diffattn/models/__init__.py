"""New nn.Modules: the trainable agent-attention module, the ROICtrl adapter, LaMamba blocks and model."""

from .agent_attention import AgentAttention
from .lamamba import LaMambaBlock, LaMambaDiffModel
from .roictrl import ROICtrlAdapter
from .ss2d import SS2D
from .window_attention import WindowAttention

__all__ = ["SS2D", "AgentAttention", "LaMambaBlock", "LaMambaDiffModel", "ROICtrlAdapter", "WindowAttention"]
