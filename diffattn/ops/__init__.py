"""Tensor ops: the block-sparse attention engine and the math methods share."""

from .block_mask import BlockMask, text_dense_ranges
from .block_sparse_attention import BACKENDS, block_sparse_attention, resolve_backend, sdpa_reference
from .gather_attention import gather_attention

__all__ = [
    "BACKENDS",
    "BlockMask",
    "block_sparse_attention",
    "gather_attention",
    "resolve_backend",
    "sdpa_reference",
    "text_dense_ranges",
]
