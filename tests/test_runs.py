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
