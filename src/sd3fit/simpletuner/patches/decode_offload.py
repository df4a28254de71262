"""The transformer out of the GPU while a validation image is decoded (`offload_transformer_for_decode: true`, an
sd3fit key).

Upstream (simpletuner 4.10.1) generates validation images with its `StableDiffusion3Pipeline`, built around the
training transformer, whose `__call__` denoises and then decodes the latents with the VAE while the transformer's
weights (3.8 GiB in bf16 for SD3 Medium) stay on the GPU. At 1024 px that decode is the largest thing a small LoRA run
holds besides its training step (weights + VAE activations set the whole-run peak of sd3fit's 8 GB preset). This patch
wraps `__call__` so that, for the VAE's decode only, the transformer waits in CPU memory and comes back right after:
the decode reuses the memory its weights freed. It costs two copies of the weights per validation image (about a
second on PCIe 4), nothing per training step. diffusers' `enable_model_cpu_offload` would do it for every component
at every call, and SimpleTuner builds the validation pipeline from the live training model, which it must not hook.
"""

from __future__ import annotations

import functools

from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
_on = False
moves = 0  # decodes that ran with the transformer in CPU memory (the tests read it)


def decode_alone(vae, transformer):
    """`vae.decode`, wrapped to park `transformer` in CPU memory for the call when it lives on a GPU."""
    decode = vae.decode

    @functools.wraps(decode)
    def wrapped(*args, **kwargs):
        global moves
        first = next(transformer.parameters(), None)
        device = first.device if first is not None else None
        if device is None or device.type == "cpu":
            return decode(*args, **kwargs)
        transformer.to("cpu")
        moves += 1
        try:
            return decode(*args, **kwargs)
        finally:
            transformer.to(device)

    return wrapped


def _wrap(call):
    @functools.wraps(call)
    def wrapped(self, *args, **kwargs):
        vae, transformer = getattr(self, "vae", None), getattr(self, "transformer", None)
        if not _on or vae is None or transformer is None:
            return call(self, *args, **kwargs)
        vae.decode = decode_alone(vae, transformer)  # on the instance, for this call only
        try:
            return call(self, *args, **kwargs)
        finally:
            del vae.decode

    return wrapped


def apply(on: bool) -> None:
    """Wrap upstream's SD3 validation pipeline once per process; `on` False leaves it as upstream runs it."""
    global _on
    compat.require(CHECKED_AGAINST, __name__)
    from simpletuner.helpers.models.sd3.pipeline import StableDiffusion3Pipeline

    _on = on
    compat.wrap_once(StableDiffusion3Pipeline, "__call__", _wrap, "__sd3fit_decode_offload__", __name__)
