import json

import pytest

from sd3fit import runs
from sd3fit.errors import UserError


def test_generated_names_never_collide(tmp_path):
    first = runs.plan(tmp_path, None, "demo")
    runs.create(first)
    (first.dir / "config.json").write_text("{}")
    second = runs.plan(tmp_path, None, "demo")
    assert second.dir != first.dir and second.dir.name.startswith("demo-")


def test_explicit_name_that_holds_a_run_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"run folder .*mine already holds a run; choose another --name"):
        runs.plan(tmp_path, "mine", "demo")


def test_explicit_empty_folder_is_used(tmp_path):
    (tmp_path / "mine").mkdir()
    assert runs.plan(tmp_path, "mine", "demo").dir == tmp_path / "mine"


@pytest.mark.parametrize("name", ["../escape", "a/b", "", "-x"])
def test_bad_names(tmp_path, name):
    with pytest.raises(UserError, match="may hold only"):
        runs.plan(tmp_path, name, "demo")


def test_create_refuses_a_folder_filled_meanwhile(tmp_path):
    run = runs.plan(tmp_path, "race", "demo")
    (tmp_path / "race").mkdir()
    (tmp_path / "race" / "x").write_text("1")
    with pytest.raises(UserError, match="already holds a run"):
        runs.create(run)


def test_generated_names_claimed_at_the_same_moment_get_separate_folders(tmp_path):
    # two runs that planned in the same second: both planned the same folder, each must end up with its own
    first, second = runs.plan(tmp_path, None, "demo"), runs.plan(tmp_path, None, "demo")
    assert first == second
    a, b = runs.create(first, named=False), runs.create(second, named=False)
    assert a.dir != b.dir and b.dir.name == f"{a.dir.name}-2"


def test_a_named_empty_folder_is_claimed_by_one_run_only(tmp_path):
    (tmp_path / "mine").mkdir()
    first, second = runs.plan(tmp_path, "mine", "demo"), runs.plan(tmp_path, "mine", "demo")
    runs.create(first)
    with pytest.raises(UserError, match="already holds a run"):
        runs.create(second)


def test_write_moves_every_path_into_the_claimed_folder(tmp_path, monkeypatch):
    import json

    from sd3fit import train

    monkeypatch.chdir(tmp_path)
    planned = runs.plan(tmp_path / "runs", None, "demo")
    runs.create(planned, named=False)  # a run started in the same second took it
    prepared = train.Prepared(
        run=planned, preset=type("P", (), {"path": tmp_path / "p.json"})(), model_source="local",
        record={"simpletuner": {"output_dir": str(planned.output), "other": str(planned.dir) + "x"}},
        backends=[{"cache_dir": str(planned.dir / "cache"), "root": str(planned.dir)}])
    (tmp_path / "p.json").write_text("{}")
    run = train.write(prepared)
    assert run.dir == planned.dir.with_name(planned.dir.name + "-2") and prepared.run == run
    config = json.loads(run.config.read_text())
    assert config["simpletuner"] == {"output_dir": str(run.output), "other": str(planned.dir) + "x"}
    assert json.loads(run.datasets.read_text()) == [{"cache_dir": str(run.dir / "cache"), "root": str(run.dir)}]


def _checkpoint(run, step, guard=True, files=("model.safetensors",), listed=None):
    path = run.output / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("x")
    (path / runs.CHECKPOINT_MANIFEST).write_text(json.dumps({"files": list(listed or files)}))
    if guard:
        (path / runs.CHECKPOINT_GUARD).write_text("complete\n")
    return path


def test_last_checkpoint_skips_unfinished_ones(tmp_path):
    run = runs.Run(tmp_path / "r")
    assert runs.last_checkpoint(run) is None
    _checkpoint(run, 4)
    _checkpoint(run, 9)
    assert runs.last_checkpoint(run).step == 9  # by number, not by name: checkpoint-10 sorts before checkpoint-9
    _checkpoint(run, 10)
    assert runs.last_checkpoint(run).step == 10
    (run.output / "checkpoint-12-tmp").mkdir()  # a save cut off before its rename
    _checkpoint(run, 14, guard=False)  # a save cut off before its completion marker
    _checkpoint(run, 16, files=(), listed=["optimizer.bin"])  # a file went missing afterwards
    found = {c.step: c for c in runs.checkpoints(run)}
    assert sorted(found) == [4, 9, 10, 14, 16]
    assert "cut off" in found[14].problem and "optimizer.bin" in found[16].problem
    assert runs.last_checkpoint(run).step == 10
