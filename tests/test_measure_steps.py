"""The step recorder: sibling ranges under one train_step, deferred reading of GPU-style marks, epoch-end fetches,
gradient accumulation, and real torch.profiler traces of its ranges."""

import pytest
import torch

from sd3fit.measure import steps, trace
from sd3fit.measure.steps import HostMemory, StepRecorder


class FakeClock:
    """Marks are integers (seconds); a mark is readable only once `done` has reached it, like a CUDA event."""

    name = "fake"

    def __init__(self):
        self.now, self.done, self.waited = 0, 0, []

    def tick(self, seconds):
        self.now += seconds

    def mark(self):
        return self.now

    def ready(self, mark):
        return mark <= self.done

    def wait(self, mark):
        self.waited.append(mark)
        self.done = max(self.done, mark)

    def seconds(self, start, end):
        return end - start


def one_step(rec, clock, durations=(1, 2, 1, 3, 2)):
    rec.step_begin()
    clock.tick(durations[0])
    rec.data_done(True)
    rec.begin("forward")
    clock.tick(durations[1])
    rec.switch("forward", "loss")
    clock.tick(durations[2])
    rec.end("loss")
    rec.begin("backward")
    clock.tick(durations[3])
    rec.begin("optimizer")
    clock.tick(durations[4])
    rec.step_end()


def test_rows_wait_for_marks_and_sum_ranges():
    clock = FakeClock()
    rec = StepRecorder(clock, HostMemory(), samples_per_micro_step=2)
    one_step(rec, clock)
    assert rec.logged(1) == []  # the GPU has not reached the step's end yet: nothing is read, nothing waits
    assert clock.waited == []
    clock.done = clock.now
    one_step(rec, clock)
    ready = rec.logged(2)
    assert [step for step, _ in ready] == [1]
    row = ready[0][1]
    assert row[steps.STEP_TIME] == 9
    assert [row[steps.RANGE_TIME[n]] for n in steps.RANGES] == [1, 2, 1, 3, 2]
    assert row[steps.OTHER_TIME] == 0 and row[steps.THROUGHPUT] == pytest.approx(2 / 9)
    assert set(steps.ROW_KEYS) <= set(row)
    flushed = rec.flush()  # end of training: waits once for the rest
    assert [step for step, _ in flushed] == [2] and clock.waited == [18]


def test_gradient_accumulation_sums_micro_steps_into_one_row():
    clock = FakeClock()
    rec = StepRecorder(clock, HostMemory(), samples_per_micro_step=1)
    one_step(rec, clock)
    one_step(rec, clock)
    clock.done = clock.now
    (step, row), = rec.logged(5)
    assert step == 5 and row[steps.MICRO_STEPS] == 2 and row[steps.STEP_TIME] == 18 and row["time/backward_s"] == 6


def test_epoch_end_fetch_is_not_a_step():
    clock = FakeClock()
    rec = StepRecorder(clock, HostMemory(), samples_per_micro_step=1)
    rec.step_begin()
    clock.tick(5)
    rec.data_done(False)  # the iterator ran dry: the trainer starts a new epoch
    rec.begin("forward")  # nothing is open any more: ignored
    one_step(rec, clock)
    clock.done = clock.now
    (_, row), = rec.logged(1)
    assert row[steps.STEP_TIME] == 9 and rec.skipped_fetches == 1


def test_ranges_outside_a_step_are_ignored():
    clock = FakeClock()
    rec = StepRecorder(clock, HostMemory(), samples_per_micro_step=1)
    rec.begin("forward")  # evaluation calls the same methods between steps
    rec.end("forward")
    rec.data_done(True)
    assert rec.logged(1) == [] and rec.flush() == []


def test_timing_off_keeps_no_rows():
    rec = StepRecorder(FakeClock(), HostMemory(), samples_per_micro_step=1, timing=False)
    one_step(rec, FakeClock())
    assert rec.logged(1) == [] and rec.flush() == []


def profiled_trace(tmp_path, loop):
    """Run `loop(recorder)` for 4 steps under torch.profiler and return the exported trace."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    path = tmp_path / "trace.json"
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=1, active=2),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(path))) as prof:
        rec = StepRecorder(steps.HostClock(), HostMemory(), 1, record_function=record_function)
        model = torch.nn.Linear(8, 8)
        for _ in range(4):
            loop(rec, model)
            prof.step()
    return trace.load(path)


def good_loop(rec, model):
    rec.step_begin()
    x = torch.randn(4, 8)
    rec.data_done(True)
    rec.begin("forward")
    y = model(x)
    rec.switch("forward", "loss")
    loss = y.square().mean()
    rec.end("loss")
    rec.begin("backward")
    loss.backward()
    rec.begin("optimizer")
    model.zero_grad()
    rec.step_end()


def test_profiler_trace_has_sibling_ranges(tmp_path):
    loaded = profiled_trace(tmp_path, good_loop)
    assert trace.structure_problems(loaded) == []
    profiled = trace.profiled_steps(loaded)
    assert len(profiled) == 2
    assert all([r.name for r in p.ranges] == list(steps.RANGES) for p in profiled)


def test_structure_check_catches_the_studys_nesting(tmp_path):
    """The study's patch opened the optimizer range inside backward; the check must see that."""
    from torch.profiler import record_function

    def nested_loop(rec, model):
        with record_function("train_step"):
            for name in ("data", "forward", "loss"):
                with record_function(name):
                    pass
            with record_function("backward"):
                model(torch.randn(2, 8)).sum().backward()
                with record_function("optimizer"):
                    model.zero_grad()

    problems = trace.structure_problems(profiled_trace(tmp_path, nested_loop))
    assert any("optimizer is nested inside backward" in p for p in problems), problems


def test_epoch_end_fetch_in_a_profiled_step_is_not_a_problem(tmp_path):
    """At an epoch's end the trainer's fetch finds no batch and the next epoch's first step follows within the
    same profiler step: the empty fetch is a train_step holding only data, and the real step is still checked."""
    calls = {"n": 0}

    def loop_with_epoch_end(rec, model):
        calls["n"] += 1
        if calls["n"] == 3:
            rec.step_begin()
            rec.data_done(False)
        good_loop(rec, model)

    loaded = profiled_trace(tmp_path, loop_with_epoch_end)
    assert trace.structure_problems(loaded) == []
    assert [p.empty_fetches for p in trace.profiled_steps(loaded)] == [1, 0]


class FakeCuda:
    """A caching allocator's peak counters: `use` allocates, `reset_peak_memory_stats` starts a new peak."""

    TOTAL = 80 * steps.GIB

    def __init__(self, context_gib=0.5):
        self.current = self.peak = 0
        self.context = context_gib * steps.GIB  # device memory outside the allocator
        self.ooms = 0

    def use(self, gib):
        self.current = gib * steps.GIB
        self.peak = max(self.peak, self.current)

    def memory_stats(self):
        return {"allocated_bytes.all.peak": self.peak, "reserved_bytes.all.peak": self.peak, "num_alloc_retries": 0,
                "num_ooms": self.ooms}

    def memory_reserved(self, device=None):
        return self.current

    def mem_get_info(self, device=None):
        return self.TOTAL - self.current - self.context, self.TOTAL

    def reset_peak_memory_stats(self):
        self.peak = self.current


def test_peaks_inside_and_outside_steps_are_kept_apart():
    fake = FakeCuda()
    memory = steps.CudaMemory(type("torch", (), {"cuda": fake}))
    fake.use(1)  # loading
    memory.step_start()
    fake.use(10)  # the step
    fake.use(2)
    assert memory.step_end()["allocated"] == 10
    fake.use(3)  # validation between steps
    memory.step_start()
    fake.use(2)
    memory.step_end()
    peaks = memory.run_peaks()
    assert peaks["peak_allocated_gib"] == 10 and peaks["peak_allocated_outside_steps_gib"] == 3
    assert peaks["outside_allocator_gib"] == 0.5 and peaks["ooms"] == 0


def test_run_peaks_count_out_of_memory_errors_and_memory_outside_the_allocator():
    fake = FakeCuda(context_gib=0.75)
    memory = steps.CudaMemory(type("torch", (), {"cuda": fake}))
    memory.step_start()
    fake.use(4)
    memory.step_end()
    fake.ooms = 3  # caught by the trainer, e.g. while generating a validation image
    fake.context = 0.25 * steps.GIB  # smaller at the end: the larger reading (first step) is kept
    peaks = memory.run_peaks()
    assert peaks["ooms"] == 3
    assert peaks["outside_allocator_gib"] == 0.75
