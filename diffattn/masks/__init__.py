"""Pure index math: which query block sees which key block."""

from .radial import radial_block_mask, radial_density, radial_mask, radial_token_mask

__all__ = ["radial_block_mask", "radial_density", "radial_mask", "radial_token_mask"]
