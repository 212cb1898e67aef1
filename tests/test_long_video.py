"""diffattn.pipelines.long_video_decoding: the VAE's tiling and slicing switched on, and put back exactly."""

from __future__ import annotations

import pytest
import torch
from diffattn.pipelines import long_video_decoding

from diffattn import zoo

# (zoo pipeline, latent height/width, tile_size): sizes where the tiles cover the latent in >= 2 steps
# and no edge tile is narrower than the tiny VAEs' first convolution
CASES = [("wan", 8, 48), ("hunyuan-video", 8, 48), ("mochi", 8, 48), ("cogvideox", 36, None)]


def _latent(vae: torch.nn.Module, frames: int, side: int) -> torch.Tensor:
    channels = vae.config.get("z_dim") or vae.config.latent_channels
    return torch.randn(1, channels, frames, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,side,tile", CASES)
def test_tiled_decode_runs_and_restore_is_exact(name: str, side: int, tile: int | None, monkeypatch) -> None:
    pipe = zoo.load(name)
    vae = pipe.vae
    before = {k: v for k, v in vars(vae).items() if k.startswith(("tile_", "use_"))}
    z = _latent(vae, 4, side)
    calls = []
    tiled = vae.tiled_decode
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, **k: calls.append(1) or tiled(*a, **k))
    with torch.no_grad():
        ref = vae.decode(z).sample
        assert calls == []  # the stock VAE does not tile
        with long_video_decoding(pipe, tile_size=tile) as handle:
            assert handle.active and vae.use_tiling and vae.use_slicing
            out = vae.decode(z).sample
        assert calls == [1]  # the tiled path ran
        assert not handle.active
        after = vae.decode(z).sample
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # tiles really decoded differently (random weights, per-tile norms)
    assert torch.equal(after, ref)  # restore is bit-identical
    assert {k: v for k, v in vars(vae).items() if k.startswith(("tile_", "use_"))} == before


def test_tile_sizes_and_time_tiles() -> None:
    vae = zoo.load("hunyuan-video").vae
    with long_video_decoding(vae, tile_size=128, tile_frames=8) as handle:
        s = handle.settings
        assert (s["tile_sample_min_height"], s["tile_sample_stride_height"]) == (128, 96)
        assert (s["tile_sample_min_num_frames"], s["tile_sample_stride_num_frames"]) == (8, 6)
    assert vae.tile_sample_min_num_frames == 16 and vae.use_tiling is False


def test_slicing_decodes_each_video_alone() -> None:
    pipe = zoo.load("wan")
    z = torch.cat([_latent(pipe.vae, 2, 4), _latent(pipe.vae, 2, 4) * 0.5])
    with torch.no_grad():
        batched = pipe.vae.decode(z).sample
        with long_video_decoding(pipe, slicing=True):
            sliced = pipe.vae.decode(z).sample  # 32 px frames: below the tile size, so only slicing acts
    torch.testing.assert_close(sliced, batched, atol=1e-5, rtol=1e-5)


def test_bad_input() -> None:
    pipe = zoo.load("wan")
    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        long_video_decoding(pipe, tile_size=0)
    with pytest.raises(ValueError, match="tile_frames must be a positive int"):
        long_video_decoding(pipe, tile_frames=2.5)
    with pytest.raises(ValueError, match="tile_size must be >= 11 for AutoencoderKLWan"):
        long_video_decoding(pipe, tile_size=8)  # 6 px stride: less than one latent pixel
    with pytest.raises(ValueError, match="tile_frames must be >= 6 for AutoencoderKLHunyuanVideo"):
        long_video_decoding(zoo.load("hunyuan-video"), tile_frames=4)
    with pytest.raises(ValueError, match="tile_frames: AutoencoderKLWan does not tile time"):
        long_video_decoding(pipe, tile_frames=8)
    with pytest.raises(ValueError, match="tile_size: AutoencoderKLCogVideoX"):
        long_video_decoding(zoo.load("cogvideox"), tile_size=96)
    with pytest.raises(ValueError, match="pipe_or_vae: expected a diffusers pipeline with a `vae`"):
        long_video_decoding(object())
    assert pipe.vae.use_tiling is False  # nothing was switched by the failed calls


def test_pixel_space_vae_warns_and_is_unchanged() -> None:
    from diffattn.testbed.models import PixelSpaceVideoVAE

    vae = PixelSpaceVideoVAE()
    with pytest.warns(UserWarning, match="PixelSpaceVideoVAE has no tiling or slicing"):
        handle = long_video_decoding(vae)
    assert handle.settings == {}
    handle.restore()
