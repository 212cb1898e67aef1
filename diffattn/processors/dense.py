"""``dense``: every layer through diffattn's processor with plain SDPA.

The baseline every method is measured against, and the check that diffattn's processors reproduce
the stock ones (same projections, norms, rotary embeddings and text handling) on each model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..context import AttentionContext
from ..ops.block_mask import BlockMask, num_blocks
from ..registry import LayerInfo, Method
from .core import CoreAttnProcessor
from .families import FAMILIES
from .layout import TokenLayout, dense_core


@dataclass(frozen=True)
class DenseConfig:
    """No options: dense attention is the reference."""


class DenseAttnProcessor(CoreAttnProcessor):
    """Dense attention through diffattn's processor, on the backend ``set_attention_backend`` chose."""

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """:func:`dense_core` on this processor's ``_attention_backend`` (else the active backend)."""
        return dense_core(q, k, v, layout, attn_mask, backend=self._attention_backend)


def _make(config: DenseConfig, ctx: AttentionContext, layer: LayerInfo) -> CoreAttnProcessor:
    return DenseAttnProcessor(family=layer.family)


def _full_mask(config: DenseConfig, grid, n_text: int, text_position, block_size: int) -> BlockMask:
    n = grid[0] * grid[1] * grid[2] + n_text
    nb = num_blocks(n, block_size)
    return BlockMask(torch.ones(nb, nb, dtype=torch.bool), n, n, block_size)


METHOD = Method(
    name="dense",
    config=DenseConfig,
    families=tuple(FAMILIES),
    make_processor=_make,
    block_mask=_full_mask,
    description="dense SDPA through diffattn's processors: the reference for every method",
)
