"""`sd3fit bench --speed`: which runs each mode plans, resuming by (preset, budget, speed) with rows from before
--speed existed, the report's "sd3fit against stock" table, and a real `--speed both` benchmark of the tiny SD3."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import one_line_error, run_sd3fit, tree_snapshot
from sd3fit import presets
from sd3fit.bench import results, runner, speed
from sd3fit.errors import UserError
from sd3fit.schema import SPEED_KEYS

KEYS = list(SPEED_KEYS)  # whatever patches exist: the benchmark never names them


# -- planning --------------------------------------------------------------------------------------------------------
def _plan(mode: str, values: dict) -> list[tuple[str, list[str], str]]:
    return [(v.label, v.overrides, v.suffix) for v in speed.variants(mode, values)]


def test_each_mode_plans_its_variants_as_false_overrides():
    on = {KEYS[0]: True, **{key: False for key in KEYS[1:]}}  # a preset with one patch on, the others off
    all_off = [f"{key}=false" for key in KEYS]
    assert _plan("sd3fit", on) == [("sd3fit", [], "")]
    assert _plan("stock", on) == [("stock", all_off, "-stock")]
    assert _plan("both", on) == [("stock", all_off, "-stock"), ("sd3fit", [], "")]  # stock first
    assert _plan("each", on) == _plan("both", on) + [(f"without {KEYS[0]}", [f"{KEYS[0]}=false"], f"-without-{KEYS[0]}")]


def test_each_adds_one_run_per_patch_the_preset_turns_on_and_none_for_a_preset_without_patches():
    every = {key: True for key in KEYS}
    assert [label for label, _, _ in _plan("each", every)] == ["stock", "sd3fit"] + [f"without {k}" for k in sorted(KEYS)]
    assert _plan("each", {}) == _plan("both", {}) == [("stock", [f"{k}=false" for k in KEYS], "-stock"), ("sd3fit", [], "")]


def test_without_compiled_blocks_a_recompute_budget_becomes_checkpointing_every_block():
    from sd3fit import presets

    values = {"compile_blocks": True, "skip_tracemalloc": True, "recompute_budget": 0.3}
    plan = {label: overrides for label, overrides, _ in _plan("each", values)}
    swap = ["recompute_budget=null", "gradient_checkpointing=true"]
    assert plan["stock"][-2:] == swap and plan["without compile_blocks"] == ["compile_blocks=false", *swap]
    assert plan["sd3fit"] == [] and plan["without skip_tracemalloc"] == ["skip_tracemalloc=false"]
    budgeted = ["compile_blocks=true", "cuda_graph_blocks=false", "gradient_checkpointing=false", "recompute_budget=0.3"]
    for overrides in plan.values():  # every variant is a preset sd3fit accepts
        presets.load("lora-24gb", budgeted + overrides)


def test_without_compiled_blocks_their_cuda_graphs_go_too():
    values = {"compile_blocks": True, "cuda_graph_blocks": True, "skip_tracemalloc": True}
    plan = {label: overrides for label, overrides, _ in _plan("each", values)}
    assert plan["without compile_blocks"] == ["compile_blocks=false", "cuda_graph_blocks=false"]
    assert plan["without cuda_graph_blocks"] == ["cuda_graph_blocks=false"]
    graphed = ["compile_blocks=true", "cuda_graph_blocks=true", "set_grads_to_none=true"]
    for overrides in plan.values():  # every variant is a preset sd3fit accepts
        presets.load("lora-24gb", graphed + overrides)


def test_speed_patches_are_the_keys_left_on_after_overrides():
    assert speed.patches_on({key: True for key in reversed(KEYS)}) == sorted(KEYS)
    assert speed.patches_on({KEYS[0]: False, "lora_rank": 4}) == []


def test_an_unknown_mode_is_one_line_naming_the_modes(tmp_path):
    with pytest.raises(UserError, match="use one of sd3fit, stock, both, each"):
        speed.variants("fast", {})
    line = one_line_error(run_sd3fit("bench", "--presets", "demo", "--speed", "fast", "--out", str(tmp_path / "out")))
    assert "--speed" in line and "'fast'" in line and "each" in line
    assert not (tmp_path / "out").exists()


# -- resuming ---------------------------------------------------------------------------------------------------------
def _settings(**changes) -> runner.Settings:
    fields = dict(presets=["demo"], budgets=["none"], steps=3, warmup_steps=1, resolution=128, model="random")
    return runner.Settings(**{**fields, **changes})


def test_resume_identifies_rows_by_preset_budget_and_speed_and_old_rows_are_sd3fit(tmp_path):
    # bench.json and a row as written before --speed existed: neither has a speed field
    old = {k: v for k, v in asdict(_settings()).items() if k != "speed"}
    (tmp_path / "bench.json").write_text(json.dumps({**old, "calls": []}))
    rows = [{"preset": "demo", "budget": "none", "status": "finished"},
            {"preset": "demo", "budget": "none", "status": "finished", "speed": "stock", "speed_patches": []},
            {"preset": "demo", "budget": "24GB", "status": "finished", "speed": f"without {KEYS[0]}"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows.append({"preset": "demo", "budget": "none", "status": "finished", "speed": "stock", "round": 2})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = runner._check_resume(tmp_path, _settings(speed="each", rounds=3))  # a later call may ask for more
    assert done == {("demo", "none", "sd3fit", 1), ("demo", "none", "stock", 1), ("demo", "24GB", f"without {KEYS[0]}", 1),
                    ("demo", "none", "stock", 2)}
    with pytest.raises(UserError, match="steps=3"):
        runner._check_resume(tmp_path, _settings(steps=5, speed="both"))


def test_the_summary_line_names_the_speed_label():
    row = {"status": "finished", "speed": "stock", "step_s_median": 1.0, "step_s_p10": 0.9, "step_s_p90": 1.1,
           "images_per_s": 1.0, "step_peak_allocated_gib": None, "run_peak_reserved_gib": None, "wall_s": 12.0}
    assert runner.summary_line(row).startswith("finished (stock): median step 1.000 s")
    old = {"status": "out_of_memory", "error": "CUDA out of memory"}
    assert runner.summary_line(old) == "out_of_memory (sd3fit): CUDA out of memory"


# -- report ---------------------------------------------------------------------------------------------------------
def _row(preset, label, step, status="finished", in_steps=5.0, reserved=10.0, patches=()):
    row = {"preset": preset, "budget": "none", "budget_gib": None, "status": status, "error": None,
           "model_type": "lora", "gpu": "GPU A", "model_label": "random", "resolution": 1024, "batch_size": 1,
           "warmup_steps": 5, "measured_steps": 25, "step_s_median": step, "step_s_p10": step * 0.9,
           "step_s_p90": step * 1.1, "images_per_s": 1 / step, "step_peak_allocated_gib": in_steps,
           "step_peak_reserved_gib": in_steps + 0.5, "run_peak_allocated_gib": reserved - 1,
           "run_peak_reserved_gib": reserved, "date": "2026-11-28T00:00:00Z", "torch": "2.11.0"}
    if label is not None:  # None: a row from before --speed existed
        row.update(speed=label, speed_patches=list(patches))
    return row


def _cells(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_report_compares_sd3fit_with_stock_and_each_patch_with_sd3fit(tmp_path):
    from sd3fit.report import bench

    first, second = KEYS[0], f"{KEYS[0]}_2"  # the report reads labels, not the schema: any key name works
    found = [_row("lora", "stock", 2.0, in_steps=6.0, reserved=12.0),
             _row("lora", "sd3fit", 1.6, in_steps=4.5, reserved=9.0, patches=(first, second)),
             _row("lora", f"without {first}", 2.4, patches=(second,)),
             _row("lora", f"without {second}", 1.8, patches=(first,)),
             _row("full", "stock", 4.0, status="out_of_memory"), _row("full", "sd3fit", 3.0),
             _row("old", None, 1.0)]  # only an sd3fit row: not in the comparison
    bench.write(found, tmp_path / "report")
    text = (tmp_path / "report" / "summary.md").read_text()
    main, against = text.split("#### sd3fit against stock")
    assert _cells(main, "| `lora` | none | stock")[3] == "ran" and _cells(main, "| `old` | none | sd3fit")[3] == "ran"
    assert _cells(main, "| `full` | none | stock")[3] == "**out of memory**" and "under budget none (stock)" in main
    head = _cells(against, "| preset")
    assert head[3:] == ["step time: sd3fit / stock", "images/s: sd3fit / stock", "steps: peak alloc.: sd3fit / stock",
                        "whole run: peak reserved: sd3fit / stock", f"without {first}: step time / sd3fit",
                        f"without {second}: step time / sd3fit"]
    # 1.6/2, 2/1.6, 4.5/6, 9/12; without each patch: 2.4/1.6, 1.8/1.6
    assert _cells(against, "| `lora`") == ["`lora`", "none", f"{first}, {second}", "0.80", "1.25", "0.75", "0.75",
                                           "1.50", "1.12"]
    # the stock run ran out of memory: its step time compares, its memory peaks do not; no `without` rows
    assert _cells(against, "| `full`")[2:] == ["none", "0.75", "1.33", "–", "–", "–", "–"]
    assert "| `old`" not in against


def test_report_over_rounds_takes_ratios_round_by_round(tmp_path):
    from sd3fit.report import bench

    found = []
    for n, (reference, other) in enumerate([(0.25, 0.31), (0.20, 0.22), (0.24, 0.30)], 1):
        found += [{**_row("full-24gb", "sd3fit", reference), "round": n}, {**_row("full-12gb", "sd3fit", other), "round": n}]
    bench.write(found, tmp_path / "report")
    main, over = (tmp_path / "report" / "summary.md").read_text().split("#### Over rounds")
    assert _cells(main, "| `full-12gb` (round 2) | none | sd3fit")[4] == "0.220"
    # each round against the same round's first preset: 0.31/0.25, 0.22/0.20, 0.30/0.24; not 0.22/0.25
    assert _cells(over, "| `full-12gb`")[3:] == ["3", "0.300", "0.310, 0.220, 0.300", "1.24, 1.10, 1.25", "1.24"]
    assert _cells(over, "| `full-24gb`")[3:] == ["3", "0.240", "0.250, 0.200, 0.240", "1.00, 1.00, 1.00", "1.00"]
    bench.write(found[:2], tmp_path / "one-round")  # one round: no such table
    assert "Over rounds" not in (tmp_path / "one-round" / "summary.md").read_text()


def test_report_of_rows_without_a_stock_run_has_no_comparison(tmp_path):
    from sd3fit.report import bench

    bench.write([_row("lora", None, 1.0), _row("full", "sd3fit", 2.0)], tmp_path / "report")
    text = (tmp_path / "report" / "summary.md").read_text()
    assert "against stock" not in text and _cells(text, "| `lora` | none")[2] == "sd3fit"


# -- the benchmark, for real --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def both(tmp_path_factory, demo_assets):
    out = tmp_path_factory.mktemp("bench-speed") / "out"
    proc = run_sd3fit("bench", "--presets", "demo", "--speed", "both", "--steps", "3", "--warmup-steps", "1",
                      "--resolution", "128", "--model", str(demo_assets["model"]), "--out", str(out), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_bench_speed_both_runs_stock_then_sd3fit_into_their_own_folders(both):
    from sd3fit.runs import Run

    out, proc = both
    found = results.read(out)
    assert [(r["preset"], r["speed"], r["status"]) for r in found] == [("demo", "stock", "finished"),
                                                                       ("demo", "sd3fit", "finished")]
    stock, own = found
    assert stock["speed_patches"] == [] and own["speed_patches"] == speed.patches_on(presets.load("demo").values)
    assert [Path(r["run"]).name for r in found] == ["demo-nocap-stock", "demo-nocap"]
    configs = [Run(out / "runs" / Path(r["run"]).name).read_config() for r in found]
    assert all(configs[0]["sd3fit"][key] is False for key in KEYS)  # every patch overridden off
    assert sorted(configs[0]["overrides"][-len(KEYS):]) == sorted(f"{key}=false" for key in KEYS)
    assert not any(o.split("=")[0] in SPEED_KEYS for o in configs[1]["overrides"])  # the preset as written
    assert "[1/2] demo, GPU budget none, speed stock" in proc.stdout and "[2/2] demo, GPU budget none, speed sd3fit" in proc.stdout
    assert "finished (stock): median step" in proc.stdout and "finished (sd3fit): median step" in proc.stdout
    with (out / "results.csv").open() as f:
        assert [(r["speed"], r["speed_patches"]) for r in csv.DictReader(f)] == [
            ("stock", ""), ("sd3fit", " ".join(own["speed_patches"]))]


def test_bench_speed_both_report_has_the_ratio_table(both, tmp_path):
    out, _ = both
    proc = run_sd3fit("report", str(out), "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    stock, own = results.read(out)
    main, against = (tmp_path / "report" / "summary.md").read_text().split("#### sd3fit against stock")
    assert _cells(main, "| `demo` | none | stock")[3] == "ran" and _cells(main, "| `demo` | none | sd3fit")[3] == "ran"
    cells = _cells(against, "| `demo`")
    assert cells[3] == f"{own['step_s_median'] / stock['step_s_median']:.2f}"
    assert cells[4] == f"{own['images_per_s'] / stock['images_per_s']:.2f}"


def test_bench_speed_resume_skips_rows_it_has(both, demo_assets):
    out, _ = both
    before = tree_snapshot(out / "runs")
    args = ["bench", "--presets", "demo", "--steps", "3", "--warmup-steps", "1", "--resolution", "128",
            "--model", str(demo_assets["model"]), "--out", str(out), "--resume"]
    for mode in ("sd3fit", "both"):  # every row these modes ask for is there
        proc = run_sd3fit(*args, "--speed", mode)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "training in" not in proc.stdout
    assert tree_snapshot(out / "runs") == before and len(results.read(out)) == 2
    proc = run_sd3fit(*args, "--rounds", "2")  # only the second round's run is missing
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("training in") == 1 and "[1/1] demo, GPU budget none, speed sd3fit, round 2" in proc.stdout
    found = results.read(out)
    assert [(r["speed"], r.get("round")) for r in found] == [("stock", 1), ("sd3fit", 1), ("sd3fit", 2)]
    assert Path(found[-1]["run"]).name == "demo-nocap-round2" and found[-1]["status"] == "finished"
    line = one_line_error(run_sd3fit(*args, "--rounds", "0"))
    assert "--rounds" in line and "0" in line


def test_bench_and_report_do_not_import_each_other():
    import ast

    import sd3fit

    src = Path(sd3fit.__file__).parent

    def imported(package: str) -> set[str]:
        names = set()
        for path in (src / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    names |= {a.name for a in node.names}
        return names

    assert not [n for n in imported("bench") if n.startswith("sd3fit.report")]
    assert not [n for n in imported("report") if n.startswith("sd3fit.bench")]  # it reads result rows, not bench code
