"""peft's own LoRA forward back where RamTorch streams only the text encoders (`plain_lora_forward`, an sd3fit speed
key).

Upstream (simpletuner 4.10.1): as soon as RamTorch replaces any layer (`replace_linear_layers_with_ramtorch`, also
for `ramtorch_text_encoder` alone) it calls `ensure_available`, which replaces `peft.tuners.lora.layer.Linear.forward`
for the whole process by a wrapper that first walks the layer's parameters and moves the base layer and the adapters
to the input's device (`_maybe_patch_peft_lora_forward`), for adapters on RamTorch-streamed or offloaded layers. In a
model that lives on the GPU it moves nothing, but it costs host time on every LoRA layer, twice per checkpointed
block, and torch.compile cannot trace it: each compiled block breaks into a graph per LoRA layer (seen on an H200 in
sd3fit's 8 GB preset, whose transformer has no RamTorch layer). When training starts, this mixin (before `Trainer`)
puts peft's forward back if the trained model holds no RamTorch layer and every one of its parameters is on the
training device; otherwise upstream's wrapper stays.
"""

from __future__ import annotations

from sd3fit.simpletuner import compat
from sd3fit.simpletuner.patches.ramtorch_sync import holds_ramtorch

CHECKED_AGAINST = compat.SIMPLETUNER_VERSION
WRAPPED = "_ramtorch_wrapped"  # the mark upstream puts on its wrapper

_peft_forward = None  # peft's own LoRA Linear.forward, read before upstream wraps it


def check(trainer_cls) -> None:
    compat.require(CHECKED_AGAINST, __name__)
    from simpletuner.helpers.utils import ramtorch

    if not callable(getattr(ramtorch, "_maybe_patch_peft_lora_forward", None)):
        raise RuntimeError(f"{__name__}: SimpleTuner no longer wraps peft's LoRA forward there; this patch needs updating")
    if not callable(getattr(trainer_cls, "train", None)):
        raise RuntimeError(f"{__name__}: SimpleTuner's Trainer lacks train; this patch needs updating")


def remember() -> None:
    """Keep peft's LoRA forward as it is now (called before SimpleTuner can wrap it)."""
    global _peft_forward
    from peft.tuners.lora.layer import Linear

    if _peft_forward is None and not getattr(Linear.forward, WRAPPED, False):
        _peft_forward = Linear.forward


def state() -> str:
    """`peft` or `wrapped`: which LoRA forward the process runs now."""
    from peft.tuners.lora.layer import Linear

    return "wrapped" if getattr(Linear.forward, WRAPPED, False) else "peft"


def _on(tensor_device, device) -> bool:
    """Whether a tensor on `tensor_device` is on `device` (`cuda` and `cuda:0` alike name the current GPU)."""
    return tensor_device.type == device.type and None in (tensor_device.index, device.index) \
        or tensor_device == device


def unwrap(trained, device) -> bool:
    """Put peft's forward back if upstream wrapped it and `trained` needs no moving: no RamTorch layer, every parameter
    on `device`. Returns whether it did."""
    from peft.tuners.lora.layer import Linear

    if _peft_forward is None or state() != "wrapped" or trained is None:
        return False
    if holds_ramtorch(trained) or not all(_on(p.device, device) for p in trained.parameters()):
        return False
    Linear.forward = _peft_forward  # upstream's flag stays set, so it does not wrap it again (validation asks too)
    return True


class PlainLoraForwardTrainer:
    """Mixed in before `Trainer`; `sd3fit_plain_lora_forward` switches it on."""

    sd3fit_plain_lora_forward = False
    sd3fit_lora_forward = None  # what the training loop ran: "peft" or "wrapped", for result.json

    def train(self, *args, **kwargs):
        if self.sd3fit_plain_lora_forward:
            trained = self.model.get_trained_component(unwrap_model=True)
            unwrap(trained, self.accelerator.device)
            self.sd3fit_lora_forward = state()
        return super().train(*args, **kwargs)
