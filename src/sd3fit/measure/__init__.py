"""Measuring a training run: named profiler ranges, per-step time and memory, memory snapshots, trace digests.

Nothing here imports SimpleTuner. `sd3fit.simpletuner.patches.step_measure` calls into these pieces from the
trainer's seams; everything else (settings, the step recorder, the metrics sink, the digest) works and is tested
on its own.
"""
