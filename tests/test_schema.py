import json

import pytest

from sd3fit import schema
from sd3fit.errors import UserError
from sd3fit.presets import CONFIG_DIR

BASE = {
    "model_family": "sd3",
    "pretrained_model_name_or_path": "stabilityai/stable-diffusion-3-medium-diffusers",
    "data_backend_config": "/x/datasets.json",
    "model_type": "lora",
    "max_train_steps": 10,
    "num_train_epochs": 0,
}


def error(cfg) -> str:
    with pytest.raises(UserError) as info:
        schema.validate(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_preset_passes_the_schema(path):
    schema.validate(json.loads(path.read_text()))


def test_unknown_key_is_named_with_a_suggestion():
    assert error({**BASE, "lora_rnk": 4}) == "unknown option lora_rnk (did you mean lora_rank?)"


def test_unrelated_unknown_key_points_to_the_option_list():
    assert "unknown option frobnicate" in error({**BASE, "frobnicate": 1})


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("lora_rank", "16", "lora_rank must be a whole number"),
        ("lora_rank", 1.5, "lora_rank must be a whole number"),
        ("learning_rate", "fast", "learning_rate must be a number"),
        ("gradient_checkpointing", "yes", "gradient_checkpointing must be true or false"),
        ("base_model_precision", "int7-quanto", "base_model_precision must be one of"),
        ("mixed_precision", "fp64", "mixed_precision must be one of"),
        ("dataset_dir", 3, None),  # numbers become text for text options
    ],
)
def test_types_and_choices(key, value, words):
    if words is None:
        assert schema.validate({**BASE, key: value})[key] == str(value)
    else:
        assert words in error({**BASE, key: value})


def test_aliases_of_simpletuner_options_are_accepted():
    # the study's presets use SimpleTuner's older names
    out = schema.validate({**BASE, "checkpointing_steps": 500, "validation_steps": 100})
    assert out["checkpointing_steps"] == 500


def test_integers_are_accepted_for_float_options():
    assert schema.validate({**BASE, "learning_rate": 1})["learning_rate"] == 1.0


@pytest.mark.parametrize(
    "change,words",
    [
        ({"model_type": "full", "base_model_precision": "int8-quanto"}, "base_model_precision=int8-quanto needs model_type=lora"),
        ({"model_family": "flux"}, "model_family must be sd3"),
        ({"num_train_epochs": 3}, "num_train_epochs must be 0 when max_train_steps"),
        ({"max_train_steps": 0}, "max_train_steps is missing"),
        ({"push_to_hub": True}, "push_to_hub needs hub_model_id"),
        ({"lora_type": "lycoris"}, "lycoris_config"),
        ({"lora_rank": 0}, "lora_rank must be positive"),
        ({"base_model_precision": "fp8-quanto"}, "fp8-quanto is not supported for SD3"),
        ({"gradient_checkpointing": False, "gradient_checkpointing_interval": 2}, "needs gradient_checkpointing=true"),
        ({"output_dir": "/tmp/out"}, "output_dir is set by sd3fit"),
        ({"delete_unwanted_images": True}, "would delete files from your dataset folder"),
        ({"optimizer_release_gradients": True, "grad_clip_method": "norm", "max_grad_norm": 1.0}, "clipping by norm"),
        ({"optimizer_release_gradients": True, "fsdp_enable": True}, "cannot step FSDP's shards"),
        ({"stream_optimizer_state": True}, "set optimizer_release_gradients=true"),
        ({"ramtorch_copy_ahead_gib": 0.5}, "set ramtorch=true and ramtorch_text_encoder=true"),
        ({"ramtorch": True, "ramtorch_text_encoder": True, "ramtorch_copy_ahead_gib": 0}, "must be positive"),
        ({"fsdp_enable": True, "optimizer": "optimi-adamw"}, "cannot step FSDP2's sharded parameters"),
        ({"fsdp_enable": True, "fsdp_version": 2, "optimizer": "bnb-adamw8bit"}, "silently train with adamw_schedulefree"),
        ({"card": "twelve"}, "cannot read option card"),
    ],
)
def test_impossible_combinations_are_refused(change, words):
    assert words in error({**BASE, **change})


@pytest.mark.parametrize("key", ["pretrained_model_name_or_path", "data_backend_config", "model_family"])
def test_required_keys(key):
    cfg = dict(BASE)
    del cfg[key]
    assert key in error(cfg)


def test_split_keeps_sd3fit_keys_out_of_simpletuner_options():
    own, st = schema.split(schema.validate({**BASE, "dataset_dir": "/d", "description": "x"}))
    assert own == {"dataset_dir": "/d", "description": "x"}
    assert "dataset_dir" not in st and st["model_type"] == "lora"


def test_option_table_is_for_the_pinned_simpletuner():
    table = json.loads(schema._OPTIONS_FILE.read_text())
    assert table["simpletuner"] == schema.SIMPLETUNER_VERSION
    assert {"lora_rank", "base_model_precision", "model_family"} <= set(schema.simpletuner_options())


@pytest.mark.parametrize(
    "change, words",
    [
        ({"profiler_activities": "cpu gpu"}, "profiler_activities must name cpu and/or cuda"),
        ({"profiler_schedule_active": 0}, "profiler_schedule_active must be 1 or more"),
        ({"profiler_schedule_wait": -1}, "profiler_schedule_wait must be 0 or more"),
        ({"memory_snapshot_steps": -2}, "memory_snapshot_steps must be 0 or more"),
        ({"enable_profiler": "yes"}, "enable_profiler must be true or false"),
    ],
)
def test_measuring_keys_are_checked(change, words):
    with pytest.raises(UserError, match=words):
        schema.validate({**BASE, **change})


def test_measuring_keys_stay_with_sd3fit():
    from sd3fit.measure.settings import from_preset

    own, options = schema.split(schema.validate({**BASE, "enable_profiler": True, "profiler_activities": ["cuda", "cpu"]}))
    assert "enable_profiler" not in options and own["enable_profiler"] is True
    settings = from_preset(own)
    assert settings.profiler_activities == ("cuda", "cpu") and settings.step_metrics is True
