"""Tensor ops: the block-sparse attention engine and the math methods share."""

from . import native_cpu
from .block_mask import BlockMask, text_dense_ranges
from .block_sparse_attention import BACKENDS, block_sparse_attention, resolve_backend, sdpa_reference
from .gather_attention import gather_attention

__all__ = [
    "BACKENDS",
    "BlockMask",
    "block_sparse_attention",
    "gather_attention",
    "native_cpu",
    "resolve_backend",
    "sdpa_reference",
    "text_dense_ranges",
]

from .roi_align import roi_align, roi_size_for_downsample  # noqa: E402
from .roi_unpool import roi_unpool  # noqa: E402

__all__ += ["roi_align", "roi_size_for_downsample", "roi_unpool"]

from .selective_scan import selective_scan, selective_scan_chunked, selective_scan_ref  # noqa: E402

__all__ += ["selective_scan", "selective_scan_chunked", "selective_scan_ref"]
