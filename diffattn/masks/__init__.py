"""Pure index math: which query block sees which key block, token orders, and video token grids."""

from .hilbert import hilbert_order, raster_order, token_order, window_order
from .local import block_fill, local_block_mask, local_density, local_token_mask
from .radial import radial_block_mask, radial_density, radial_mask, radial_token_mask
from .video_geometry import VIDEO_MODELS, VideoGeometry, latent_grid

__all__ = [
    "VIDEO_MODELS",
    "VideoGeometry",
    "block_fill",
    "hilbert_order",
    "latent_grid",
    "local_block_mask",
    "local_density",
    "local_token_mask",
    "radial_block_mask",
    "radial_density",
    "radial_mask",
    "radial_token_mask",
    "raster_order",
    "token_order",
    "window_order",
]
