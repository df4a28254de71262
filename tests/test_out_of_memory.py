"""Out of memory, whoever catches it: the allocator's observer saves one snapshot, and the run's summary names the
part of the run and a preset that needs less."""

import json
import pickle
import shutil
import types

from conftest import ROOT
from sd3fit import fit, launch
from sd3fit.measure.memory import MemorySnapshots
from sd3fit.runs import Run

CARDS = ROOT / "results" / "2026-11-28-cards2-h200" / "cards" / "runs"


def fake_torch():
    observers, dumps = [], []
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        memory=types.SimpleNamespace(_snapshot=lambda: dumps.append(1) or {"segments": [], "n": len(dumps)},
                                     _record_memory_history=lambda **kw: None))
    torch = types.SimpleNamespace(cuda=cuda, _C=types.SimpleNamespace(_cuda_attach_out_of_memory_observer=observers.append))
    return torch, observers, dumps


def test_the_first_out_of_memory_error_is_saved_even_when_the_trainer_catches_it(tmp_path):
    torch, observers, dumps = fake_torch()
    snapshots = MemorySnapshots(tmp_path, steps=0, torch_module=torch)
    snapshots.start()
    assert len(observers) == 1 and not snapshots.recording  # watched with recording off too
    for _ in range(3):  # e.g. convolution workspaces that did without, then a caught validation error
        observers[0](0, 2**30, 2**33, 0)
    assert len(dumps) == 1
    saved = tmp_path / "memory" / "oom.pickle"
    assert pickle.loads(saved.read_bytes()) == {"segments": [], "n": 1}
    assert snapshots.on_oom() == saved and len(dumps) == 1  # the error then reaching sd3fit saves nothing more


def copied_run(source, to) -> Run:
    """A benchmarked run's folder, as if the user had trained its preset from the Hub's SD3 Medium."""
    from sd3fit import sd3_medium

    run = Run(to)
    shutil.copytree(source, run.dir, ignore=shutil.ignore_patterns("tensorboard"))
    config = run.read_config()
    config["simpletuner"]["pretrained_model_name_or_path"] = sd3_medium.HUB_ID
    run.config.write_text(json.dumps(config))
    assert fit.measured(fit._run_options(run)) is not None  # judged as the benchmark's configuration
    return run


def test_the_summary_names_where_memory_ran_out_and_a_preset_that_needs_less(tmp_path):
    graphed = ROOT / "results" / "2026-11-29-graphs-h200" / "bench-full" / "runs" / "full-24gb-graphs-24GB"
    run = copied_run(graphed, tmp_path / "full-24gb-run")
    assert fit.smaller(run)[0] == "full-16gb"  # 18.3 GiB with validation beside the graphs' pool; full-16gb 14.5
    result = run.read_result()
    result.update(out_of_memory=True, oom_phase="validation", status="failed")
    run.result.write_text(json.dumps(result))
    (run.dir / "memory").mkdir()
    (run.dir / "memory" / "oom.pickle").write_bytes(b"")
    line = [x for x in launch.summary(run, 1.0).splitlines() if x.startswith("out of memory")]
    assert len(line) == 1
    assert "during validation" in line[0] and "oom.pickle" in line[0] and "full-16gb needs less (14.46 GiB" in line[0]


def test_the_smallest_preset_has_nothing_smaller_to_offer(tmp_path):
    # lora-6gb is the smallest there is (5.18 GiB); below an older lora-8gb configuration's run (every block
    # checkpointed, RamTorch's copies unbounded: 6.05 GiB) only lora-6gb, since today's lora-8gb (CUDA graphs) needs
    # 6.51; below an older lora-12gb configuration's (9.0 GiB), today's lora-12gb (6.79)
    smallest = ROOT / "results" / "2026-11-29-copy-ahead-h200" / "bench-lora-6gb" / "runs" / "lora-6gb-6GB"
    assert fit.smaller(copied_run(smallest, tmp_path / "lora-6gb-run")) is None
    unbounded = ROOT / "results" / "2026-11-28-speed2-h200" / "bench" / "runs" / "lora-8gb-8GB-stock"
    assert fit.smaller(copied_run(unbounded, tmp_path / "lora-8gb-run"))[0] == "lora-6gb"
    assert fit.smaller(copied_run(CARDS / "lora-12gb-12GB", tmp_path / "lora-12gb-run"))[0] == "lora-12gb"
