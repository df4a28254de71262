"""SD3 Medium's full-size architecture with random weights, for measuring speed and memory without the gated weights.

The component configurations are the public ones of `stabilityai/stable-diffusion-3-medium-diffusers`; only the
weights are random (bf16) and the tokenizers are the demo's small in-code ones (token ids stay below the real
vocabularies, and SimpleTuner pads prompts to SD3's fixed lengths, so every tensor shape is the real one).
Every number measured on it must say "SD3-Medium architecture, random weights" (`LABEL`).
"""

from __future__ import annotations

import json
from pathlib import Path

LABEL = "SD3-Medium architecture, random weights"
MARKER = "sd3fit-random-architecture.json"
HUB_ID = "stabilityai/stable-diffusion-3-medium-diffusers"
# the transformer's public configuration: what makes a diffusers folder SD3 Medium (3.0, not 3.5) for memory purposes
TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=192)


def is_sd3_medium(model: str) -> bool:
    """The Hub id, or a local diffusers folder whose transformer has SD3 Medium's architecture (the real weights
    downloaded, or sd3fit's random-weight build of them)."""
    if model == HUB_ID:
        return True
    config = Path(model).expanduser() / "transformer" / "config.json"
    try:
        found = json.loads(config.read_text())
    except (OSError, ValueError):
        return (Path(model).expanduser() / MARKER).is_file()
    return all(found.get(key) == value for key, value in TRANSFORMER.items()) and not found.get("dual_attention_layers")


def build(path: Path, device: str = "cpu", seed: int = 0) -> Path:
    """Write a diffusers folder at `path` (kept if already complete). On a GPU, building takes seconds."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from sd3fit.demo import clip_tokenizer, t5_tokenizer

    path = Path(path)
    if (path / "model_index.json").is_file() and (path / MARKER).is_file():
        return path
    torch.manual_seed(seed)
    with torch.device(device):
        # bf16 from the start: a float32 T5-XXL alone would need 19 GB
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            transformer = SD3Transformer2DModel(**TRANSFORMER)
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
                shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
            )
            clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ))
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
                bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ))
            t5 = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            ))
        finally:
            torch.set_default_dtype(default)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=clip_g,
        tokenizer_2=clip_tokenizer(), text_encoder_3=t5, tokenizer_3=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    tmp = path.with_name(path.name + ".partial")
    pipeline.save_pretrained(tmp)
    parameters = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
                  for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    (tmp / MARKER).write_text(json.dumps({"label": LABEL, "seed": seed, "parameters": parameters}, indent=2) + "\n")
    tmp.rename(path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sd3fit.sd3_medium", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="diffusers folder to write (kept when already complete)")
    parser.add_argument("--device", default="cpu", help="where to build the weights: cuda is much faster (default cpu)")
    args = parser.parse_args(argv)
    print(build(Path(args.path), device=args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
