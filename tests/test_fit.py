"""Refusing a GPU smaller than a configuration's measured peak, from the committed benchmark of SD3 Medium."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import one_line_error, run_sd3fit
from sd3fit import fit, presets, schema
from sd3fit.errors import UserError

L4 = ("NVIDIA L4", 23034 / 1024)  # what nvidia-smi reports for an L4
CARD_16GB = ("NVIDIA RTX A4000", 16376 / 1024)
H100 = ("NVIDIA H100 80GB HBM3", 81559 / 1024)


def options(preset: str, *overrides: str) -> dict:
    return schema.split(presets.load(preset, list(overrides)).values)[1]


def test_full_fine_tuning_is_refused_on_an_l4_and_allowed_on_an_h100():
    with pytest.raises(UserError) as caught:
        fit.check("full-bf16", options("full-bf16"), L4)
    message = str(caught.value)
    assert "22.68 GiB" in message and "NVIDIA L4" in message and "22.49 GiB" in message
    assert "full-bf16-nocap" in message and "--skip-fit-check" in message and "\n" not in message
    fit.check("full-bf16", options("full-bf16"), H100)


def test_lora_on_int8_fits_an_l4_but_not_a_16_gb_card():
    for preset in ("lora-r1-int8", "lora-r16-int8", "lora-r64-int8", "lora-r64-bf16"):
        fit.check(preset, options(preset), L4)
        with pytest.raises(UserError, match="16.73 GiB"):
            fit.check(preset, options(preset), CARD_16GB)


@pytest.mark.parametrize("override", ["validation_disable=true", "resolution=512", "train_batch_size=2",
                                      "lora_rank=8", "vae_batch_size=1", "gradient_checkpointing=false"])
def test_a_configuration_that_was_not_benchmarked_is_not_judged(override):
    assert fit.measured_need(options("lora-r64-int8", override)) is None
    fit.check("lora-r64-int8", options("lora-r64-int8", override), ("small card", 4.0))


def test_only_sd3_medium_is_judged(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert fit.measured_need(options("full-bf16", f"pretrained_model_name_or_path={tmp_path}")) is None
    assert fit.measured_need(options("full-bf16", "pretrained_model_name_or_path=someone/other-model")) is None
    assert fit.measured_need(options("full-bf16")) is not None


def test_no_gpu_no_check():
    fit.check("full-bf16", options("full-bf16"), None)


def fake_nvidia_smi(folder, *lines: str) -> dict:
    """An nvidia-smi on PATH that answers sd3fit's query with `lines`; returns the environment to use it."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture
def fake_l4(tmp_path):
    return fake_nvidia_smi(tmp_path, "NVIDIA L4, 23034")


@pytest.mark.parametrize("lines, expected", [
    (["NVIDIA L4, 23034"], ("NVIDIA L4", 23034 / 1024)),
    (["NVIDIA L4, 23034", "NVIDIA H100 80GB HBM3, 81559"], ("NVIDIA H100 80GB HBM3", 81559 / 1024)),
    (["NVIDIA GH200, [N/A]"], None),
])
def test_gpu_memory_from_nvidia_smi(tmp_path, monkeypatch, lines, expected):
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, *lines)["PATH"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert fit.gpu() == expected


def test_train_refuses_before_anything_is_written(fake_l4, tmp_path):
    from sd3fit import sd3_medium

    model = tmp_path / "sd3-medium"  # stands for a local SD3 Medium folder (only its marker is read before training)
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    (model / sd3_medium.MARKER).write_text("{}")
    runs = tmp_path / "runs"
    args = ("train", "full-bf16", f"pretrained_model_name_or_path={model}", "--runs-dir", str(runs))
    line = one_line_error(run_sd3fit(*args, env=fake_l4))
    assert "needs at least 22.68 GiB" in line and "NVIDIA L4" in line
    assert not runs.exists()
    # --skip-fit-check goes on to the next check: the study's dataset folder is not here
    line = one_line_error(run_sd3fit(*args, "--skip-fit-check", env=fake_l4))
    assert "needs at least" not in line and "data/sargent" in line
    assert not runs.exists()


def test_an_override_that_makes_another_benchmarked_configuration_is_judged_by_that_run():
    need, where = fit.measured_need(options("lora-r64-int8", "base_model_precision=no_change"))
    assert where.endswith("lora-r64-bf16-nocap")
