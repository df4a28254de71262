"""Model FLOPs of one training step per image, counted by torch's FlopCounterMode on a weightless copy of the
transformer (the `meta` device: shapes only, no memory, no GPU).

Model FLOPs are the forward pass plus the backward pass a training step needs: for a full fine-tune the
gradients of activations and of every weight (about 3x the forward), for LoRA the gradients of activations and of
the adapter weights only (the frozen base needs no weight gradients). Recomputation by gradient checkpointing is
not counted, so utilisation computed from them is model FLOP utilisation (MFU), not hardware utilisation. The
count is the same for a bf16 and an int8 base: quantization changes how the matmuls run, not how many there are.
"""

from __future__ import annotations

import json
from pathlib import Path

# SimpleTuner 4.10.1 pads SD3 prompts to 77 CLIP tokens and at most 154 T5 tokens (its sd3 model caps
# tokenizer_max_length there), joined into one text sequence
CLIP_TOKENS = 77
T5_MAX_TOKENS = 154

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets; first match in the GPU name wins
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM (the "80GB HBM3" name)
    ("H200 NVL", 835.5),
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


def peak_tflops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key in gpu_name:
            return value
    return None


def text_tokens(options: dict) -> int:
    t5 = options.get("tokenizer_max_length") or T5_MAX_TOKENS
    return CLIP_TOKENS + min(int(t5), T5_MAX_TOKENS)


def transformer_config(model: str) -> dict | None:
    """The transformer's config.json from a local diffusers folder or the Hub (one small file); None if unreadable."""
    path = Path(model).expanduser() / "transformer" / "config.json"
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "transformer/config.json"))
        return json.loads(path.read_text())
    except Exception:
        return None


def per_image(config: dict, options: dict, resolution: int) -> float | None:
    """Model FLOPs of one training step for one square image at `resolution` px; None for a kind not counted."""
    import torch
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    model_type = options.get("model_type", "full")
    if model_type == "lora" and options.get("lora_type", "standard") != "standard":
        return None  # LyCORIS adapters: not counted
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        net = SD3Transformer2DModel.from_config(fields).to(torch.bfloat16)
    if model_type == "lora":
        from peft import LoraConfig

        net.requires_grad_(False)
        targets = options.get("peft_lora_target_modules") or ["to_q", "to_k", "to_v", "to_out.0"]
        rank = int(options.get("lora_rank") or 16)
        net.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    latent = resolution // 8  # the SD3 VAE downsamples 8x
    with torch.device("meta"):
        latents = torch.empty(1, config.get("in_channels", 16), latent, latent, dtype=torch.bfloat16)
        text = torch.empty(1, text_tokens(options), config["joint_attention_dim"], dtype=torch.bfloat16)
        pooled = torch.empty(1, config["pooled_projection_dim"], dtype=torch.bfloat16)
        timestep = torch.empty(1, dtype=torch.bfloat16)
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                  return_dict=False)[0]
        out.float().sum().backward()
    return float(counter.get_total_flops())
