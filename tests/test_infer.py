"""Inference with the tiny SD3 and adapters / a full checkpoint from real tiny training runs: each image made with
exactly one column's weights, the contact sheet's grid, the sidecar, and each bad input's one-line error."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import one_line_error, run_sd3fit, train_all
from sd3fit.infer import generate, sheet, sources
from sd3fit.infer.generate import Column, Settings
from test_hub import fake_hub, hub_env  # noqa: F401  (the local stand-in for the Hub)

PROMPTS = ["a red circle on a blue background", "a green square"]
SEEDS = [3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_assets):
    """Two different LoRA adapters and a full fine-tune, each from a real 8-step run on the demo."""
    root = tmp_path_factory.mktemp("trained")
    runs = {"lora-a": [], "lora-b": ["lora_rank=8", "lora_alpha=8", "seed=7", "learning_rate=0.003"],
            "full": ["model_type=full", "learning_rate=0.0003"]}
    folders = train_all(root, {name: [*args, "validation_disable=true"] for name, args in runs.items()})
    return {"model": demo_assets["model"], "a": folders["lora-a"], "b": folders["lora-b"], "full": folders["full"]}


def settings(trained, **changes) -> Settings:
    values = dict(model=str(trained["model"]), prompts=PROMPTS, seeds=SEEDS, steps=2, width=128, height=128, device="cpu")
    return Settings(**{**values, **changes})


def lora(name, trained) -> Column:
    found = sources.adapter(str(trained[name]))
    return Column(found.label, "lora", found)


def pixels(out, sidecar, label) -> list[np.ndarray]:
    return [np.asarray(Image.open(out / r["file"])) for r in sidecar["images"] if r["label"] == label]


def test_scale_zero_gives_the_base_image(trained, tmp_path):
    out = tmp_path / "s0"
    sidecar = generate.run(settings(trained, scale=0.0), [Column("base", "base"), lora("a", trained)], out)
    base, adapted = pixels(out, sidecar, "base"), pixels(out, sidecar, "lora-a")
    assert all(np.array_equal(x, y) for x, y in zip(base, adapted))


def test_each_image_has_exactly_one_adapter(trained, tmp_path):
    both = generate.run(settings(trained), [Column("base", "base"), lora("a", trained), lora("b", trained)], tmp_path / "ab")
    alone = generate.run(settings(trained), [lora("b", trained)], tmp_path / "b")
    b_after_a, b_alone = pixels(tmp_path / "ab", both, "lora-b"), pixels(tmp_path / "b", alone, "lora-b")
    assert all(np.array_equal(x, y) for x, y in zip(b_after_a, b_alone))  # the study's loop mixed adapters here
    base, a = pixels(tmp_path / "ab", both, "base"), pixels(tmp_path / "ab", both, "lora-a")
    assert not np.array_equal(a[0], b_after_a[0]) and not np.array_equal(a[0], base[0])  # the adapters do change images
    record = next(r for r in both["images"] if r["label"] == "lora-b")
    assert record["rank"] == 8 and record["scale"] == 1.0 and record["adapter_file"].endswith("pytorch_lora_weights.safetensors")


def test_full_checkpoint_loads_and_differs_from_the_base(trained, tmp_path):
    proc = run_sd3fit("infer", "full", "--checkpoint", str(trained["full"]), "--with-base", "--model", str(trained["model"]),
                      "--prompt", PROMPTS[0], "--seed", "3", "--steps", "2", "--size", "128", "--device", "cpu",
                      "--out", str(tmp_path / "full"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    sidecar = json.loads((tmp_path / "full" / "images.json").read_text())
    assert sidecar["columns"] == ["base", "full"]
    base, full = pixels(tmp_path / "full", sidecar, "base"), pixels(tmp_path / "full", sidecar, "full")
    assert not np.array_equal(base[0], full[0])
    assert sidecar["images"][1]["transformer"].endswith("output/pipeline/transformer")


def test_contact_sheet_grid_and_sidecar(trained, tmp_path):
    out = tmp_path / "grid"
    sidecar = generate.run(settings(trained, seeds=[1, 2]), [Column("base", "base"), lora("a", trained), lora("b", trained)], out)
    rows, cols = len(PROMPTS) * 2, 3
    assert len(sidecar["images"]) == rows * cols and sidecar["columns"] == ["base", "lora-a", "lora-b"]
    assert sidecar["rows"][1] == f"{PROMPTS[0]} (seed 2)"
    sheet_image = Image.open(out / "contact_sheet.png")
    assert sheet_image.size == (sheet.LABEL_WIDTH + cols * 128, sheet.HEADER + rows * 128)
    for record in sidecar["images"]:
        cell = sheet_image.crop(sheet.cell_box(record["row"], record["column"], 128, 128))
        assert np.array_equal(np.asarray(cell), np.asarray(Image.open(out / record["file"]).convert("RGB")))
        assert record["prompt"] == PROMPTS[record["row"] // 2] and record["seed"] == [1, 2][record["row"] % 2]
        assert record["seconds"] > 0 and record["peak_gpu_gib"] is None  # no GPU here: no made-up number
    assert sidecar["model"] == str(trained["model"]) and sidecar["settings"]["steps"] == 2


def infer(tmp_path, *args, env=None):
    return run_sd3fit("infer", *args, "--steps", "2", "--size", "128", "--device", "cpu", "--out", str(tmp_path / "out"), env=env)


def test_missing_adapter_file(trained, tmp_path):
    line = one_line_error(infer(tmp_path, "lora", "--model", str(trained["model"]), "--adapter", str(tmp_path / "nope.safetensors"), "--prompt", "x"))
    assert "adapter file not found" in line and not (tmp_path / "out").exists()


def test_adapter_for_another_model(trained, tmp_path):
    from safetensors.torch import save_file
    import torch

    other = tmp_path / "other.safetensors"  # a rank-4 LoRA for a layer 64 features wide; the tiny model's is 32
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(other))
    # a good adapter and the base come first: every column is checked before the first image is made
    line = one_line_error(infer(tmp_path, "lora", "--model", str(trained["model"]), "--with-base", "--adapter", str(trained["a"]),
                                "--adapter", str(other), "--prompt", "x"))
    assert "was trained for another model" in line and "transformer_blocks.0.attn.to_q" in line
    assert not (tmp_path / "out").exists()


def test_rank_mismatch(trained, tmp_path):
    run = tmp_path / "edited-run"
    shutil.copytree(trained["a"], run, ignore=shutil.ignore_patterns("cache"))
    config = json.loads((run / "config.json").read_text())
    config["simpletuner"]["lora_rank"] = 16
    (run / "config.json").write_text(json.dumps(config))
    line = one_line_error(infer(tmp_path, "lora", "--model", str(trained["model"]), "--adapter", str(run), "--prompt", "x"))
    assert "rank mismatch" in line and "lora_rank=16" in line and "rank 4" in line


def test_gated_model_without_token(tmp_path, fake_hub):  # noqa: F811
    line = one_line_error(infer(tmp_path, "base", "--model", "stabilityai/stable-diffusion-3-medium-diffusers", "--prompt", "x",
                                env=hub_env(tmp_path, fake_hub)))
    assert "is gated and no Hugging Face token is set" in line


def test_empty_prompt_file(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n")
    line = one_line_error(infer(tmp_path, "base", "--model", str(trained["model"]), "--prompts", str(prompts)))
    assert f"prompt file {prompts} holds no prompt" in line


def test_output_folder_in_use(trained, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.png").write_bytes(b"keep")
    line = one_line_error(infer(tmp_path, "base", "--model", str(trained["model"]), "--prompt", "x"))
    assert "not empty" in line and (tmp_path / "out" / "mine.png").read_bytes() == b"keep"


def test_small_gpu_options_on_the_tiny_model(trained, tmp_path):
    """int8 weights (with an adapter on top) and dropping T5 run and change the image only a little / as expected."""
    plain = generate.run(settings(trained, prompts=PROMPTS[:1]), [Column("base", "base"), lora("a", trained)], tmp_path / "plain")
    quant = generate.run(settings(trained, prompts=PROMPTS[:1], quantize="int8"), [Column("base", "base"), lora("a", trained)], tmp_path / "q")
    no_t5 = generate.run(settings(trained, prompts=PROMPTS[:1], drop_t5=True), [Column("base", "base")], tmp_path / "no-t5")
    p, q, n = (pixels(tmp_path / d, sc, "base")[0].astype(int) for d, sc in (("plain", plain), ("q", quant), ("no-t5", no_t5)))
    assert 0 < np.abs(p - q).mean() < 8  # int8 weights: close to the bf16/fp32 image, not identical
    assert not np.array_equal(p, n)  # without T5 the prompt embedding differs
    assert quant["settings"]["quantize"] == "int8" and no_t5["settings"]["drop_t5"] is True
    assert len(pixels(tmp_path / "q", quant, "lora-a")) == 1


def test_offload_needs_a_gpu(trained, tmp_path):
    line = one_line_error(infer(tmp_path, "base", "--model", str(trained["model"]), "--prompt", "x", "--offload", "model"))
    assert "--offload model" in line and "needs a CUDA GPU" in line


def test_alpha_of_the_training_run_sets_the_strength(trained, tmp_path):
    """SimpleTuner saves no lora_alpha in the file; diffusers would assume alpha = rank. A run trained with
    lora_alpha 8 at rank 4 must be applied at twice the strength of the bare file."""
    run = tmp_path / "alpha-run"
    shutil.copytree(trained["a"], run, ignore=shutil.ignore_patterns("cache"))
    config = json.loads((run / "config.json").read_text())
    config["simpletuner"]["lora_alpha"] = 8
    (run / "config.json").write_text(json.dumps(config))
    file = run / "output" / "pytorch_lora_weights.safetensors"
    from_run = generate.run(settings(trained, prompts=PROMPTS[:1]), [Column("run", "lora", sources.adapter(str(run)))], tmp_path / "r")
    doubled = generate.run(settings(trained, prompts=PROMPTS[:1], scale=2.0), [Column("file", "lora", sources.adapter(str(file)))], tmp_path / "f")
    assert np.array_equal(pixels(tmp_path / "r", from_run, "run")[0], pixels(tmp_path / "f", doubled, "file")[0])
    assert from_run["images"][0]["alpha_factor"] == 2.0 and doubled["images"][0]["alpha_factor"] == 1.0


def test_key_layouts_load_the_same_adapter(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    original = load_file(str(trained["a"] / "output" / "pytorch_lora_weights.safetensors"))
    bare = tmp_path / "bare.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in original.items()}, str(bare))
    peft = tmp_path / "peft.safetensors"
    save_file({"base_model.model." + k.removeprefix("transformer."): v for k, v in original.items()}, str(peft))
    columns = [lora("a", trained), Column("bare", "lora", sources.adapter(str(bare))), Column("peft", "lora", sources.adapter(str(peft)))]
    sidecar = generate.run(settings(trained, prompts=PROMPTS[:1]), columns, tmp_path / "out")
    a, b, p = (pixels(tmp_path / "out", sidecar, label)[0] for label in ("lora-a", "bare", "peft"))
    assert np.array_equal(a, b) and np.array_equal(a, p)


def test_adapter_sources_refuse_what_they_cannot_use(trained, tmp_path):
    from safetensors.torch import save_file
    import torch

    from sd3fit.errors import UserError

    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 8)}, str(kohya))
    with pytest.raises(UserError, match="kohya/ComfyUI format"):
        sources.load_adapter_weights(sources.adapter(str(kohya)))
    with pytest.raises(UserError, match="that run is a full fine-tune: use --checkpoint"):
        sources.adapter(str(trained["full"]))
    with pytest.raises(UserError, match="that run trained a LoRA: use --adapter"):
        sources.full_checkpoint(str(trained["a"]))


def test_hub_adapter_with_a_file_name_goes_to_the_hub(tmp_path, fake_hub):  # noqa: F811
    line = one_line_error(infer(tmp_path, "lora", "--model", str(tmp_path), "--adapter", "someone/style:my.safetensors",
                                "--prompt", "x", env=hub_env(tmp_path, fake_hub)))
    assert "adapter someone/style was not found on the Hugging Face Hub" in line


def test_int8_with_sequential_offload_is_refused(trained, tmp_path):
    line = one_line_error(infer(tmp_path, "base", "--model", str(trained["model"]), "--prompt", "x", "--quantize", "int8", "--offload", "sequential"))
    assert "use --offload model" in line
