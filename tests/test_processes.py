"""`./train.sh PRESET --num-processes 2`: two processes train together (on a machine without GPUs, on the CPU through
gloo), the run's files are written once, and each process's own measurements are kept and listed in result.json."""

import pytest

from sd3fit import host
from sd3fit.measure.steps import STEP_TIME
from sd3fit.runs import Run
from test_train_e2e import STEPS, assert_changes_output, base, check_finished, train  # noqa: F401  (base: a fixture)


@pytest.mark.skipif(host.gpu_count() == 1, reason="one visible GPU: two processes would need two")
def test_two_processes_train_the_demo_together(tmp_path, base):  # noqa: F811
    run = train(tmp_path, "two", "demo", "--num-processes", "2")
    result = check_finished(run)
    assert result["processes"] == 2  # not two runs side by side, nor one process that ignored the request
    assert [row["step"] for row in run.read_metrics()] == list(range(1, STEPS + 1))  # one row a step: rank 0 writes
    # rank 1 measured itself in its own folder: its step times and memory, no copy of the trainer's scalars
    other = Run(run.rank_dir(1))
    rows = other.read_metrics()
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(row[STEP_TIME] > 0 for row in rows) and not any("train_loss" in row for row in rows)
    assert list((other.dir / "tensorboard").glob("events.out.tfevents.*"))
    assert other.read_result()["status"] == "finished" and not (other.dir / "output").exists()
    # result.json lists both processes with their whole-run peaks and median steps
    ranks = result["ranks"]
    assert [entry["rank"] for entry in ranks] == [0, 1] and all(entry["status"] == "finished" for entry in ranks)
    assert all(entry["step_s_median"] > 0 and entry["memory"] for entry in ranks), ranks
    pipe, base_images = base
    pipe.load_lora_weights(result["artifacts"]["adapter"], adapter_name="two")
    try:
        assert_changes_output(pipe, base_images)
    finally:
        pipe.delete_adapters("two")
