"""VAE tiles small enough to matter at 1024 px (`vae_tile_size`, an sd3fit key, in pixels).

Upstream (simpletuner 4.10.1) `ModelFoundation.load_vae` calls diffusers' `AutoencoderKL.enable_tiling()` when
`vae_enable_tiling` is set; diffusers (0.42) then tiles only images larger than `config.sample_size`, which is 1024
for SD3's VAE, so at 1024 px nothing is tiled: decoding a validation image holds 256 MiB activations at full size
and is the largest thing a LoRA run allocates after its training step. This patch wraps `load_vae` and, when tiling
is on, sets the tile to `vae_tile_size` pixels (latent tile = pixels / the VAE's downsampling) with diffusers' own
overlap and blending; encoding for the latent cache and decoding for validation both use it.
"""

from __future__ import annotations

import functools

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
_tile_px: int | None = None


def set_tiles(vae, tile_px: int) -> bool:
    """Tile `vae` (a diffusers AutoencoderKL with tiling) every `tile_px` pixels; False when it has no such tiles."""
    if not all(hasattr(vae, name) for name in ("tile_sample_min_size", "tile_latent_min_size", "config")):
        return False
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if tile_px % factor:
        raise ValueError(f"vae_tile_size must be a multiple of {factor} (the VAE's downsampling), not {tile_px}")
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // factor
    return True


def _wrap(load_vae):
    @functools.wraps(load_vae)
    def wrapped(self, *args, **kwargs):
        out = load_vae(self, *args, **kwargs)
        vae = getattr(self, "vae", None)
        if _tile_px and vae is not None and getattr(self.config, "vae_enable_tiling", False):
            set_tiles(vae, _tile_px)
        return out

    return wrapped


def apply(tile_px: int | None) -> None:
    """Wrap upstream's load_vae once per process; `tile_px` None leaves diffusers' tiles as they are."""
    global _tile_px
    compat.require(CHECKED_AGAINST, __name__)
    from simpletuner.helpers.models.common import ModelFoundation

    _tile_px = tile_px
    compat.wrap_once(ModelFoundation, "load_vae", _wrap, "__sd3fit_vae_tiles__", __name__)
