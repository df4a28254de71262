import json
import os

from conftest import one_line_error, run_sd3fit
from sd3fit import runs


def make(root, name, result=None, losses=(), checkpoint=None, pid=None):
    run = runs.Run(root / name)
    run.dir.mkdir(parents=True)
    run.config.write_text(json.dumps({"simpletuner": {"max_train_steps": 8}}))
    run.metrics.write_text("".join(json.dumps({"step": n, "time": 1.0, "train_loss": x}) + "\n" for n, x in enumerate(losses, 1)))
    if result is not None:
        run.result.write_text(json.dumps(result))
    if checkpoint is not None:
        (run.output / f"checkpoint-{checkpoint}").mkdir(parents=True)
        (run.output / f"checkpoint-{checkpoint}" / runs.CHECKPOINT_GUARD).write_text("complete\n")
    if pid is not None:
        run.pid.write_text(f"{pid}\n")
    return run


def test_runs_lists_status_steps_loss_memory_and_weights(tmp_path):
    adapter = str(tmp_path / "a" / "output" / "pytorch_lora_weights.safetensors")
    make(tmp_path, "a", {"status": "finished", "global_step": 8, "artifacts": {"adapter": adapter},
                         "measure": {"memory": {"peak_reserved_gib": 9.125}}}, losses=[0.5, 0.25])
    make(tmp_path, "b", {"status": "interrupted", "global_step": 3}, losses=[0.5, 0.4, 0.3], checkpoint=3)
    make(tmp_path, "c", losses=[0.9], checkpoint=None, pid=os.getpid())  # trained by a live process
    make(tmp_path, "d", losses=[0.9, 0.8], checkpoint=2, pid=2 ** 22 + 1)  # its sd3fit process is gone
    (tmp_path / "not-a-run").mkdir()
    proc = run_sd3fit("runs", "--runs-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    assert lines[0] == ["run", "status", "steps", "last", "loss", "peak", "GiB", "weights"]
    assert lines[1] == ["a", "finished", "8/8", "0.2500", "9.12", adapter]
    assert lines[2] == ["b", "interrupted", "3/8", "0.3000", str(tmp_path / "b" / "output" / "checkpoint-3")]
    assert lines[3] == ["c", "running", "1/8", "0.9000"]
    assert lines[4] == ["d", "stopped", "2/8", "0.8000", str(tmp_path / "d" / "output" / "checkpoint-2")]
    assert len(lines) == 5


def test_no_runs(tmp_path):
    assert "no runs in" in one_line_error(run_sd3fit("runs", "--runs-dir", str(tmp_path / "none")))
