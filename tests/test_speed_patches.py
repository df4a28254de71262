"""sd3fit's speed patches together on the tiny model, and the small ones alone (sd3fit.simpletuner.patches:
trainable_params, tracemalloc_off; compiled blocks and the fused optimizer have their own test files)."""

import json
import tracemalloc

import pytest

from conftest import run_sd3fit
from sd3fit.errors import UserError
from sd3fit.runs import Run
from sd3fit.simpletuner import compat
from sd3fit.simpletuner.patches import tracemalloc_off, trainable_params

# exact patches: they change how the step runs, not what it computes (the fused optimizer changes the update's
# arithmetic and is compared against seeds in test_fused_optimizer.py)
EXACT = ["compile_blocks=true", "cache_trainable_params=true", "skip_tracemalloc=true"]


def losses(run: Run) -> list[float]:
    return [row["train_loss"] for row in run.read_metrics() if "train_loss" in row]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, demo_assets):
    root = tmp_path_factory.mktemp("speed")
    out = {}
    for name, overrides in {"stock": [], "patched": EXACT, "other_seed": ["seed=43"]}.items():
        proc = run_sd3fit("train", *overrides, "--name", name, "--runs-dir", str(root), timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = Run(root / name)
    return out


def test_the_demo_trains_the_same_with_the_exact_speed_patches(demo_runs):
    patched = json.loads(demo_runs["patched"].result.read_text())["speed"]
    assert patched["patches"] == ["cache_trainable_params", "compile_blocks", "skip_tracemalloc"]
    assert patched["compile_blocks"]["compiled_calls"] > 0 and patched["compile_blocks"]["eager_calls"] == 0
    assert patched["tracemalloc"] is False
    stock = json.loads(demo_runs["stock"].result.read_text())["speed"]
    assert stock == {"patches": [], "tracemalloc": True}  # upstream's own behaviour: tracing left on
    base, fast, other = (losses(demo_runs[k]) for k in ("stock", "patched", "other_seed"))
    assert len(base) == len(fast) == len(other) > 0
    gap = max(abs(a - b) for a, b in zip(base, fast))
    spread = max(abs(a - b) for a, b in zip(base, other))
    # another seed draws other timesteps and noise: its losses differ by a large fraction; these patches change
    # only the rounding of a few fused operations
    assert gap < 0.05 * spread, (base, fast, other)


class Upstream:
    """The two seams of SimpleTuner's Trainer that trainable_params relies on."""

    def __init__(self, found):
        self.found, self.walks = found, 0

    def _get_trainable_parameters(self):
        self.walks += 1
        return self.found() if callable(self.found) else list(self.found)

    def train(self):
        return [self._get_trainable_parameters() for _ in range(3)]


class Patched(trainable_params.TrainableListTrainer, Upstream):
    pass


@pytest.mark.parametrize("on", [True, False])
def test_trainable_parameters_are_listed_once_per_training_run(on):
    trainer = Patched(["a", "b"])
    trainer.sd3fit_cache_trainable_params = on
    lists = trainer.train()
    assert lists == [["a", "b"]] * 3
    assert trainer.walks == (1 if on else 3)
    assert (lists[0] is lists[2]) == on
    trainer.train()  # a second run lists them again
    assert trainer.walks == (2 if on else 6)
    trainer._get_trainable_parameters()  # outside training: upstream's walk
    assert trainer.walks == (3 if on else 7)


def test_a_generator_of_parameters_is_left_as_upstream_gives_it():
    trainer = Patched(lambda: (p for p in "ab"))  # LyCORIS: the wrapped network's parameters()
    trainer.sd3fit_cache_trainable_params = True
    lists = trainer.train()
    assert trainer.walks == 3 and [list(g) for g in lists] == [["a", "b"]] * 3


@pytest.fixture
def factory_tracemalloc():
    import simpletuner.helpers.data_backend.factory as factory

    yield factory
    factory.tracemalloc = tracemalloc  # directly: a test may have made the version gate refuse


def test_the_dataset_factory_gets_no_tracing_and_falls_back_to_resident_memory(factory_tracemalloc):
    factory = factory_tracemalloc
    tracemalloc_off.apply(True)
    with pytest.raises(RuntimeError):
        factory.tracemalloc.start()
    # upstream's own fallback for a RuntimeError: the process's resident memory, in MB
    assert factory.FactoryRegistry._get_memory_usage(None) > 10
    tracemalloc_off.apply(True)  # twice: still the stand-in
    assert not factory.tracemalloc.is_tracing()
    tracemalloc_off.apply(False)
    assert factory.tracemalloc is tracemalloc


def test_small_speed_patches_refuse_what_they_were_not_written_for(monkeypatch, factory_tracemalloc):
    monkeypatch.setattr(factory_tracemalloc, "tracemalloc", object())
    with pytest.raises(RuntimeError, match="needs updating"):
        tracemalloc_off.apply(True)
    with pytest.raises(RuntimeError, match="_get_trainable_parameters"):
        trainable_params.check(object)
    monkeypatch.setattr(compat, "installed_version", lambda: "9.9.9")
    for apply in (lambda: tracemalloc_off.apply(True), lambda: trainable_params.check(Upstream)):
        with pytest.raises(UserError, match="9.9.9"):
            apply()
