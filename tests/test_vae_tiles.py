"""VAE tiles that apply at 1024 px (sd3fit.simpletuner.patches.vae_tiles)."""

import pytest
import torch

from sd3fit import presets, schema
from sd3fit.errors import UserError
from sd3fit.simpletuner.patches import vae_tiles


def tiny_vae(sample_size):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=sample_size)


def test_smaller_tiles_make_tiling_happen_below_the_vaes_sample_size_and_decode_the_same_picture():
    vae = tiny_vae(sample_size=128).eval()
    vae.enable_tiling()
    latents = torch.randn(1, 4, 64, 64)  # a 128 px image: diffusers would not tile it
    calls = []
    original = vae.tiled_decode
    vae.tiled_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    with torch.no_grad():
        whole = vae.decode(latents).sample
        assert calls == []
        assert vae_tiles.set_tiles(vae, 64)
        assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (64, 32)
        tiled = vae.decode(latents).sample
    assert calls == [1]
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.25 * whole.abs().mean()  # blended tiles (group norms see one tile): close, not equal


def test_a_tile_that_does_not_divide_is_refused_in_one_line():
    with pytest.raises(ValueError, match="multiple of 2"):
        vae_tiles.set_tiles(tiny_vae(64), 63)
    for bad in (32, 500):
        with pytest.raises(UserError, match="vae_tile_size"):
            schema.split(presets.load("lora-8gb", [f"vae_tile_size={bad}"]).values)
