"""Tensor ops: the block-sparse attention engine and the math the methods share (agent attention, ROI
align / unpool, token merging, window partition, the selective scan). No diffusers here."""

from . import native_cpu
from .agent_attention import agent_attention, agent_grid, pool_agents
from .block_mask import BlockMask, text_dense_ranges
from .block_sparse_attention import BACKENDS, block_sparse_attention, resolve_backend, sdpa_reference
from .gather_attention import gather_attention
from .roi_align import roi_align, roi_size_for_downsample
from .roi_unpool import roi_unpool
from .selective_scan import selective_scan, selective_scan_chunked, selective_scan_ref
from .window_partition import merge_windows, partition_windows, window_mask, window_plan

__all__ = [
    "BACKENDS",
    "BlockMask",
    "agent_attention",
    "agent_grid",
    "block_sparse_attention",
    "gather_attention",
    "merge_windows",
    "native_cpu",
    "partition_windows",
    "pool_agents",
    "resolve_backend",
    "roi_align",
    "roi_size_for_downsample",
    "roi_unpool",
    "sdpa_reference",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "text_dense_ranges",
    "window_mask",
    "window_plan",
]
