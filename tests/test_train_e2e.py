"""Real SimpleTuner training of the tiny SD3 through ./train.sh: LoRA on a bf16 base, LoRA on an int8-quanto base,
and a full fine-tune. Each run must finish, log a finite loss every step, and save weights that load into a diffusers
StableDiffusion3Pipeline and change its output."""

import math
import subprocess

import pytest
import torch

from conftest import ROOT
from sd3fit.runs import Run

STEPS = 8  # config/demo.json


def train(tmp_path, name, *args) -> Run:
    proc = subprocess.run(
        [str(ROOT / "train.sh"), *args, "--name", name, "--runs-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    run = Run(tmp_path / name)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"run folder: {run.dir}" in proc.stdout
    return run


def check_finished(run: Run) -> dict:
    result = run.read_result()
    assert result["status"] == "finished" and result["global_step"] == STEPS
    losses = [row["train_loss"] for row in run.read_metrics()]
    assert len(losses) == STEPS
    assert all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    assert (run.dir / "config.json").is_file() and (run.dir / "train.log").stat().st_size > 0
    return result


def images(pipe) -> torch.Tensor:
    out = pipe("a red circle on a blue background", num_inference_steps=2, height=128, width=128,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return torch.from_numpy(out.images)


@pytest.fixture(scope="module")
def base(demo_assets):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(demo_assets["model"])
    return pipe, images(pipe)


def assert_changes_output(pipe, base_images):
    tuned = images(pipe)
    assert tuned.shape == base_images.shape
    assert (tuned - base_images).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto", "int8-sd3fit"])
def test_lora(tmp_path, base, precision):
    # the bf16 case is the README's demo command as it stands: ./train.sh with no preset
    args = [] if precision == "no_change" else ["config/demo.json", f"base_model_precision={precision}"]
    run = train(tmp_path, f"lora-{precision}", *args)
    result = check_finished(run)
    facts = result["transformer"]
    assert 0 < facts["trainable_parameters"] < facts["parameters"] / 10
    assert (facts["quantized_modules"] > 0) == (precision != "no_change")
    adapter = result["artifacts"]["adapter"]
    pipe, base_images = base
    pipe.load_lora_weights(adapter, adapter_name="tuned")
    try:
        assert "tuned" in pipe.get_active_adapters()
        assert_changes_output(pipe, base_images)
    finally:
        pipe.delete_adapters("tuned")
    assert torch.equal(images(pipe), base_images)  # the adapter is gone again: the next test starts clean


def test_full_finetune(tmp_path, base, demo_assets):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    run = train(tmp_path, "full", "config/demo.json", "model_type=full")
    result = check_finished(run)
    assert result["transformer"]["trainable_parameters"] == result["transformer"]["parameters"]
    transformer_dir = result["artifacts"]["transformer"]
    transformer = SD3Transformer2DModel.from_pretrained(transformer_dir, torch_dtype=torch.float32)
    pipe = StableDiffusion3Pipeline.from_pretrained(demo_assets["model"], transformer=transformer)
    assert_changes_output(pipe, base[1])
