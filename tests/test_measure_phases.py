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


def test_a_gpu_budget_leaves_room_for_what_lies_outside_the_allocator():
    """A card holds the CUDA context and libraries' buffers too: the allocator's cap is the budget less what the run
    has read of them so far, lowered at each part of the run, never raised."""
    from sd3fit.measure.memory import GpuCap

    fake, memory = _memory()
    fractions = []
    fake.set_per_process_memory_fraction = lambda fraction, device: fractions.append(fraction)
    fake.get_device_properties = lambda device: type("props", (), {"total_memory": fake.TOTAL})
    cap = GpuCap(type("torch", (), {"cuda": fake}), 8.0)
    assert cap.facts()["allocator_cap_gib"] == pytest.approx(7.5)  # the context: 0.5 GiB
    memory.outside_listener = cap.leave_room
    phases = Phases(memory, device=True)
    fake.context = 0.85 * steps.GIB  # libraries loaded their buffers while the models loaded
    phases.enter("text_embeds")
    assert cap.facts()["allocator_cap_gib"] == pytest.approx(7.15)
    fake.context = 0.6 * steps.GIB
    phases.enter("latents")
    assert cap.facts()["allocator_cap_gib"] == pytest.approx(7.15) and cap.facts()["budget_gib"] == 8.0
    assert fractions[-1] == pytest.approx(7.15 / 80)


def test_a_presets_memory_limit_caps_the_run_and_the_smaller_of_it_and_a_benchmarks_budget_holds():
    from sd3fit.simpletuner.launcher import memory_budget

    assert memory_budget(None, {}) is None and memory_budget("", {"gpu_memory_limit_gib": None}) is None
    assert memory_budget("7.45", {}) == 7.45
    assert memory_budget(None, {"gpu_memory_limit_gib": 6.0}) == 6.0
    assert memory_budget("7.45", {"gpu_memory_limit_gib": 6.0}) == 6.0
    assert memory_budget("5.5", {"gpu_memory_limit_gib": 6.0}) == 5.5


def test_a_memory_limit_must_be_above_zero():
    from sd3fit import presets
    from sd3fit.errors import UserError

    with pytest.raises(UserError, match="gpu_memory_limit_gib .* above 0"):
        presets.load("lora-8gb", ["gpu_memory_limit_gib=0"])
    assert presets.load("lora-8gb", ["gpu_memory_limit_gib=5.5"]).values["gpu_memory_limit_gib"] == 5.5


def test_each_move_gives_cached_memory_back_before_the_next_part_starts():
    fake, memory = _memory()
    in_use = {"gib": 1}
    moves = []

    def release():  # the cache held 6 GiB, of which only what is in use stays reserved
        moves.append(phases.current)
        fake.use(in_use["gib"])

    phases = Phases(memory, device=True, release=release)
    fake.use(6)  # loading left 6 GiB reserved, 1 GiB of it in use
    phases.enter("text_embeds")
    phases.enter("text_embeds")  # no move, nothing released
    in_use["gib"] = 2
    fake.use(2)
    with phases.during("validation"):
        fake.use(3)
    summary = phases.summary()
    assert moves == ["loading", "text_embeds", "validation"]
    reserved = {name: part["peak_reserved_gib"] for name, part in summary.items()}
    # without the release, text_embeds would start at (and report) loading's 6 GiB
    assert reserved == {"loading": 6, "text_embeds": 2, "validation": 3}
