"""Every preset made for a card trains the tiny SD3 end to end through ./train.sh for 50 steps (its own memory
options: quantized text encoders and base, checkpointing, 8-bit optimizer state with stochastic rounding, gradient
release, offloading during start-up, VAE tiling), saves weights that load into diffusers, and keeps its loss curve within
the seed-to-seed spread of its unconstrained counterpart (the study's lora-r64-bf16 and full-bf16, at the same
learning rate): saving memory must not change what is learned. A full preset's curve (8-bit optimizer state with
bf16 stochastic rounding) must also stay within that spread of AdamW with fp32 weights and state.

The spread: both counterpart runs see the same data, and a seed changes the noise and timesteps drawn at every step,
so the root mean square of their per-step loss differences is how far the curve moves when nothing but chance
changes. The preset runs with the first seed, so it draws what the first counterpart run drew; its curve must stay
closer to that run's than the other seed's curve does."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT, run_all
from sd3fit import fit, host, presets, schema
from sd3fit.runs import Run
from test_train_e2e import assert_changes_output, base  # noqa: F401  (base is a fixture)

STEPS = 50
TINY = [  # the card presets' memory options on the tiny model: only size, data, length and learning rate change
    "pretrained_model_name_or_path={demo}/tiny-sd3", "dataset_dir={demo}/shapes",
    f"data_backend_config={ROOT / 'config' / 'datasets' / 'image-folder.json'}", "resolution=128",
    "minimum_image_size=64", "validation_resolution=128x128", "validation_num_inference_steps=2",
    f"max_train_steps={STEPS}", f"validation_steps={STEPS}", f"checkpointing_steps={STEPS // 2}", "report_to=none",
    "lr_scheduler=constant", "lr_warmup_steps=0",
]
LEARNING_RATE = {"lora": 1e-3, "full": 1e-4}
REFERENCE = {"lora": "lora-r64-bf16", "full": "full-bf16"}
FP32_STATE = ("optimizer=torch-adamw", "mixed_precision=no")  # fp32 weights, so AdamW's moments are fp32 too
SEEDS = (42, 43)  # the presets' seed first


def card_presets(kind: str) -> list[str]:
    return fit.candidates(kind)


def losses(run) -> list[float]:
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    values = [r["train_loss"] for r in rows]
    assert all(math.isfinite(v) for v in values), values
    return values


def rms(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a))


def preset_args(preset: str) -> list[str]:
    """A card preset's run on the tiny model: its own memory options, the common length and learning rate."""
    data = presets.read(presets.CONFIG_DIR / f"{preset}.json")
    # RamTorch (text encoders streamed from CPU memory) needs CUDA; on a CPU the encoders already live in CPU memory
    # (and with it the bound on its copies)
    cpu_only = ["ramtorch=false", "ramtorch_copy_ahead_gib=null"] if data.get("ramtorch") and not torch.cuda.is_available() else []
    return [preset, *TINY, *cpu_only, f"learning_rate={LEARNING_RATE[data['model_type']]}", f"seed={SEEDS[0]}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_assets):
    """Every run this module checks, trained side by side (`run_all`): each kind's unconstrained counterpart per
    seed, full fine-tuning with fp32 state, and every card preset. (root, {name: finished process})."""
    root = tmp_path_factory.mktemp("card-runs")
    jobs = {f"{preset}-{seed}": [preset, *TINY, f"learning_rate={LEARNING_RATE[kind]}", f"seed={seed}"]
            for kind, preset in REFERENCE.items() for seed in SEEDS}
    # fp32 weights and state, at the presets' seed (the spread it is held to is the counterpart's two seeds': what a
    # seed changes is the noise and timesteps drawn, not the optimizer)
    jobs["fp32"] = [REFERENCE["full"], *TINY, f"learning_rate={LEARNING_RATE['full']}", f"seed={SEEDS[0]}", *FP32_STATE]
    jobs.update({preset: preset_args(preset) for preset in card_presets("lora") + card_presets("full")})
    done = run_all({name: [str(ROOT / "train.sh"), *args, "--name", name, "--runs-dir", str(root)]
                    for name, args in jobs.items()})
    return root, done


def finished(trained, name: str) -> Run:
    """The run `name` of the `trained` fixture, which must have ended well."""
    root, done = trained
    proc, run = done[name], Run(root / name)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"run folder: {run.dir}" in proc.stdout
    return run


@pytest.fixture(scope="module")
def references(trained):
    """Each kind's unconstrained counterpart: its loss curve per seed."""
    return {kind: {seed: losses(finished(trained, f"{preset}-{seed}")) for seed in SEEDS}
            for kind, preset in REFERENCE.items()}


@pytest.fixture(scope="module")
def fp32_state(trained):
    """Full fine-tuning with torch's AdamW on fp32 weights, at the presets' seed: its loss curve."""
    return losses(finished(trained, "fp32"))


@pytest.mark.parametrize("preset", card_presets("lora") + card_presets("full"))
def test_every_card_a_preset_claims_is_backed_by_a_benchmark_row_under_that_card(preset):
    """The committed benchmark ran this very configuration (SD3 Medium's architecture) under its card's budget, to
    the end, without any out-of-memory error, and its whole-run device peak is below the card's size."""
    loaded = presets.load(preset)
    found = fit.measured(loaded.values)
    assert found is not None, f"{preset} has no benchmark row of its configuration"
    card = loaded.values["card"]
    assert found.device_gib is not None and found.fits(host.size_gib(card)), (preset, card, found)
    row = next(json.loads(line) for line in (ROOT / found.reference).read_text().splitlines()
               if found.run.endswith(json.loads(line)["run"].rsplit("/", 1)[-1]))
    # measured under its card's budget or a smaller one
    assert row["status"] == "finished" and host.size_gib(row["budget"]) <= host.size_gib(card) and row["measured_steps"] > 0


@pytest.mark.parametrize("preset", card_presets("lora") + card_presets("full"))
def test_card_preset_trains_like_its_unconstrained_counterpart(request, preset, trained, references, base,  # noqa: F811
                                                               demo_assets):
    data = presets.read(presets.CONFIG_DIR / f"{preset}.json")
    kind = data["model_type"]
    run = finished(trained, preset)
    result = run.read_result()
    assert result["status"] == "finished" and result["global_step"] == STEPS and not result.get("out_of_memory")
    curve, same_seed, other_seed = losses(run), references[kind][SEEDS[0]], references[kind][SEEDS[1]]
    spread = rms(same_seed, other_seed)
    assert spread > 0.01  # the seeds really drew differently: the bound below means something
    assert rms(curve, same_seed) <= spread, (rms(curve, same_seed), spread)
    if kind == "full":
        fp32 = request.getfixturevalue("fp32_state")
        assert rms(curve, fp32) <= spread, (rms(curve, fp32), spread)
    options = json.loads(run.config.read_text())["simpletuner"]
    quantized = options.get("base_model_precision") in ("int8-quanto", *schema.SD3FIT_PRECISIONS)
    assert (result["transformer"]["quantized_modules"] > 0) == quantized
    assert (run.output / f"checkpoint-{STEPS // 2}").is_dir()  # a checkpoint saved inside the run
    speed = result["speed"]
    assert speed["patches"] == schema.speed_patches(data) and speed["patches"]
    if data.get("release_by_block"):  # torchao's AdamW stepped a block per compiled call
        release = speed["gradient_release"]
        assert release["compiled_buckets"] and 0 < release["bucket_steps"] < release["parameter_steps"]
    if data.get("stream_optimizer_state"):  # the optimizer's state lived in CPU memory, streamed a block at a time
        assert speed["gradient_release"]["streamed_state_bytes"] > 0
    pipe, base_images = base
    if kind == "lora":
        pipe.load_lora_weights(result["artifacts"]["adapter"], adapter_name="tuned")
        try:
            assert_changes_output(pipe, base_images)
        finally:
            pipe.delete_adapters("tuned")
    else:
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        transformer = SD3Transformer2DModel.from_pretrained(result["artifacts"]["transformer"], torch_dtype=torch.float32)
        tuned = StableDiffusion3Pipeline.from_pretrained(demo_assets["model"], transformer=transformer)
        assert_changes_output(tuned, base_images)
