"""Bad input through the `sd3fit train` command: one line naming the problem and the fix, exit 2, nothing touched."""

import pytest

from conftest import one_line_error, run_sd3fit, tree_snapshot


@pytest.fixture
def workspace(tmp_path, image_folder):
    """A runs folder that already holds one run, and a dataset folder; both must survive every bad command."""
    runs = tmp_path / "runs"
    (runs / "earlier").mkdir(parents=True)
    (runs / "earlier" / "config.json").write_text('{"kept": true}')
    (runs / "earlier" / "output").mkdir()
    (runs / "earlier" / "output" / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    return {"runs": runs, "images": image_folder, "tmp": tmp_path}


def bad(ws, *args, env=None):
    before = tree_snapshot(ws["tmp"])
    line = one_line_error(run_sd3fit("train", *args, "--runs-dir", str(ws["runs"]), env=env))
    assert tree_snapshot(ws["tmp"]) == before
    assert sorted(p.name for p in ws["runs"].iterdir()) == ["earlier"]
    return line


def test_unknown_preset_file(workspace):
    line = bad(workspace, "config/no-such-preset.json")
    assert "preset not found: config/no-such-preset.json" in line and "demo" in line


def test_unknown_option(workspace):
    assert "unknown option lora_rnak (did you mean lora_rank?)" in bad(workspace, "lora_rnak=4")


def test_wrong_type(workspace):
    assert "option max_train_steps must be a whole number, not 'ten'" in bad(workspace, "max_train_steps=ten")


def test_impossible_combination(workspace):
    line = bad(workspace, "model_type=full", "base_model_precision=int8-quanto")
    assert "base_model_precision=int8-quanto needs model_type=lora" in line


def test_gradient_release_on_several_processes(workspace):
    line = bad(workspace, "model_type=full", "optimizer_release_gradients=true", "--num-processes", "2")
    assert "optimizer_release_gradients" in line and "--num-processes 1" in line


def test_more_processes_than_gpus(workspace, tmp_path_factory, monkeypatch):
    from test_fit import fake_nvidia_smi

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two_gpus = fake_nvidia_smi(tmp_path_factory.mktemp("smi"), "NVIDIA L4, 23034", "NVIDIA L4, 23034")
    line = bad(workspace, "--num-processes", "3", env=two_gpus)
    assert "--num-processes 3" in line and "finds 2 visible GPUs" in line and "--num-processes 2 or fewer" in line


def test_missing_dataset_folder(workspace):
    line = bad(workspace, f"dataset_dir={workspace['tmp'] / 'missing'}")
    assert "dataset folder not found" in line and "missing" in line


def test_image_without_caption(workspace):
    (workspace["images"] / "shape-002.txt").unlink()
    line = bad(workspace, f"dataset_dir={workspace['images']}")
    assert "image without caption" in line and "shape-002.png" in line


def test_corrupt_image(workspace):
    (workspace["images"] / "shape-004.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    line = bad(workspace, f"dataset_dir={workspace['images']}")
    assert "corrupt image" in line and "shape-004.png" in line


def test_output_folder_that_already_holds_a_run(workspace):
    line = bad(workspace, "--name", "earlier")
    assert "run folder" in line and "earlier already holds a run" in line


def test_override_that_is_not_key_value(workspace):
    # "lora_rank" alone would be taken for a preset name
    assert "preset not found: lora_rank" in bad(workspace, "lora_rank")


def test_dry_run_creates_nothing(workspace):
    before = tree_snapshot(workspace["tmp"])
    proc = run_sd3fit("train", "--dry-run", "--runs-dir", str(workspace["runs"]))
    assert proc.returncode == 0, proc.stderr
    assert "dry run" in proc.stdout
    assert tree_snapshot(workspace["tmp"]) == before
