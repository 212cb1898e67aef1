"""Pipelines built on diffattn (regional control, high resolution, LaMamba-Diff)."""

from .high_res import HighResPipeline  # noqa: E402, F401
from .lamamba_diff import LaMambaDiffPipeline  # noqa: E402, F401
from .long_video import VideoDecoding, long_video_decoding  # noqa: E402, F401
from .regional_control import RegionalControlPipeline, draw_instances  # noqa: E402, F401
