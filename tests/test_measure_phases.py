import pytest

from sd3fit.measure import steps
from sd3fit.measure.phases import Phases
from test_measure_steps import FakeCuda


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _memory():
    fake = FakeCuda()
    return fake, steps.CudaMemory(type("torch", (), {"cuda": fake}))


def test_each_part_of_the_run_gets_its_own_peak_time_and_caught_errors():
    fake, memory = _memory()
    clock = Clock()
    phases = Phases(memory, device=True, clock=clock)
    fake.use(6)  # text encoders loaded
    clock.now = 2
    phases.enter("text_embeds")
    fake.use(9)
    fake.use(1)  # unloaded again
    clock.now = 5
    phases.enter("training")
    memory.step_start()
    fake.use(4)
    memory.step_end()
    with phases.during("validation"):
        fake.use(7)
        fake.ooms = 2  # a caught one, e.g. a workspace the convolution then did without
        fake.use(4)
        clock.now = 6
    assert phases.current == "training"
    clock.now = 7
    summary = phases.summary()
    assert list(summary) == ["loading", "text_embeds", "training", "validation"]
    gib = {name: part["peak_allocated_gib"] for name, part in summary.items()}
    assert gib == {"loading": 6, "text_embeds": 9, "training": 4, "validation": 7}
    assert {name: part["ooms"] for name, part in summary.items()} == {"loading": 0, "text_embeds": 0, "training": 0, "validation": 2}
    assert {name: part["seconds"] for name, part in summary.items()} == {"loading": 2, "text_embeds": 3, "training": 1, "validation": 1}
    assert phases.peak_phase() == "text_embeds"
    # the run's own peaks still see everything
    assert memory.run_peaks()["peak_allocated_gib"] == 9


def test_a_cpu_run_keeps_only_seconds_and_unknown_parts_are_refused():
    phases = Phases(steps.HostMemory(), device=False)
    phases.enter("training")
    summary = phases.summary()
    assert summary["training"]["peak_reserved_gib"] is None and summary["loading"]["seconds"] >= 0
    assert phases.peak_phase() is None
    with pytest.raises(ValueError):
        phases.enter("warmup")
