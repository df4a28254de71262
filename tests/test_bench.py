"""`sd3fit bench`: budgets, FLOP counts, rows from run folders, the report's tables and figures, and a real
benchmark of two presets on the tiny SD3 (SimpleTuner training, one process per preset)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error, run_sd3fit, tree_snapshot
from sd3fit.bench import budget, flops, results, rows
from sd3fit.errors import UserError
from sd3fit.runs import Run

SD3_MEDIUM = dict(  # the public transformer config of SD3 Medium
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)


# -- budgets -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, gib", [("24GB", 24e9 / 2**30), ("22.5GiB", 22.5), ("16000MiB", 16000 / 1024),
                                       ("8 gb", 8e9 / 2**30), ("none", None), ("0", None)])
def test_budget_sizes(text, gib):
    parsed = budget.parse(text)
    assert parsed.gib == pytest.approx(gib) if gib else parsed.gib is None


@pytest.mark.parametrize("text", ["24", "24TB", "lots", "0GB", "-1GB"])
def test_budget_refuses_what_it_cannot_read(text):
    with pytest.raises(UserError, match="GPU budget"):
        budget.parse(text)


def test_card_budget_is_each_presets_own_card():
    card = budget.parse("card")
    assert card.slug == "card" and card.gib is None
    assert card.for_preset("12GB").gib == pytest.approx(12e9 / 2**30) and card.for_preset("12GB").label == "12GB"
    assert card.for_preset(None).gib is None  # a preset made for no card runs uncapped
    assert budget.parse("24GB").for_preset("12GB").label == "24GB"  # a size given outright applies to every preset


def test_a_card_fits_only_below_its_whole_run_device_peak():
    from sd3fit.report.bench import _verdict

    row = {"status": "finished", "budget_gib": 11.18, "run_peak_device_gib": 8.9}
    assert _verdict(row) == "fits "
    assert _verdict({**row, "run_peak_device_gib": 11.5}) == "over "  # ran under the cap, but the card holds more
    assert _verdict({**row, "status": "out_of_memory"}) == "OOM at "


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H200", 989.4), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.1),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla T4", None), (None, None)])
def test_peak_bf16_throughput_by_gpu_name(name, peak):
    assert flops.peak_tflops(name) == peak


# -- model FLOPs ---------------------------------------------------------------------------------------------------
def _forward_flops(config: dict, resolution: int, text_tokens: int) -> float:
    """Forward FLOPs of SD3's MMDiT by hand: every linear layer 2 x in x out per token, joint attention
    4 x N^2 x width per layer; embeddings of the timestep and pooled text are per image and left out (tiny)."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    image = (resolution // 8 // config["patch_size"]) ** 2
    mlp = 4 * width
    per_token = 3 * width * width + width * width + 2 * width * mlp  # q, k, v, out, feed-forward
    flops = 0.0
    for layer in range(config["num_layers"]):
        last = layer == config["num_layers"] - 1
        flops += 2 * image * per_token
        # the text stream of the last block only feeds attention (q, k, v; no output projection or feed-forward)
        flops += 2 * text_tokens * (3 * width * width if last else per_token)
        flops += 4 * (image + text_tokens) ** 2 * width
    patch = config["in_channels"] * config["patch_size"] ** 2
    flops += 2 * image * patch * width + 2 * image * width * config["out_channels"] * config["patch_size"] ** 2
    flops += 2 * text_tokens * config["joint_attention_dim"] * width  # context embedder
    return flops


def test_full_fine_tune_counts_three_forward_passes_of_sd3_medium():
    counted = flops.per_image(SD3_MEDIUM, {"model_type": "full"}, 1024)
    forward = _forward_flops(SD3_MEDIUM, 1024, flops.text_tokens({}))
    # the hand count leaves out AdaLayerNorm projections (per image, not per token): within 0.5 %
    assert counted == pytest.approx(3 * forward, rel=0.005)
    assert counted / 1e12 == pytest.approx(25.9, abs=0.05)


def test_lora_counts_activation_gradients_but_not_frozen_weight_gradients():
    forward = _forward_flops(SD3_MEDIUM, 1024, flops.text_tokens({}))
    full = flops.per_image(SD3_MEDIUM, {"model_type": "full"}, 1024)
    lora = {r: flops.per_image(SD3_MEDIUM, {"model_type": "lora", "lora_rank": r,
                                            "peft_lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}, 1024)
            for r in (1, 64)}
    assert 2 * forward < lora[1] < lora[64] < full
    # each extra rank adds 2 x (in + out) FLOPs per adapted layer and image token (to_q, to_k, to_v, to_out.0
    # are the image stream's; the text stream's add_*_proj are not adapted), three times: forward, two gradients
    width, layers, image_tokens = 1536, 24, 4096
    extra = 3 * 2 * 63 * (width + width) * image_tokens * 4 * layers
    assert lora[64] - lora[1] == pytest.approx(extra, rel=0.01)


def test_text_tokens_follow_simpletuners_t5_cap():
    assert flops.text_tokens({}) == 77 + 154
    assert flops.text_tokens({"tokenizer_max_length": 77}) == 154
    assert flops.text_tokens({"tokenizer_max_length": 512}) == 77 + 154


# -- rows from run folders -----------------------------------------------------------------------------------------
def _run_folder(tmp_path: Path, result: dict | None, log: str = "", step_times=(2.0, 1.0, 1.1, 0.9, 1.2, 1.0)) -> Run:
    run = Run(tmp_path / "run")
    run.dir.mkdir(parents=True)
    run.config.write_text(json.dumps({"simpletuner": {"model_type": "lora", "lora_rank": 8, "train_batch_size": 1,
                                                      "resolution": 1024, "base_model_precision": "int8-quanto"}}))
    if result is not None:
        run.result.write_text(json.dumps(result))
    run.log.write_text(log)
    with run.metrics.open("w") as f:
        for step, seconds in enumerate(step_times, 1):
            f.write(json.dumps({"step": step, "time": 100.0 + step, "time/step_s": seconds,
                                "mem/peak_allocated_gib": 3.0 + step / 10, "mem/peak_reserved_gib": 4.0,
                                "mem/alloc_retries": step // 3}) + "\n")
    return run


FINISHED = {"status": "finished", "global_step": 6,
            "transformer": {"parameters": 100, "trainable_parameters": 10, "quantized_modules": 5},
            "measure": {"memory": {"peak_allocated_gib": 16.5, "peak_reserved_gib": 19.0, "outside_allocator_gib": 0.75,
                                   "ooms": 0}}}


def test_row_statistics_cover_the_steps_after_warm_up(tmp_path):
    run = _run_folder(tmp_path, FINISHED)
    row = rows.from_run(run, 0, warmup_steps=2, flops_per_image=20e12, peak=1000.0)
    measured = [1.1, 0.9, 1.2, 1.0]  # steps 3-6
    assert row["status"] == "finished" and row["error"] is None
    assert row["measured_steps"] == 4
    assert row["step_s_median"] == pytest.approx(np.median(measured))
    assert row["step_s_p10"] == pytest.approx(np.percentile(measured, 10))
    assert row["step_s_p90"] == pytest.approx(np.percentile(measured, 90))
    assert row["images_per_s"] == pytest.approx(1 / np.median(measured))
    assert row["mfu"] == pytest.approx(20e12 / np.median(measured) / 1000e12)
    assert row["step_peak_allocated_gib"] == pytest.approx(3.6)  # over all steps, warm-up included
    assert row["run_peak_reserved_gib"] == 19.0
    assert row["run_peak_device_gib"] == pytest.approx(19.75)
    assert row["alloc_retries"] == 2
    assert (row["lora_rank"], row["base_model_precision"], row["quantized_modules"]) == (8, "int8-quanto", 5)


def test_a_row_of_several_processes_counts_all_their_images_and_the_largest_peak_of_any(tmp_path):
    memory = lambda reserved: {"peak_reserved_gib": reserved, "outside_allocator_gib": 0.5}  # noqa: E731
    ranks = [{"rank": 0, "memory": memory(7.0)}, {"rank": 1, "memory": memory(7.5)}]
    run = _run_folder(tmp_path, {**FINISHED, "processes": 2, "ranks": ranks})
    row = rows.from_run(run, 0, warmup_steps=2, flops_per_image=None, peak=None)
    assert row["processes"] == 2 and row["images_per_s"] == pytest.approx(2 / np.median([1.1, 0.9, 1.2, 1.0]))
    assert row["largest_rank_device_gib"] == pytest.approx(8.0)
    one = rows.from_run(_run_folder(tmp_path / "one", FINISHED), 0, warmup_steps=2, flops_per_image=None, peak=None)
    assert one["processes"] == 1 and one["largest_rank_device_gib"] is None


def test_an_out_of_memory_error_the_trainer_caught_still_makes_the_run_out_of_memory(tmp_path):
    log = ("[RANK 0] 2026-11-28 02:28:22,823 [ERROR] Error generating validation image: CUDA out of memory. Tried to "
           "allocate 512.00 MiB. GPU 0 has a total capacity of 139.80 GiB\n")
    row = rows.from_run(_run_folder(tmp_path, FINISHED, log), 0, 2, None, None)
    assert row["status"] == "out_of_memory"
    assert "512.00 MiB" in row["error"] and "validation image" in row["error"] and "went on to its last step" in row["error"]
    assert row["step_s_median"] is not None  # the steps ran; their times stay


def test_out_of_memory_from_the_result_and_from_the_allocators_counter(tmp_path):
    stopped = {"status": "failed", "out_of_memory": True, "error": "OutOfMemoryError: CUDA out of memory."}
    assert rows.from_run(_run_folder(tmp_path / "a", stopped), 1, 2, None, None)["status"] == "out_of_memory"
    counted = json.loads(json.dumps(FINISHED))
    counted["measure"]["memory"]["ooms"] = 3
    assert rows.from_run(_run_folder(tmp_path / "b", counted), 0, 2, None, None)["status"] == "out_of_memory"


def test_a_run_without_result_failed(tmp_path):
    row = rows.from_run(_run_folder(tmp_path, None, step_times=()), 1, 2, None, None)
    assert row["status"] == "failed" and "status 1" in row["error"]
    assert row["step_s_median"] is None and row["measured_steps"] == 0


# -- report ------------------------------------------------------------------------------------------------------
def _row(preset, gpu, step, budget_label="none", model_type="lora", status="finished", reserved=10.0, in_steps=5.0):
    return {"preset": preset, "budget": budget_label, "budget_gib": None if budget_label == "none" else 22.35,
            "status": status, "error": None if status == "finished" else "CUDA out of memory", "model_type": model_type,
            "gpu": gpu, "model_label": "random", "resolution": 1024, "batch_size": 1, "warmup_steps": 5,
            "measured_steps": 25, "step_s_median": step, "step_s_p10": step * 0.9, "step_s_p90": step * 1.1,
            "images_per_s": 1 / step, "mfu": 0.02, "step_peak_allocated_gib": in_steps,
            "step_peak_reserved_gib": in_steps + 0.5, "run_peak_allocated_gib": reserved - 1,
            "run_peak_reserved_gib": reserved, "date": "2026-11-28T00:00:00Z", "torch": "2.11.0"}


def _cells(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_keeps_gpus_apart_and_compares_with_the_full_fine_tune_of_the_same_gpu(tmp_path):
    from sd3fit.report import bench

    results = [_row("full", "GPU A", 2.0, model_type="full", reserved=20.0, in_steps=16.0), _row("lora", "GPU A", 1.0),
               _row("full", "GPU B", 4.0, model_type="full", reserved=20.0, in_steps=16.0),
               _row("lora", "GPU B", 3.0, reserved=5.0, in_steps=2.0),
               _row("lora", "GPU B", 3.3, budget_label="16GB", status="out_of_memory")]
    written = bench.write(results, tmp_path / "report")
    names = sorted(p.name for p in written)
    assert names == ["peak_memory-gpu-a-random-1024-1.png", "peak_memory-gpu-b-random-1024-1.png", "step_time-gpu-a-random-1024-1.png",
                     "step_time-gpu-b-random-1024-1.png", "summary.md", "tradeoff-gpu-a-random-1024-1.png",
                     "tradeoff-gpu-b-random-1024-1.png"]
    text = (tmp_path / "report" / "summary.md").read_text()
    section_a, section_b = text.split("### GPU B")
    # the last three columns: time, in-step memory and whole-run memory as ratios to the same GPU's full fine-tune
    assert _cells(section_a, "| `lora`")[-3:] == ["0.50", "0.31", "0.50"]  # 1/2, 5/16, 10/20
    assert _cells(section_b, "| `lora` | none")[-3:] == ["0.75", "0.12", "0.25"]  # 3/4, 2/16, 5/20
    oom = _cells(section_b, "| `lora` | 16GB")
    assert oom[2:4] == ["sd3fit", "**out of memory**"] and oom[-3:] == ["–", "–", "–"]  # no full fine-tune under 16GB
    assert "under budget 16GB" in section_b
    assert "another process" not in text


def test_report_says_when_another_process_held_the_gpu(tmp_path):
    from sd3fit.report import bench

    busy = _row("lora", "GPU A", 1.0)
    busy["gpu_in_use_before_gib"] = 5.76
    quiet = _row("full", "GPU A", 2.0, model_type="full", reserved=20.0, in_steps=16.0)
    quiet["gpu_in_use_before_gib"] = 0.0
    bench.write([quiet, busy], tmp_path / "report")
    notes = [line for line in (tmp_path / "report" / "summary.md").read_text().splitlines() if "another process" in line]
    assert len(notes) == 1 and notes[0].startswith("- `lora`") and "5.76 GiB" in notes[0]


# -- the benchmark, for real --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory, demo_assets):
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = run_sd3fit("bench", "--presets", "demo", "full-bf16", "--steps", "3", "--warmup-steps", "1",
                      "--resolution", "128", "--model", str(demo_assets["model"]), "--out", str(out), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_bench_writes_a_row_per_preset_with_every_field(bench, demo_assets):
    from importlib.metadata import version

    out, proc = bench
    found = results.read(out / "results.jsonl")
    assert [r["preset"] for r in found] == ["demo", "full-bf16"]
    for row in found:
        assert set(row) == set(rows.FIELDS)
        assert row["status"] == "finished", row["error"]
        assert row["budget"] == "none" and row["budget_gib"] is None
        # the default --speed: the presets as written, in the folders a benchmark made before --speed existed
        assert row["speed"] == "sd3fit" and Path(row["run"]).name == f"{row['preset']}-nocap"
        assert (row["resolution"], row["batch_size"], row["warmup_steps"]) == (128, 1, 1)
        assert row["measured_steps"] == 3 and row["global_step"] == 4
        assert 0 < row["step_s_p10"] <= row["step_s_median"] <= row["step_s_p90"]
        assert row["images_per_s"] == pytest.approx(1 / row["step_s_median"])
        assert row["model_tflop_per_image"] > 0
        if row["gpu"] is None:
            assert row["mfu"] is None  # a CPU: no GPU peak to compare with
        assert row["torch"] == version("torch") and row["simpletuner"] == version("simpletuner")
        assert row["diffusers"] == version("diffusers") and row["date"].startswith("20")
        assert row["command"].startswith("sd3fit bench --presets demo full-bf16")
        run = Run(out / "runs" / Path(row["run"]).name)
        assert run.read_result()["status"] == "finished"
        assert not run.output.exists()  # trained weights are not kept without --keep-weights
        # the run was the preset's own options with the benchmark's few changes
        config = run.read_config()
        assert config["preset"].endswith(f"{row['preset']}.json")
        assert config["simpletuner"]["max_train_steps"] == 4 and config["simpletuner"]["disable_benchmark"] is True
    demo, full = found
    assert demo["model_type"] == "lora" and demo["lora_rank"] == 4 and full["model_type"] == "full"
    assert full["trainable_parameters"] == full["parameters"] > demo["trainable_parameters"] > 0
    assert full["model_tflop_per_image"] > demo["model_tflop_per_image"]
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["preset"] for r in table] == ["demo", "full-bf16"] and list(table[0]) == list(rows.FIELDS)
    assert float(table[1]["step_s_median"]) == pytest.approx(full["step_s_median"])
    assert "[1/2] demo, GPU budget none" in proc.stdout and "[2/2] full-bf16" in proc.stdout


def test_bench_resume_runs_only_what_is_missing_and_checks_settings(bench, demo_assets):
    out, _ = bench
    before = tree_snapshot(out)
    args = ["bench", "--presets", "demo", "full-bf16", "--warmup-steps", "1", "--resolution", "128",
            "--model", str(demo_assets["model"]), "--out", str(out), "--resume"]
    proc = run_sd3fit(*args, "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = tree_snapshot(out)
    # every row was there: nothing ran; only bench.json lists the call
    assert {k: v for k, v in after.items() if k != "bench.json"} == {k: v for k, v in before.items() if k != "bench.json"}
    record = json.loads((out / "bench.json").read_text())
    assert ["--resume" in c["command"] for c in record["calls"]] == [False, True]
    assert record["steps"] == 3 and record["presets"] == ["demo", "full-bf16"]
    line = one_line_error(run_sd3fit(*args, "--steps", "5"))
    assert "steps=3" in line and "--resume" in line
    assert tree_snapshot(out) == after


def test_report_draws_the_figures_from_the_results(bench, tmp_path):
    out, _ = bench
    proc = run_sd3fit("report", str(out / "results.jsonl"), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report" / "step_time.png").stat().st_size > 10_000
    text = (tmp_path / "report" / "summary.md").read_text()
    found = {r["preset"]: r for r in results.read(out)}
    assert f"| {found['demo']['step_s_median']:.3f} |" in text
    assert not (tmp_path / "report" / "peak_memory.png").exists()  # a CPU run has no GPU memory to draw


def test_bench_bad_input(tmp_path, demo_assets):
    out = tmp_path / "out"
    assert "needs a CUDA GPU" in one_line_error(run_sd3fit("bench", "--presets", "demo", "--gpu-budget", "24GB", "--out", str(out)))
    assert "GPU budget" in one_line_error(run_sd3fit("bench", "--presets", "demo", "--gpu-budget", "24", "--out", str(out)))
    assert "preset not found" in one_line_error(run_sd3fit("bench", "--presets", "nope", "--out", str(out)))
    assert "--resolution" in one_line_error(run_sd3fit("bench", "--presets", "demo", "--resolution", "1000", "--out", str(out)))
    assert "--resume needs --out" in one_line_error(run_sd3fit("bench", "--presets", "demo", "--resume"))
    assert "same preset twice" in one_line_error(run_sd3fit("bench", "--presets", "demo", "demo", "--out", str(out)))
    assert "same budget twice" in one_line_error(
        run_sd3fit("bench", "--presets", "demo", "--gpu-budget", "24GB", "24000MB", "--out", str(out)))
    assert "--num-processes must be 1 or more" in one_line_error(
        run_sd3fit("bench", "--presets", "demo", "--num-processes", "0", "--out", str(out)))
    assert "before the processes have averaged" in one_line_error(
        run_sd3fit("bench", "--presets", "full-24gb", "--num-processes", "2", "--out", str(out)))
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    assert "not empty" in one_line_error(run_sd3fit("bench", "--presets", "demo", "--out", str(out)))
    assert (out / "keep.txt").read_text() == "earlier results"


def test_rescan_recomputes_rows_from_run_folders_into_a_new_file(tmp_path):
    out = tmp_path / "bench"
    run = _run_folder(out / "runs", FINISHED, log="[ERROR] Error generating validation image: CUDA out of memory. "
                                                  "Tried to allocate 2.00 GiB. GPU 0 has")
    written = {key: None for key in rows.FIELDS}
    written.update(preset="lora", budget="24GB", status="finished", run=f"/elsewhere/runs/{run.dir.name}",
                   warmup_steps=2, model_tflop_per_image=20.0, peak_tflops=1000.0, gpu="GPU A")
    (out / "results.jsonl").write_text(json.dumps(written) + "\n")
    before = (out / "results.jsonl").read_text()
    target = results.rescan(out)
    assert (out / "results.jsonl").read_text() == before  # the benchmark's own file is kept as written
    (row,) = results.read(target)
    assert row["status"] == "out_of_memory" and "2.00 GiB" in row["error"]
    assert (row["gpu"], row["budget"], row["measured_steps"]) == ("GPU A", "24GB", 4)
    assert row["mfu"] == pytest.approx(20e12 * row["images_per_s"] / 1000e12)
    with pytest.raises(UserError, match="already exists"):
        results.rescan(out)


def test_a_results_line_cut_short_by_a_kill_is_left_out_and_other_damage_is_an_error(tmp_path):
    good = json.dumps({"preset": "a", "status": "finished"})
    (tmp_path / "results.jsonl").write_text(good + "\n" + '{"preset": "b", "sta')
    assert [r["preset"] for r in results.read(tmp_path)] == ["a"]
    (tmp_path / "results.jsonl").write_text('{"preset": "b", "sta\n' + good + "\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        results.read(tmp_path)


def test_an_interrupted_benchmark_kills_its_trainer_at_once(tmp_path):
    """A benchmark's run is never resumed: on Ctrl-C (or `timeout`) the trainer must not be left training, nor be
    waited for while it compiles its way to a step boundary."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "trainer.pid"
    stubborn = ("import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('ready', flush=True); time.sleep(120)")
    # as the benchmark does: Ctrl-C raises KeyboardInterrupt even where the caller's shell left SIGINT ignored
    script = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from sd3fit import launch; from sd3fit.runs import Run; "
              f"run = Run(__import__('pathlib').Path({str(tmp_path)!r})); "
              f"sys.exit(launch._launch(run, [sys.executable, '-c', {stubborn!r}], dict(__import__('os').environ), "
              "False, False, None, stop_at_once=True))")
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    trainer = int(pid_file.read_text())
    bench.send_signal(signal.SIGINT)
    bench.wait(timeout=20)  # not the trainer's 120 s: it ignores SIGTERM, so only a kill ends it
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(trainer, 0)
    assert "ready" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("wrote_result", [True, False])
def test_an_interrupt_after_the_trainer_wrote_its_result_keeps_the_runs_row(tmp_path, demo_assets, monkeypatch,
                                                                            wrote_result):
    """`timeout` may stop a benchmark while a finished trainer is still exiting: the run is whole and gets its row
    (then the benchmark stops); a run stopped before its result was written gets none."""
    from sd3fit.bench import runner

    def trainer_killed_while_exiting(prepared, **kwargs):
        done = _run_folder(tmp_path / "template", FINISHED)
        for path in (done.metrics, done.log, *([done.result] if wrote_result else [])):
            (prepared.run.dir / path.name).write_bytes(path.read_bytes())
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.launch, "launch", trainer_killed_while_exiting)
    settings = runner.Settings(presets=["demo", "full-bf16"], budgets=["none"], steps=3, warmup_steps=1,
                               resolution=128, model=str(demo_assets["model"]))
    out = tmp_path / "out"
    assert runner.run(settings, out, resume=False, command="sd3fit bench ...") == 130
    found = results.read(out) if (out / "results.jsonl").exists() else []
    assert [(r["preset"], r["status"]) for r in found] == ([("demo", "finished")] if wrote_result else [])
