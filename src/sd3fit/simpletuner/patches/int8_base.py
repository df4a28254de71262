"""The frozen base multiplied in int8 (`base_model_precision: int8-sd3fit`, a value sd3fit adds).

Upstream (simpletuner 4.10.1) quantizes the base in `Trainer.init_precision`, after the model is loaded and before
LoRA adapters are added, through one of its libraries (quanto, torchao, SDNQ, bitsandbytes); each of them
dequantizes the weight to bf16 on every call, so the int8 base saves memory but costs time. For `int8-sd3fit` the
launcher hands SimpleTuner `base_model_precision=no_change` (its argument parser knows only its own values) and this
mixin (before `Trainer`) replaces, at the same point of `init_precision`, the linear layers inside the MMDiT blocks by
`sd3fit.quant.int8.Int8Linear` (int8 weights stored once; forward and input gradient as int8 matmuls). peft then puts
the LoRA adapters on them as on any linear layer, and adapters are saved as usual. The adaLN modulation projections
(`norm1.linear`, `norm1_context.linear`: one token per image, nothing to gain) and the layers outside the blocks stay
bf16.
"""

from __future__ import annotations

from sd3fit.schema import SD3FIT_PRECISIONS
from sd3fit.simpletuner import compat

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
PRECISIONS = tuple(SD3FIT_PRECISIONS)  # the GPU each needs is checked before loading (sd3fit.fit.check_capability)
KEPT = (".norm1.linear", ".norm1_context.linear")  # inside a block, but one token per image: stay bf16


def split(options: dict) -> tuple[dict, str | None]:
    """(the options SimpleTuner gets, sd3fit's precision or None): sd3fit's own values become `no_change`."""
    precision = options.get("base_model_precision")
    if precision not in PRECISIONS:
        return options, None
    return {**options, "base_model_precision": "no_change"}, precision


def keep(name: str, module) -> bool:
    """Linear layers left in bf16: outside the transformer blocks, and the blocks' modulation projections."""
    return not name.startswith("transformer_blocks.") or name.endswith(KEPT)


def check(trainer_cls) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    if not callable(getattr(trainer_cls, "init_precision", None)):
        raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks init_precision; this patch needs updating")


class Int8BaseTrainer:
    """Mixed in before `Trainer`; `sd3fit_int8_base` (the precision or None) switches it on."""

    sd3fit_int8_base: str | None = None
    sd3fit_int8_layers = 0  # linear layers replaced, for result.json

    def init_precision(self, preprocessing_models_only: bool = False, ema_only: bool = False):
        out = super().init_precision(preprocessing_models_only=preprocessing_models_only, ema_only=ema_only)
        if self.sd3fit_int8_base and not preprocessing_models_only and not ema_only:
            from sd3fit.quant import int8

            transformer = self.model.unwrap_model(model=self.model.model)
            self.sd3fit_int8_layers = len(int8.convert(transformer, keep))
            if not self.sd3fit_int8_layers:
                raise RuntimeError(f"{__name__}: no linear layer in the transformer's blocks to quantize")
        return out
