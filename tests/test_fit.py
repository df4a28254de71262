"""Refusing a GPU smaller than a configuration's measured peak, from the committed benchmark of SD3 Medium."""

from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import one_line_error, run_sd3fit
from sd3fit import fit, host, presets, schema
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
    assert fit.measured(options("lora-r64-int8", override)) is None
    fit.check("lora-r64-int8", options("lora-r64-int8", override), ("small card", 4.0))


def test_only_sd3_medium_is_judged(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert fit.measured(options("full-bf16", f"pretrained_model_name_or_path={tmp_path}")) is None
    assert fit.measured(options("full-bf16", "pretrained_model_name_or_path=someone/other-model")) is None
    assert fit.measured(options("full-bf16")) is not None


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
    assert host.gpu() == expected


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
    found = fit.measured(options("lora-r64-int8", "base_model_precision=no_change"))
    assert found.run.endswith("lora-r64-bf16-nocap")


# -- choosing the preset for a card (`sd3fit train lora|full --gpu SIZE`) --------------------------------------------
# on 16 GB the 24 GB LoRA preset fits (13.8 GiB) and is the fastest; on 12 GB it does not, and lora-12gb (0.174 s) is
# as fast as lora-8gb held within 5.95 GiB (0.165 s), so the card's own preset is chosen; on 8 GB lora-8gb is faster
# than lora-6gb (0.407 s), which only a 6 GB card gets
@pytest.mark.parametrize("kind, card, expected", [
    ("lora", "24GB", "lora-24gb"), ("lora", "16GB", "lora-24gb"), ("lora", "12GB", "lora-12gb"), ("lora", "8GB", "lora-8gb"),
    ("lora", "6GB", "lora-6gb"), ("full", "24GB", "full-24gb"), ("full", "16GB", "full-16gb"), ("full", "12GB", "full-12gb"), ("full", "8GB", "full-8gb"),
])
def test_the_fastest_measured_preset_that_fits_is_chosen(kind, card, expected):
    assert fit.pick(kind, fit.card(card), []) == expected


def test_a_card_too_small_for_every_preset_names_the_smallest_card_that_works():
    with pytest.raises(UserError) as caught:
        fit.pick("lora", fit.card("4GB"), [])
    assert "no lora preset fits a 4GB card (3.73 GiB)" in str(caught.value)
    need = fit.measured(presets.load("lora-6gb").values).need_gib  # its benchmark row's whole-run device peak
    assert 4.0 < need < 5.59 and f"the smallest card that works is 6GB (lora-6gb needs {need:.2f} GiB)" in str(caught.value)
    full = fit.measured(presets.load("full-8gb").values).need_gib
    with pytest.raises(UserError, match=rf"no full preset fits a 6GB card .* smallest card that works is 8GB \(full-8gb needs {full:.2f}"):
        fit.pick("full", fit.card("6GB"), [])


def test_an_override_that_changes_memory_leaves_nothing_to_choose_from():
    with pytest.raises(UserError, match="no lora preset has a benchmark run"):
        fit.pick("lora", fit.card("24GB"), ["lora_rank=16"])
    assert fit.pick("lora", fit.card("24GB"), ["learning_rate=1e-4", "max_train_steps=100"]) == "lora-24gb"


def test_a_memory_saving_option_makes_another_configuration():
    values = lambda preset, *o: presets.load(preset, list(o)).values  # noqa: E731
    for preset, override in (("lora-12gb", "vae_enable_tiling=false"), ("lora-12gb", "offload_during_startup=false"),
                             ("lora-r64-bf16", "gradient_checkpointing_interval=3"),
                             ("lora-r64-bf16", "musubi_blocks_to_swap=4"),
                             ("full-24gb", "optimizer_release_gradients=false")):
        assert fit.measured(values(preset)) is not None, preset
        assert fit.measured(values(preset, override)) is None, override
    # sd3fit's own memory keys count too; its other keys do not
    assert fit.measured(values("full-12gb")) is not None and fit.measured(values("lora-8gb")) is not None
    assert fit.measured(values("full-12gb", "offload_optimizer_state=false")) is None
    assert fit.measured(values("lora-8gb", "vae_tile_size=256")) is None
    assert fit.measured(values("lora-8gb", "ramtorch_copy_ahead_gib=0.25")) is None
    assert fit.measured(values("lora-8gb", "card=6GB", "description=mine", "step_metrics=false")) is not None
    # a speed key changes the step, not the memory: on or off, the preset is judged by its benchmark row
    assert values("lora-24gb")["fused_optimizer"] is True
    assert fit.measured(values("lora-24gb", "fused_optimizer=false")) == fit.measured(values("lora-24gb")) is not None
    stock = [f"{key}=false" for key in schema.SPEED_KEYS]
    assert fit.measured(values("full-8gb", *stock)) == fit.measured(values("full-8gb"))
    # except cuda_graph_blocks: the graphs hold their own memory pool (lora-24gb: 13.8 GiB whole run against 11.5)
    assert fit.measured(values("lora-24gb", "cuda_graph_blocks=false")) is None
    assert fit.measured(values("lora-24gb")).device_gib > 13


def test_a_local_sd3_medium_folder_is_judged_like_the_hub_id(tmp_path):
    from sd3fit import sd3_medium

    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({**sd3_medium.TRANSFORMER, "_class_name": "x"}))
    assert fit.measured(options("full-bf16", f"pretrained_model_name_or_path={tmp_path}")) is not None
    # SD3.5 Medium (dual attention layers) is another model
    (tmp_path / "transformer" / "config.json").write_text(
        json.dumps({**sd3_medium.TRANSFORMER, "dual_attention_layers": [0, 1]}))
    assert fit.measured(options("full-bf16", f"pretrained_model_name_or_path={tmp_path}")) is None


def test_an_offloading_preset_needs_the_ram_it_was_measured_with():
    values = presets.load("lora-8gb").values  # text encoders in CPU memory (RamTorch)
    need = fit.measured(values).rss_gib
    assert need and need > 1
    fit.check("lora-8gb", values, None, ram_gib=need + 1)
    with pytest.raises(UserError) as caught:
        fit.check("lora-8gb", values, None, ram_gib=need / 2)
    assert f"about {need:.1f} GiB of RAM" in str(caught.value) and "\n" not in str(caught.value)


def local_sd3_medium(tmp_path):
    """A local SD3 Medium folder as far as the checks before training read it (its marker)."""
    from sd3fit import sd3_medium

    model = tmp_path / "sd3-medium"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    (model / sd3_medium.MARKER).write_text("{}")
    return f"pretrained_model_name_or_path={model}"


def test_train_chooses_from_the_command_line(tmp_path):
    runs = tmp_path / "runs"
    proc = run_sd3fit("train", "lora", local_sd3_medium(tmp_path), "--gpu", "16GB", "--runs-dir", str(runs))
    line = one_line_error(proc)  # chosen, then stopped by the next check: the study's dataset folder is not here
    assert "data/sargent" in line
    assert "sd3fit: lora on a 16GB card (14.90 GiB): lora-24gb, the fastest preset measured to fit" in proc.stdout
    line = one_line_error(run_sd3fit("train", "full", "--gpu", "6GB", "--runs-dir", str(runs)))
    assert "no full preset fits a 6GB card (5.59 GiB); the smallest card that works is 8GB" in line
    assert "--gpu" in one_line_error(run_sd3fit("train", "lora", "--gpu", "twelve", "--runs-dir", str(runs)))
    assert not runs.exists()


def test_without_a_gpu_lora_asks_for_the_card(tmp_path):
    env = fake_nvidia_smi(tmp_path)  # an nvidia-smi that finds no GPU
    line = one_line_error(run_sd3fit("train", "lora", "--runs-dir", str(tmp_path / "runs"), env=env))
    assert "no GPU found" in line and "--gpu 12GB" in line


@pytest.mark.parametrize("card, expected", [("NVIDIA GeForce RTX 4080, 16376", "lora-24gb"),  # 16 GiB: 13.8 fits
                                             ("NVIDIA GeForce RTX 3060, 12288", "lora-12gb")])  # 12 GiB: it does not
def test_the_gpu_nvidia_smi_finds_is_used_when_no_card_is_named(tmp_path, card, expected):
    env = fake_nvidia_smi(tmp_path, card)
    proc = run_sd3fit("train", "lora", local_sd3_medium(tmp_path), "--runs-dir", str(tmp_path / "runs"), env=env)
    assert f"lora on {card.split(',')[0]} ({int(card.split(', ')[1]) / 1024:.2f} GiB): {expected}," in proc.stdout


# -- several cards: `--num-processes N` with `--gpu SIZE` means N cards of that size --------------------------------
def two_process_rows(tmp_path, peak_gib: float):
    """A results file holding lora-8gb's benchmark row made into a two-process one whose largest process peaked at
    `peak_gib` on the device (the run's files copied beside it, as the benchmark writes them)."""
    import shutil

    from sd3fit.bench import results
    from sd3fit.presets import PROJECT_DIR

    one = fit.measured(presets.load("lora-8gb").values)
    reference = PROJECT_DIR / one.reference
    row = next(r for r in results.read(reference) if one.run.endswith(r["run"].rsplit("/", 1)[-1]))
    out = tmp_path / "bench"
    shutil.copytree(PROJECT_DIR / one.run, out / "runs" / "two", ignore=shutil.ignore_patterns("tensorboard"))
    row.update(run="runs/two", processes=2, largest_rank_device_gib=peak_gib)
    (out / "results.jsonl").write_text(json.dumps(row) + "\n")
    return out / "results.jsonl"


def test_n_cards_are_judged_by_a_benchmark_run_on_as_many_processes(tmp_path, monkeypatch):
    values = presets.load("lora-8gb").values
    # the committed benchmark has no run on two processes: nothing judges two cards, nothing is chosen for them
    assert fit.measured(values, processes=2) is None
    with pytest.raises(UserError, match="no lora preset has a benchmark run on 2 processes to judge 2 cards by"):
        fit.pick("lora", fit.card("12GB"), [], processes=2)
    reference = two_process_rows(tmp_path, peak_gib=6.5)
    found = fit.measured(values, references=[reference], processes=2)
    assert found.device_gib == 6.5  # the largest process's peak, not rank 0's whole-run column
    assert fit.measured(values, references=[reference]) is None  # a two-process row says nothing of one process
    monkeypatch.setattr(fit, "REFERENCES", (reference,))
    assert fit.pick("lora", fit.card("8GB"), [], processes=2) == "lora-8gb"
    with pytest.raises(UserError) as caught:
        fit.pick("lora", fit.card("6GB"), [], processes=2)
    assert ("no lora preset fits 2 x a 6GB card (5.59 GiB); the smallest card that works is 8GB (lora-8gb needs "
            "6.50 GiB on each of 2 processes)") in str(caught.value)
    with pytest.raises(UserError, match=r"needs more than 6.50 GiB of GPU memory on each of 2 processes"):
        fit.check("lora-8gb", values, fit.card("6GB"), processes=2)
    fit.check("lora-8gb", values, fit.card("8GB"), processes=2)


def test_train_names_the_cards_it_would_need_for_several_processes(tmp_path):
    line = one_line_error(run_sd3fit("train", "lora", "--gpu", "12GB", "--num-processes", "2",
                                     "--runs-dir", str(tmp_path / "runs")))
    assert "no lora preset has a benchmark run on 2 processes" in line and "sd3fit bench --num-processes 2" in line
    assert not (tmp_path / "runs").exists()
    line = one_line_error(run_sd3fit("train", "lora", "--gpu", "12GB", "--num-processes", "0",
                                     "--runs-dir", str(tmp_path / "runs")))
    assert "--num-processes must be 1 or more, not 0" in line
