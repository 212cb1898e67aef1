"""Pipelines built on diffattn: regional control, high resolution, LaMamba-Diff, long-video decoding."""

from .high_res import HighResPipeline
from .lamamba_diff import LaMambaDiffPipeline
from .long_video import VideoDecoding, long_video_decoding
from .regional_control import RegionalControlPipeline, draw_instances

__all__ = [
    "HighResPipeline",
    "LaMambaDiffPipeline",
    "RegionalControlPipeline",
    "VideoDecoding",
    "draw_instances",
    "long_video_decoding",
]
