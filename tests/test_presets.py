import json

import pytest

from sd3fit import presets
from sd3fit.errors import UserError


def write(path, data):
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def preset_file(tmp_path):
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "ds.json").write_text("[]")
    return write(
        tmp_path / "mine.json",
        {
            "model_family": "sd3",
            "pretrained_model_name_or_path": "org/model",
            "data_backend_config": "sets/ds.json",
            "model_type": "lora",
            "max_train_steps": 5,
            "num_train_epochs": 0,
        },
    )


def test_find_by_name_and_by_path(preset_file):
    assert presets.find("lora-r16-int8") == presets.CONFIG_DIR / "lora-r16-int8.json"
    assert presets.find(str(preset_file)) == preset_file
    assert presets.find(None) == presets.DEMO_PRESET


def test_missing_preset_lists_the_available_ones():
    with pytest.raises(UserError, match=r"preset not found: nope\.json; .*lora-r16-int8"):
        presets.find("nope.json")


def test_invalid_json_is_located(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_family": "sd3",,}')
    with pytest.raises(UserError, match=r"not valid JSON: line 1, column 24"):
        presets.load(str(bad))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("lora_rank=16", ("lora_rank", 16)),
        ("--learning_rate=1e-4", ("learning_rate", 1e-4)),
        ("push_to_hub=false", ("push_to_hub", False)),
        ("validation_resolution=1024x1024", ("validation_resolution", "1024x1024")),
        ("peft_lora_target_modules=[\"to_q\"]", ("peft_lora_target_modules", ["to_q"])),
        ("validation_prompt=a=b", ("validation_prompt", "a=b")),
    ],
)
def test_override_values_are_read_as_json_or_text(text, expected):
    assert presets.parse_override(text) == expected


def test_override_without_equals_sign_is_refused():
    with pytest.raises(UserError, match="write key=value"):
        presets.parse_override("lora_rank")


def test_dataset_definition_is_relative_to_the_preset_and_overrides_win(preset_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "sets")
    p = presets.load(str(preset_file), ["lora_rank=8"])
    assert p.values["data_backend_config"] == str((tmp_path / "sets" / "ds.json").resolve())
    assert p.values["lora_rank"] == 8
    assert p.overrides == ["lora_rank=8"]


def test_existing_relative_paths_become_absolute(preset_file, tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    p = presets.load(str(preset_file), ["dataset_dir=imgs", "validation_prompt=imgs"])
    assert p.values["dataset_dir"] == str(tmp_path / "imgs")
    assert p.values["validation_prompt"] == "imgs"  # not a path option: left alone


def test_demo_placeholder_points_at_the_demo_assets(monkeypatch, tmp_path):
    monkeypatch.setenv("SD3FIT_CACHE_DIR", str(tmp_path))
    p = presets.load(None)
    assert p.uses_demo
    assert p.values["pretrained_model_name_or_path"] == str(tmp_path / "demo-v1" / "tiny-sd3")


def test_recorded_paths_leave_the_machine_out(tmp_path):
    from pathlib import Path

    from sd3fit.presets import CONFIG_DIR, portable

    assert portable(CONFIG_DIR / "demo.json") == "config/demo.json"
    assert portable(Path.home() / "models" / "sd3") == "~/models/sd3"
    assert portable(tmp_path) == str(tmp_path.resolve())


def test_recorded_overrides_leave_the_machine_out():
    from pathlib import Path

    from sd3fit.presets import CONFIG_DIR, portable_override

    assert portable_override(f"data_backend_config={CONFIG_DIR / 'datasets' / 'image-folder.json'}") == \
        "data_backend_config=config/datasets/image-folder.json"
    assert portable_override(f"dataset_dir={Path.home() / 'images'}") == "dataset_dir=~/images"
    assert portable_override("lora_rank=8") == "lora_rank=8"
    assert portable_override("validation_prompt=a/b") == "validation_prompt=a/b"
