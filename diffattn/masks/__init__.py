"""Pure index math: which query block sees which key block."""

from .radial import radial_block_mask, radial_density, radial_mask, radial_token_mask

__all__ = ["radial_block_mask", "radial_density", "radial_mask", "radial_token_mask"]
from .hilbert import hilbert_order, raster_order, token_order, window_order  # noqa: E402
from .local import block_fill, local_block_mask, local_density, local_token_mask  # noqa: E402

__all__ += ["block_fill", "hilbert_order", "local_block_mask", "local_density", "local_token_mask"]
__all__ += ["raster_order", "token_order", "window_order"]
