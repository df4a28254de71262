"""What step metrics cost the host per training step, measured directly.

    python -m sd3fit.measure.cost [--steps 2000]

Runs the exact sequence of calls the trainer's seams make in one step (step_begin, data_done, forward, loss,
backward, optimizer, step_end), then what logging a step does (the sink's row: ~30 scalars to metrics.jsonl and
TensorBoard, the recorder's memory counters and timing reads), `--steps` times with no training around it, and
prints the host time per step. On a GPU it uses CUDA events and the caching allocator's counters, as training does.
End-to-end step times vary far more from run to run than this cost, so this is the number that bounds it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def one_step(recorder) -> None:
    recorder.step_begin()
    recorder.data_done(True)
    recorder.begin("forward")
    recorder.switch("forward", "loss")
    recorder.end("loss")
    recorder.begin("backward")
    recorder.begin("optimizer")
    recorder.step_end()


def measure(steps: int) -> dict:
    import torch

    from sd3fit.measure.sink import MetricsSink
    from sd3fit.measure.steps import CudaClock, CudaMemory, HostClock, HostMemory, StepRecorder

    cuda = torch.cuda.is_available()
    values = {f"trainer_scalar_{i}": float(i) for i in range(15)}  # what SimpleTuner logs per step
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        for label, timing in (("seams_only", False), ("step_metrics", True)):
            recorder = StepRecorder(
                CudaClock(torch) if cuda else HostClock(), CudaMemory(torch) if cuda else HostMemory(), 1, timing=timing
            )
            sink = MetricsSink(Path(tmp) / f"{label}.jsonl", Path(tmp) / f"tb-{label}", recorder=recorder if timing else None)
            for step in range(1, 51):  # warm-up: lazy CUDA event pools, file handles
                one_step(recorder)
                sink.on_log(step, values)
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            for step in range(51, 51 + steps):
                one_step(recorder)
                sink.on_log(step, values)
            elapsed = time.perf_counter() - started
            sink.close()
            out[f"{label}_us_per_step"] = 1e6 * elapsed / steps
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd3fit.measure.cost", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    result = measure(args.steps)
    print(f"device: {result['device']}, {result['steps']} simulated steps")
    print(f"  seams and sink without step metrics: {result['seams_only_us_per_step']:8.1f} us per step")
    print(f"  with step metrics (what they cost):  {result['step_metrics_us_per_step']:8.1f} us per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
