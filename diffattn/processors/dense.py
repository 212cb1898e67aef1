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
from .layout import dense_core


@dataclass(frozen=True)
class DenseConfig:
    """No options: dense attention is the reference."""


def _make(config: DenseConfig, ctx: AttentionContext, layer: LayerInfo) -> CoreAttnProcessor:
    return CoreAttnProcessor(core=dense_core, family=layer.family)


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
