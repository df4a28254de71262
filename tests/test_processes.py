"""`./train.sh PRESET --num-processes 2`: two processes train together (on a machine without GPUs, on the CPU through
gloo), and the run's files are written once."""

import pytest

from sd3fit import host
from test_train_e2e import STEPS, assert_changes_output, base, check_finished, train  # noqa: F401  (base: a fixture)


@pytest.mark.skipif(host.gpu_count() == 1, reason="one visible GPU: two processes would need two")
def test_two_processes_train_the_demo_together(tmp_path, base):  # noqa: F811
    run = train(tmp_path, "two", "demo", "--num-processes", "2")
    result = check_finished(run)
    assert result["processes"] == 2  # not two runs side by side, nor one process that ignored the request
    assert [row["step"] for row in run.read_metrics()] == list(range(1, STEPS + 1))  # one row a step: rank 0 writes
    pipe, base_images = base
    pipe.load_lora_weights(result["artifacts"]["adapter"], adapter_name="two")
    try:
        assert_changes_output(pipe, base_images)
    finally:
        pipe.delete_adapters("two")
