"""The offline demo: a tiny random SD3 pipeline and a small captioned image folder, both built in code.

Nothing here downloads anything. The pipeline has all five SD3 components (MMDiT transformer, VAE, CLIP-L,
CLIP-G, T5) with real classes and shapes that are small but keep SD3's structure: 16 latent channels, an 8x VAE,
pooled CLIP projections concatenated into the transformer's pooled input, CLIP hidden states padded to the T5 width.
The tests use the same builders, so the demo and the tests train exactly the same thing.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# Sizes of the tiny model. CLIP hidden states (2 x CLIP_DIM) are zero-padded up to T5_DIM by the SD3 pipeline,
# so T5_DIM must be at least 2 * CLIP_DIM; the pooled input of the transformer is both CLIP projections.
CLIP_DIM = 32
T5_DIM = 64
LATENT_CHANNELS = 16  # SimpleTuner's SD3 model class expects SD3's 16-channel latent space

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle")


def clip_tokenizer():
    """A CLIP BPE tokenizer over single characters (no merges): small, but the real class and special tokens."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ",.!?'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A T5 unigram tokenizer over single characters, with T5's special tokens and sentinel ids."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_lowercase + string.digits + ",.!?'-"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(seed: int = 0):
    """Return a tiny random `StableDiffusion3Pipeline` (float32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer()

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * CLIP_DIM,
        pos_embed_max_size=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 16, 16),  # four blocks: the same 8x downsampling as SD3's VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )

    def clip(seed_offset: int, act: str):
        torch.manual_seed(seed + seed_offset)
        cfg = CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=CLIP_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=CLIP_DIM,
            hidden_act=act,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        return CLIPTextModelWithProjection(cfg)

    text_encoder = clip(2, "quick_gelu")
    text_encoder_2 = clip(3, "gelu")
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=T5_DIM,
            d_ff=96,
            d_kv=16,
            num_heads=4,
            num_layers=2,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
        scheduler=scheduler,
    )


def write_tiny_pipeline(path: Path, seed: int = 0) -> Path:
    """Save the tiny pipeline as a diffusers folder (idempotent: an existing complete folder is kept)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    build_tiny_pipeline(seed).save_pretrained(tmp)
    tmp.rename(path)
    return path


def write_demo_dataset(path: Path, count: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Write `count` PNG images of coloured shapes, each with a `.txt` caption that describes it."""
    import numpy as np
    from PIL import Image, ImageDraw

    path = Path(path)
    if path.is_dir() and len(list(path.glob("*.png"))) >= count:
        return path
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(_COLOURS)
    for i in range(count):
        fg, bg = rng.choice(len(names), size=2, replace=False)
        shape = _SHAPES[i % len(_SHAPES)]
        img = Image.new("RGB", (size, size), _COLOURS[names[bg]])
        draw = ImageDraw.Draw(img)
        r = int(size * rng.uniform(0.2, 0.35))
        cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = _COLOURS[names[fg]]
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        stem = f"shape-{i:03d}"
        img.save(path / f"{stem}.png")
        (path / f"{stem}.txt").write_text(f"a {names[fg]} {shape} on a {names[bg]} background\n")
    return path


def ensure_demo_assets(root: Path) -> dict[str, Path]:
    """Build (once) the tiny model and the demo images under `root`; return their paths."""
    root = Path(root)
    model = write_tiny_pipeline(root / "tiny-sd3")
    data = write_demo_dataset(root / "shapes")
    (root / "README.txt").write_text(
        json.dumps({"model": "tiny random SD3 pipeline (sd3fit.demo)", "dataset": "generated shapes"}) + "\n"
    )
    return {"model": model, "dataset": data}
